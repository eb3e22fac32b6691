"""Figures: those logged with every run, and the comparison's. Each function returns a matplotlib ``Figure``;
the caller saves it.

Figures are made without pyplot (no global figure registry, nothing to close, nothing to import
beyond matplotlib's object API). Grids of small images are drawn as one mosaic per axes, with the
tiles' titles as text: one axes per grid instead of one per tile keeps a run's plots cheap.
"""

import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

TILE_INCHES = 1.1  # width of one tile's cell in a grid
LINE_INCHES = 0.16  # height of one line of a tile's title
GAP = 0.12  # blank between tiles, as a fraction of a cell's width


def training_curves(history: dict[str, list[float]]) -> Figure:
    """Loss and accuracy per epoch, training vs validation."""
    fig = Figure(figsize=(10, 4))
    # Fixed margins: half the cost of a constrained layout, which draws the figure twice.
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.92, wspace=0.24)
    axes = fig.subplots(1, 2)
    epochs = np.arange(1, len(history["loss"]) + 1)
    for ax, metric in zip(axes, ["loss", "accuracy"], strict=True):
        ax.plot(epochs, history[metric], "o-", label="train")
        ax.plot(epochs, history[f"val_{metric}"], "o-", label="validation")
        ax.set(xlabel="epoch", ylabel=metric, title=metric)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> Figure:
    """Test-set confusion matrix, counts in the cells (rows: true class, columns: predicted)."""
    k = len(class_names)
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (y_true, y_pred), 1)
    fig = Figure(figsize=(7, 6))
    names_inches = 0.075 * max(len(str(name)) for name in class_names)  # the longest tick label, 10 pt
    # Margins for the tick labels (rotated 45° below) and the axis labels, fixed as in training_curves:
    fig.subplots_adjust(left=(0.6 + names_inches) / 7, right=0.97, bottom=(0.55 + 0.71 * names_inches) / 6, top=0.93)
    ax = fig.subplots()
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true",
           title=f"Test confusion matrix (accuracy {np.trace(counts) / counts.sum():.4f})")
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, counts[i, j], ha="center", va="center", fontsize=7,
                    color="white" if counts[i, j] > counts.max() / 2 else "black")
    return fig


def rescale(a: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] (a constant array maps to 0), so any tensor can be shown as an image."""
    span = a.max() - a.min()
    return (a - a.min()) / span if span > 0 else np.zeros_like(a)


@dataclass
class Grid:
    """Tiles of one shape, (H, W) shown in ``cmap`` or (H, W, 3) as RGB, each rescaled to [0, 1]
    on its own, laid out in rows of ``columns`` under ``title``, each tile under its own title."""

    tiles: list[np.ndarray]
    titles: list[str]
    columns: int
    title: str
    cmap: str = "gray"
    rescaled: bool = True  # False: tiles already in [0, 1] (overlays), shown as they are

    def mosaic(self) -> tuple[np.ndarray, list[tuple[float, float]], float]:
        """One image of every tile with blank (NaN, or white for RGB) between them; the (x, y) pixel
        where each tile's title sits; the mosaic's pixels per inch (a tile's width is fixed)."""
        h, w = self.tiles[0].shape[:2]
        per_inch = w / ((1 - GAP) * TILE_INCHES)  # pixels per inch
        lines = max(title.count("\n") + 1 for title in self.titles)
        gap, band = max(1, round(GAP * TILE_INCHES * per_inch)), int(np.ceil(lines * LINE_INCHES * per_inch))
        rows, columns = -(-len(self.tiles) // self.columns), min(self.columns, len(self.tiles))
        cell_w, cell_h = w + gap, band + h + gap
        fill = 1.0 if self.tiles[0].ndim == 3 else np.nan
        image = np.full((rows * cell_h - gap, columns * cell_w - gap, *self.tiles[0].shape[2:]), fill)
        anchors = []
        for i, tile in enumerate(self.tiles):
            top, left = divmod(i, columns)[0] * cell_h + band, (i % columns) * cell_w
            image[top:top + h, left:left + w] = rescale(tile) if self.rescaled else tile
            anchors.append((left + (w - 1) / 2, top - 0.5))
        return image, anchors, per_inch


def stacked(grids: list[Grid], suptitle: str) -> Figure:
    """Grids stacked top to bottom in one figure, each centred on one axes with its title."""
    head = 0.45
    laid = [grid.mosaic() for grid in grids]
    titles = [0.3 if grid.title else 0.0 for grid in grids]  # inches above a grid for its title
    width = max(image.shape[1] / per_inch for image, _, per_inch in laid) + 0.2
    height = head + sum(titles) + sum(image.shape[0] / per_inch for image, _, per_inch in laid) + 0.1
    fig = Figure(figsize=(width, height))
    fig.suptitle(suptitle, y=1 - 0.15 / height, va="top")
    bottom = height - head
    for grid, (image, anchors, per_inch), title_inches in zip(grids, laid, titles, strict=True):
        grid_width, inches = image.shape[1] / per_inch, image.shape[0] / per_inch
        bottom -= title_inches + inches
        ax = fig.add_axes(((width - grid_width) / 2 / width, bottom / height, grid_width / width, inches / height))
        ax.imshow(image, cmap=grid.cmap, vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        ax.set_axis_off()
        ax.set_title(grid.title, fontsize=9)
        for (x, y), title in zip(anchors, grid.titles, strict=True):
            ax.text(x, y, title, ha="center", va="bottom", fontsize=7, linespacing=1.0)
    return fig


def conv_filters(kernel: np.ndarray, layer_name: str) -> Figure:
    """The filters of a conv kernel (kh, kw, C, F): one tile per filter, RGB when C == 3, else one
    tile per (input channel, filter) pair."""
    kh, kw, channels, filters = kernel.shape
    if channels == 3:
        grid = Grid([kernel[..., f] for f in range(filters)], [f"filter {f}" for f in range(filters)],
                    min(filters, 8), f"{filters} filters {kh}x{kw}x3")
    else:
        pairs = [(c, f) for c in range(channels) for f in range(filters)]
        grid = Grid([kernel[:, :, c, f] for c, f in pairs],
                    [f"in {c} / out {f}" if channels > 1 else f"filter {f}" for c, f in pairs],
                    min(filters, 8), f"{filters} filters {kh}x{kw}x{channels}", cmap="RdBu_r")
    return stacked([grid], f"{layer_name}: first conv layer's filters")


def feature_maps(image: np.ndarray, maps: dict[str, np.ndarray], label: str, columns: int = 8) -> Figure:
    """One image and the feature maps (H, W, F) every conv layer makes of it: a titled grid of at
    most ``columns`` maps per row for each layer, so the figure stays readable at a page's width."""
    grids = [Grid([image.squeeze()], [""], 1, f"input ({label})")]
    grids += [Grid([fmap[..., f] for f in range(fmap.shape[-1])], [str(f) for f in range(fmap.shape[-1])], columns,
                   f"{name}: {fmap.shape[-1]} maps {fmap.shape[0]}x{fmap.shape[1]}", cmap="viridis")
              for name, fmap in maps.items()]
    return stacked(grids, "Feature maps of each conv layer")


def misclassified(images: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> Figure:
    """Test images the model got wrong, titled with predicted and true label."""
    titles = [f"pred {class_names[p]}\ntrue {class_names[t]}" for p, t in zip(y_pred, y_true, strict=True)]
    return stacked([Grid([x.squeeze() for x in images], titles, 8, "")], f"{len(images)} misclassified test images")


# --- Explanations: which pixels a class's score came from (experiments/analysis/explain.py) -----------------------


def overlay(image: np.ndarray, heat: np.ndarray, signed: bool = False) -> np.ndarray:
    """An explanation map ``heat`` (H, W) laid over the image (H, W) or (H, W, C), as RGB in [0, 1]: the image
    min-max scaled in gray (or its colours) and dimmed, the map in colour with an opacity that grows with its
    magnitude, so the image shows where the map is near 0. The colours run to ``p``, the 99th percentile of the
    map's magnitude (the top 1 % saturate): maps >= 0 in ``jet`` from 0 to p; ``signed`` maps in ``RdBu_r`` from
    −p to p (red: evidence for the class, blue: against it)."""
    from matplotlib import colormaps

    base = 0.1 + 0.5 * rescale(np.asarray(image, np.float64))  # dimmed: the map's colours stand out on it
    base = np.repeat(base, 3, axis=-1) if base.ndim == 3 and base.shape[-1] == 1 else base
    base = np.stack([base] * 3, axis=-1) if base.ndim == 2 else base[..., :3]
    # a few outliers (Integrated Gradients has them) saturate; a map hot on under 1 % of the pixels runs to its max
    peak = np.percentile(np.abs(heat), 99) or np.abs(heat).max()
    level = np.clip(heat / peak, -1, 1) if peak > 0 else np.zeros_like(heat)
    if signed:
        colour, alpha = colormaps["RdBu_r"]((level + 1) / 2)[..., :3], 0.85 * np.abs(level)
    else:
        level = np.clip(level, 0, 1)
        colour, alpha = colormaps["jet"](level)[..., :3], 0.7 * level
    return np.clip((1 - alpha[..., None]) * base + alpha[..., None] * colour, 0, 1)


def explanation(image: np.ndarray, heat: np.ndarray, method: str, title: str, signed: bool = False,
                name: str = "input") -> Figure:
    """One image explained (predict.py explain=<method>): the image the model saw (titled ``name``), ``method``'s
    map alone, and the map over the image, under ``title``."""
    tiles = [overlay(image, np.zeros(heat.shape)), overlay(np.zeros(heat.shape), heat, signed),
             overlay(image, heat, signed)]
    return stacked([Grid(tiles, [name, method, "overlay"], 3, "", rescaled=False)], title)


def explanations(images: np.ndarray, maps: dict[str, np.ndarray], titles: list[str], signed: set[str]) -> Figure:
    """Images (N, H, W, C) and, per method, their maps (N, H, W) over them: one row of inputs, one row per method
    (training runs: misclassified test digits, each explained for the class the model said)."""
    grids = [Grid([overlay(x, np.zeros(x.shape[:2])) for x in images], titles, len(images), "input", rescaled=False)]
    grids += [Grid([overlay(x, m, method in signed) for x, m in zip(images, method_maps, strict=True)],
                   [""] * len(images), len(images), method, rescaled=False) for method, method_maps in maps.items()]
    return stacked(grids, f"Why it said so: {len(images)} mistakes")


# --- The comparison's plots --------------------------------------------------------------------------------------


def val_accuracy_figure(groups: dict[str, list], models: list[str]):
    """Validation accuracy per epoch: the mean over a model's runs, the band from min to max."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for model in models:
        epochs = sorted({epoch for run in groups[model] for epoch in run.val_accuracy})
        values = [[run.val_accuracy[e] for run in groups[model] if e in run.val_accuracy] for e in epochs]
        line, = ax.plot(epochs, [statistics.mean(v) for v in values], "o-", label=model)
        ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                        alpha=0.2)
    ax.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy (mean, min–max over runs)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def accuracy_vs_parameters_figure(rows: list):
    """Mean test accuracy against parameter count (log scale), one labelled point per model."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    labels_at = Counter()  # twins share a parameter count: stack their labels instead of overprinting
    for row in rows:
        x = row.parameter_count[0]
        ax.errorbar(x, 100 * row.test_accuracy_mean, yerr=100 * (row.test_accuracy_std or 0), fmt="o", capsize=3)
        ax.annotate(row.model, (x, 100 * row.test_accuracy_mean), textcoords="offset points",
                    xytext=(6, 5 - 12 * labels_at[x]))
        labels_at[x] += 1
    ax.set_xscale("log")
    ax.set(xlabel="parameters", ylabel="test accuracy (%)", title="Test accuracy vs parameter count")
    ax.grid(alpha=0.3, which="both")
    return fig


def throughput_figure(rows: list):
    """Training images per second per model, in table order from the top."""
    fig = Figure(figsize=(8, 1.5 + 0.5 * len(rows)), layout="constrained")
    ax = fig.subplots()
    models = [row.model for row in rows][::-1]
    ax.barh(models, [row.images_per_second for row in rows][::-1])
    ax.set(xlabel="training images per second", title="Throughput (training pass, mean over epochs and runs)")
    ax.grid(alpha=0.3, axis="x")
    return fig


def critical_difference_figure(ranking) -> Figure:
    """The critical-difference diagram of an ``experiments.analysis.statistics.Ranking``: each architecture at its
    mean rank over the seeds (1: the best), architectures closer than Nemenyi's critical difference joined by a
    bar. autorank draws it on an axes of this figure (its own pyplot figure is never made)."""
    from autorank import plot_stats  # imports pyplot, which this module otherwise never does

    models = len(ranking.mean_ranks)
    margin = 0.08 * max(len(model) for model in ranking.mean_ranks)  # inches beside the axes for the names
    width, title, drawing = 6 + 2 * margin, 0.45, 1.05 + 0.2 * models  # inches
    fig = Figure(figsize=(width, title + drawing))
    ax = fig.add_axes((margin / width, 0, 6 / width, drawing / (title + drawing)))
    plot_stats(ranking.result, allow_insignificant=True, ax=ax)  # autorank lays it out for 6 inches
    fig.suptitle(f"Mean rank over {ranking.seeds} seeds (Friedman p = {ranking.friedman_p:.3g}, "
                 f"Nemenyi CD = {ranking.critical_difference:.2f})", y=1 - 0.1 / (title + drawing), va="top",
                 fontsize=10)
    return fig


def save_figure(fig, path: Path) -> None:
    fig.savefig(path, dpi=100)
