"""Figures logged with every run. Each function returns a matplotlib Figure; the caller logs it."""

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files / MLflow, never to a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def training_curves(history: dict[str, list[float]]):
    """Loss and accuracy per epoch, training vs validation."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history["loss"]) + 1)
    for ax, metric in zip(axes, ["loss", "accuracy"], strict=True):
        ax.plot(epochs, history[metric], "o-", label="train")
        ax.plot(epochs, history[f"val_{metric}"], "o-", label="validation")
        ax.set(xlabel="epoch", ylabel=metric, title=metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]):
    """Test-set confusion matrix, counts in the cells (rows: true class, columns: predicted)."""
    k = len(class_names)
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (y_true, y_pred), 1)
    fig, ax = plt.subplots(figsize=(7, 6))
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
    fig.tight_layout()
    return fig


def image_grid(tiles: list[np.ndarray], titles: list[str], columns: int, suptitle: str, cmap="gray"):
    """Small images in a grid, each with its title; (H, W) tiles in ``cmap``, (H, W, 3) as RGB."""
    rows = -(-len(tiles) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.4 * columns, 1.9 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, tile, title in zip(axes.flat, tiles, titles, strict=False):
        ax.imshow(tile, cmap=cmap)
        ax.set_title(title, fontsize=8)
    fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def rescale(a: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] (a constant array maps to 0), so any tensor can be shown as an image."""
    span = a.max() - a.min()
    return (a - a.min()) / span if span > 0 else np.zeros_like(a)


def conv_filters(kernel: np.ndarray, layer_name: str):
    """The filters of a conv kernel (kh, kw, C, F): one tile per filter, RGB when C == 3, else one
    tile per (input channel, filter) pair."""
    kh, kw, channels, filters = kernel.shape
    if channels == 3:
        tiles = [rescale(kernel[..., f]) for f in range(filters)]
        titles = [f"filter {f}" for f in range(filters)]
        return image_grid(tiles, titles, min(filters, 8), f"{layer_name}: {filters} filters {kh}x{kw}x3")
    tiles = [kernel[:, :, c, f] for c in range(channels) for f in range(filters)]
    titles = [f"in {c} / out {f}" if channels > 1 else f"filter {f}" for c in range(channels) for f in range(filters)]
    return image_grid(tiles, titles, min(filters, 8), f"{layer_name}: {filters} filters {kh}x{kw}x{channels}",
                      cmap="RdBu_r")


def feature_maps(image: np.ndarray, maps: dict[str, np.ndarray], label: str, columns: int = 8):
    """One image and the feature maps (H, W, F) every conv layer makes of it: a titled grid of at
    most ``columns`` maps per row for each layer, so the figure stays readable at a page's width."""
    rows = {name: -(-fmap.shape[-1] // columns) for name, fmap in maps.items()}
    heights = [1.0] + [r + 0.25 for r in rows.values()]  # the input, then each layer's grid and title
    fig = plt.figure(figsize=(1.1 * columns, 1.15 * sum(heights) + 0.4), layout="constrained")
    top, *layer_figs = fig.subfigures(len(heights), 1, height_ratios=heights)
    ax = top.subplots()
    ax.imshow(rescale(image).squeeze(), cmap="gray")
    ax.set_title(f"input ({label})", fontsize=9)
    ax.axis("off")
    for sub, (name, fmap) in zip(layer_figs, maps.items(), strict=True):
        axes = sub.subplots(rows[name], columns, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for f, ax in zip(range(fmap.shape[-1]), axes.flat, strict=False):
            ax.imshow(fmap[..., f], cmap="viridis")
            ax.set_title(str(f), fontsize=7)
        sub.suptitle(f"{name}: {fmap.shape[-1]} maps {fmap.shape[0]}x{fmap.shape[1]}", fontsize=9)
    fig.suptitle("Feature maps of each conv layer")
    return fig


def misclassified(images: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]):
    """Test images the model got wrong, titled with predicted and true label."""
    tiles = [rescale(x).squeeze() for x in images]
    titles = [f"pred {class_names[p]}\ntrue {class_names[t]}" for p, t in zip(y_pred, y_true, strict=True)]
    return image_grid(tiles, titles, 8, f"{len(images)} misclassified test images")
