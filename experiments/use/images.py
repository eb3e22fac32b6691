"""A user's image file -> the model's input: any common format read, then brought into the training data's form.

Single-channel inputs (MNIST-style digits) go through the procedure that built MNIST, on a photo or scan of a
digit: the ink is separated from the paper (whatever its light, shade and polarity), cropped to its bounding
box, scaled so that its longer side fills a 20 px box (anti-aliased, aspect ratio kept) and placed in the 28×28
field with its centre of mass on the field's centre. Colour inputs are resized, nothing else.

    rgb = read_image("my_digit.jpg")                    # (H, W, 3) float32 in [0, 1]
    pixels = prepare(rgb, (28, 28, 1), "my_digit.jpg")  # (28, 28, 1) in [0, 1]: light ink on black
    x = normalise(pixels, mean=[0.1307], std=[0.3081])  # what the model was trained on
"""

import glob
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from experiments.errors import UserError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

# MNIST's geometry: the digit's longer side fills a 20 px box inside the 28 px field.
DIGIT_BOX, DIGIT_FIELD = 20, 28
# Larger images are reduced to this longer side before the ink is looked for: a digit in a photo still spans
# well over 20 px, and the area averaging removes most of the sensor and JPEG noise.
WORK_SIDE = 1024
# The ink is the extreme this many times farther from the paper than the other extreme (`ink_is_dark`).
POLARITY_MARGIN = 2.0
# The paper's local level is estimated on a copy this small (longer side), by percentiles over a window of this
# fraction of the image: wider than a pen stroke, narrower than shadows and gradients (`background`).
BACKGROUND_SIDE, BACKGROUND_WINDOW, BACKGROUND_PERCENTILE = 32, 0.2, 20
# Ink at this fraction of the strongest (and MIN_CONTRAST) left by the first estimate of the paper is a blob of
# ink, filled in from the paper around it in this many smoothing steps (`background`, `inpaint`).
BLOB_FRACTION, INPAINT_STEPS = 0.25, 10
# Paper in a shadow keeps at least this fraction of the brightest paper's brightness: darker is ink. Ink strength
# is a fraction of the paper's brightness, which counts as at least PAPER_FLOOR (`background`, `strength`).
MIN_PAPER, PAPER_FLOOR = 0.5, 0.5
# Ink must stand out from the paper by this fraction of the paper's brightness, and from the noise by this many
# noise standard deviations (both measured on the 3×3-smoothed ink map); else the image is blank.
MIN_CONTRAST, NOISE_SIGMAS = 0.1, 12.0
# Ink weaker than FLOOR_FRACTION of the strongest ink is paper, and so is ink not linked to a stroke of at least
# STROKE_FRACTION of it; the strongest ink (the STRONG_QUANTILE of the inked pixels) becomes 1, as MNIST's stroke
# cores are 255 (`clean`).
FLOOR_FRACTION, STROKE_FRACTION, STRONG_QUANTILE = 0.2, 0.5, 0.9


class ImageError(UserError):
    """A file that cannot be used as an image; the message names it."""


class BlankImageError(ImageError):
    """An image without ink on it (a blank page, a uniform colour, noise)."""


def find_images(spec: str, recursive: bool = False) -> list[Path]:
    """The image files named by `spec`, sorted.

    Args:
        spec: one file (returned whatever its suffix: reading it then fails with `ImageError` if it is not an
            image), a folder (its files with an image suffix, see `IMAGE_SUFFIXES`), or a glob pattern such as
            `"photos/*.jpg"` (the image files it matches).
        recursive: also look into the folder's sub-folders; lets `**` in a glob match any depth.

    Raises:
        UserError: nothing exists at `spec`, or no image file is found there (one line naming it).
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in (path.rglob("*") if recursive else path.iterdir()) if is_image_file(p))
        if not files:
            hint = "" if recursive or not any(p.is_dir() for p in path.iterdir()) else " (sub-folders not searched)"
            raise UserError(f"no images in {path}{hint}")
        return files
    if glob.has_magic(spec):
        files = sorted(p for p in map(Path, glob.glob(str(path), recursive=recursive)) if is_image_file(p))
        if not files:
            raise UserError(f"no images match {spec}")
        return files
    raise UserError(f"no such file or folder: {path}")


def is_image_file(path: Path) -> bool:
    """A file whose suffix is one of `IMAGE_SUFFIXES` (any case)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def read_image(path, source: str | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file with Pillow into float32 RGB (H, W, 3) in [0, 1].

    Any size and mode: 1, L, P (palette), RGB, CMYK, YCbCr, 16-bit (I;16, or I with the 16-bit range), F (float,
    on Pillow's 0-255 scale). Multi-frame files (GIF, TIFF) give their first frame; the EXIF orientation of phone
    photos is applied; transparent pixels are composited on white.

    Args:
        path: the file: a path, or a binary file object (``io.BytesIO(data)``).
        source: what the image is called in error messages (default: `path`).
        max_pixels: refuse images with more pixels (width × height), read from the file's header before any pixel
            is decoded; None: any size.

    Raises:
        ImageError: the file is missing, not an image, truncated, corrupt or over `max_pixels` (one line naming the
            file and why).
    """
    source = str(path) if source is None else source
    try:
        with Image.open(path) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise ImageError(f"{source}: {image.width}×{image.height} pixels, more than the limit of "
                                 f"{max_pixels:,}")
            image.load()  # decodes every byte now: a truncated file fails here, not later
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"cannot read {source}: not an image, or a format Pillow cannot decode") from None
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error ... on bad data
        why = " ".join((getattr(e, "strerror", None) or str(e) or type(e).__name__).split())
        raise ImageError(f"cannot read {source}: {why}") from None


def to_rgb(image: Image.Image) -> np.ndarray:
    """A decoded Pillow image of any mode -> float32 RGB (H, W, 3) in [0, 1], transparency composited on white."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        scale = 255.0 if image.mode == "F" else 65535.0
        gray = np.clip(np.asarray(image, np.float32) / scale, 0, 1)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.has_transparency_data:
        rgba = np.asarray(image.convert("RGBA"), np.float32) / 255
        alpha = rgba[..., 3:]
        return rgba[..., :3] * alpha + (1 - alpha)
    return np.asarray(image.convert("RGB"), np.float32) / 255


def to_grayscale(rgb: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) -> luma (H, W), float32: ITU-R 601, the weights of Pillow's "L" mode."""
    return (rgb @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.float32)


def shrink(gray: np.ndarray, max_side: int = WORK_SIDE) -> np.ndarray:
    """Reduce (H, W) by area averaging so that its longer side is at most `max_side`; smaller images unchanged."""
    h, w = gray.shape
    if max(h, w) <= max_side:
        return gray
    scale = max_side / max(h, w)
    return resize(gray, (max(1, round(h * scale)), max(1, round(w * scale))), Image.Resampling.BOX)


def resize(plane: np.ndarray, shape: tuple[int, int], method: Image.Resampling) -> np.ndarray:
    """Resize one float32 plane (H, W) to `shape` (h, w) with a Pillow filter (anti-aliased when reducing)."""
    image = Image.fromarray(np.ascontiguousarray(plane, np.float32))  # mode F
    return np.asarray(image.resize((shape[1], shape[0]), method), np.float32)


def box_mean(plane: np.ndarray, size: int) -> np.ndarray:
    """The mean over a `size`×`size` window (odd) around each pixel of (H, W), the window cut at the sides."""
    out = np.asarray(plane, np.float64)
    for axis in (0, 1):
        n = out.shape[axis]
        sums = np.concatenate([np.zeros_like(out.take([0], axis)), out.cumsum(axis)], axis)
        index = np.arange(n)
        high, low = np.minimum(index + size // 2 + 1, n), np.maximum(index - size // 2, 0)
        count = (high - low).reshape((n, 1) if axis == 0 else (1, n))
        out = (sums.take(high, axis) - sums.take(low, axis)) / count
    return out.astype(np.float32)


def ink_map(gray: np.ndarray) -> np.ndarray:
    """Grey levels (H, W) in [0, 1] -> the ink's strength per pixel (H, W) in [0, 1], 0 on the paper.

    Light ink on a dark ground (MNIST) is kept, dark ink on light paper is inverted (`ink_is_dark`). The strength
    is measured from the local level of the paper (`background`), relative to its brightness (`strength`): a
    digit reads the same on grey paper, in a shadow or in full light.
    """
    light_ink = 1 - gray if ink_is_dark(gray) else gray
    return strength(light_ink, background(light_ink))


def ink_is_dark(gray: np.ndarray) -> bool:
    """Whether the ink is darker than the paper (a pen on paper) rather than lighter (MNIST, chalk on a board).

    The paper is what the image's border shows mostly (its median). The ink is the extreme, after 3×3 smoothing
    against noise, that lies farther from it, when it lies at least POLARITY_MARGIN times farther than the
    other; else (a blank or hazy image) the ink is dark on light paper and light on a dark ground.
    """
    paper = float(np.median(border(gray)))
    smooth = box_mean(gray, 3)
    darker, lighter = paper - float(smooth.min()), float(smooth.max()) - paper
    if max(darker, lighter) >= POLARITY_MARGIN * min(darker, lighter):
        return darker > lighter
    return paper >= 0.5


def strength(light_ink: np.ndarray, ground: np.ndarray) -> np.ndarray:
    """How far (H, W) rises above its ground, as a fraction of the room the ground leaves for ink (for dark ink
    on paper: a fraction of the paper's brightness), the room counting as at least PAPER_FLOOR so that dim paper
    does not blow up its noise; in [0, 1]."""
    return np.clip((light_ink - ground) / np.maximum(1 - ground, PAPER_FLOOR), 0, 1).astype(np.float32)


def background(light_ink: np.ndarray) -> np.ndarray:
    """The local level of the ground (paper) under (H, W) whose ink is lighter than its ground.

    Estimated on a copy reduced to BACKGROUND_SIDE px, over windows a fifth of the image wide: first by a
    `percentile_opening`, which drops pen strokes and keeps gradients and the edges of shadows, capped so that
    the paper keeps at least MIN_PAPER of the brightest paper's room for ink. What still stands out from that
    first estimate as ink (blobs of a fat marker wider than the window), with two pixels around it, is then
    `inpaint`ed from the paper around it. Back at (H, W) bilinearly.
    """
    h, w = light_ink.shape
    scale = min(1.0, BACKGROUND_SIDE / max(h, w))
    small = resize(light_ink, (max(1, round(h * scale)), max(1, round(w * scale))), Image.Resampling.BOX)
    size = 2 * round(BACKGROUND_WINDOW * max(small.shape) / 2) + 1
    first = percentile_opening(small, size)
    first = np.minimum(first, 1 - MIN_PAPER * (1 - first.min()))
    ink = strength(small, first)
    ground = inpaint(first, grow(grow(ink > max(MIN_CONTRAST, BLOB_FRACTION * ink.max()))), size)
    return resize(ground, (h, w), Image.Resampling.BILINEAR)


def percentile_opening(plane: np.ndarray, size: int) -> np.ndarray:
    """A morphological opening of (H, W) made of percentiles over `size`×`size` windows: the 20th percentile
    (BACKGROUND_PERCENTILE) drops light structures narrower than the window, then the 80th brings the edges of
    wider ones back to their place. Padded by odd reflection, so that a gradient runs on straight past the sides.
    """
    rank = round(BACKGROUND_PERCENTILE / 100 * (size * size - 1))
    padded = np.pad(plane, size, mode="reflect", reflect_type="odd").astype(np.float32)
    opened = rank_filter(rank_filter(padded, size, rank), size, size * size - 1 - rank)
    return opened[1:-1, 1:-1]  # each filter keeps the windows inside its input: size - 1 fewer rows and columns


def rank_filter(plane: np.ndarray, size: int, rank: int) -> np.ndarray:
    """The `rank`-th smallest value (0: the minimum) of every `size`×`size` window that lies inside (H, W):
    (H - size + 1, W - size + 1)."""
    windows = np.lib.stride_tricks.sliding_window_view(plane, (size, size))
    return np.partition(windows.reshape(*windows.shape[:2], size * size), rank, axis=-1)[..., rank]


def inpaint(plane: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) with its `mask` pixels replaced by a smooth fill from the others: the mean of the unmasked pixels
    in a `size`×`size` window (their median where there are none) to start, then INPAINT_STEPS rounds of 3×3
    means (a discrete harmonic fill). Unchanged when nothing, or everything, is masked."""
    if mask.all() or not mask.any():
        return plane
    keep = (~mask).astype(np.float32)
    weight = box_mean(keep, size)
    nearby = box_mean(plane * keep, size) / np.maximum(weight, 1e-6)
    filled = np.where(mask, np.where(weight > 0, nearby, np.median(plane[~mask])), plane)
    for _ in range(INPAINT_STEPS):
        filled = np.where(mask, box_mean(filled, 3), plane)
    return filled


def clean(ink: np.ndarray, source: str = "image") -> np.ndarray:
    """The ink map (H, W) with the paper and its noise set to 0 and the stroke cores stretched to 1.

    The paper's level and noise are the median and the robust spread (1.4826 × median absolute deviation) of the
    3×3-smoothed map along the image's `border`, which is mostly paper. Ink must rise above them by MIN_CONTRAST
    and by NOISE_SIGMAS deviations, else the image is blank. Then, on the smoothed map, ink is what rises above
    the floor (FLOOR_FRACTION of the strongest ink, and half the noise margin) in regions that reach
    STROKE_FRACTION of it (hysteresis: isolated specks, faint marks and the edges of shadows drop out). Those
    pixels and their neighbours keep their grey levels (anti-aliasing) above the floor, divided by the stroke
    cores' level (the STRONG_QUANTILE of the ink's pixels), as MNIST's cores are 255.

    Raises:
        BlankImageError: no ink stands out from the paper and its noise.
    """
    smooth = box_mean(ink, 3)
    paper = border(smooth)
    level = float(np.median(paper))
    noise = 1.4826 * float(np.median(np.abs(paper - level)))
    peak = float(smooth.max()) - level
    if peak < MIN_CONTRAST or peak < NOISE_SIGMAS * noise:
        raise BlankImageError(f"no ink found in {source}")
    floor = level + max(FLOOR_FRACTION * peak, NOISE_SIGMAS / 2 * noise)
    inked = connected(smooth > level + STROKE_FRACTION * peak, smooth > floor)
    strong = float(np.quantile(ink[inked], STRONG_QUANTILE))
    return np.where(grow(inked) & (ink > floor), np.clip(ink / strong, 0, 1), 0).astype(np.float32)


def border(plane: np.ndarray) -> np.ndarray:
    """The pixels of (H, W) within 2 % of its sides (at least one pixel): mostly paper, whatever the digit."""
    h, w = plane.shape
    ring = max(1, min(h, w) // 50)
    return np.concatenate([plane[:ring].ravel(), plane[-ring:].ravel(), plane[ring:-ring, :ring].ravel(),
                           plane[ring:-ring, -ring:].ravel()])


def grow(mask: np.ndarray) -> np.ndarray:
    """A boolean (H, W) grown by one pixel in all eight directions."""
    h, w = mask.shape
    padded = np.pad(mask, 1)
    return np.logical_or.reduce([padded[i:i + h, j:j + w] for i in range(3) for j in range(3)])


def connected(seeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The pixels of the boolean `mask` (H, W) linked to one of `seeds` through `mask` (8-neighbours)."""
    region = seeds & mask
    while True:
        grown = grow(region) & mask
        if np.array_equal(grown, region):
            return region
        region = grown


def crop_to_ink(ink: np.ndarray) -> np.ndarray:
    """The bounding box of the non-zero pixels of (H, W)."""
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    if rows.size == 0:
        raise ValueError("crop_to_ink: the image has no ink (all zeros)")
    return ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def fit_box(ink: np.ndarray, size: int = DIGIT_BOX) -> np.ndarray:
    """Scale (h, w) so that its longer side is `size` px, aspect ratio kept (Lanczos, anti-aliased), clipped
    to [0, 1]: a 40×10 bar becomes 20×5."""
    if size < 1:
        raise ValueError(f"fit_box: size must be >= 1, got {size!r}")
    h, w = ink.shape
    scale = size / max(h, w)
    shape = (max(1, round(h * scale)), max(1, round(w * scale)))
    return np.clip(resize(ink, shape, Image.Resampling.LANCZOS), 0, 1)


def centre_by_mass(ink: np.ndarray, field: tuple[int, int] = (DIGIT_FIELD, DIGIT_FIELD)) -> np.ndarray:
    """Place (h, w) in a zero field (H, W) with its centre of mass on pixel (H // 2, W // 2), to the nearest pixel.

    That is MNIST's convention: its test digits have their centre of mass at row 13.99, column 14.01 (± 0.29) of
    the 28×28 field, in pixel indices. Where that shift would push ink out of the field, it is clamped.
    """
    h, w = ink.shape
    if h > field[0] or w > field[1] or ink.sum() <= 0:
        raise ValueError(f"centre_by_mass: need ink that fits in {tuple(field)}, got shape {ink.shape} with mass "
                         f"{float(ink.sum())}")
    mass = float(ink.sum())
    row = float(ink.sum(1) @ np.arange(h)) / mass
    col = float(ink.sum(0) @ np.arange(w)) / mass
    top = int(np.clip(round(field[0] // 2 - row), 0, field[0] - h))
    left = int(np.clip(round(field[1] // 2 - col), 0, field[1] - w))
    out = np.zeros(field, np.float32)
    out[top:top + h, left:left + w] = ink
    return out


def prepare(rgb: np.ndarray, input_shape, source: str = "image") -> np.ndarray:
    """An RGB image (H, W, 3) in [0, 1] -> the training data's pixels (h, w, c), float32 in [0, 1], before
    normalisation.

    Args:
        rgb: the image, as `read_image` returns it.
        input_shape: the data config's `input_shape`, (h, w, c) with c 1 or 3. With c == 1: the digit pipeline
            (`ink_map`, `clean`, `crop_to_ink`, `fit_box`, `centre_by_mass`), the box being 20/28 of the field;
            with c == 3: a resize to (h, w).
        source: what the image is called in error messages (its file).

    Raises:
        BlankImageError: a single-channel input is asked for and the image has no ink.
    """
    rgb = np.asarray(rgb, np.float32)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"prepare: rgb must have shape (H, W, 3), got {rgb.shape}")
    shape = tuple(int(n) for n in input_shape)
    if len(shape) != 3 or shape[2] not in (1, 3) or min(shape) < 1:
        raise ValueError(f"prepare: input_shape must be (h, w, 1) or (h, w, 3), got {list(input_shape)}")
    h, w, c = shape
    if c == 3:
        return np.stack([np.clip(resize(rgb[..., k], (h, w), Image.Resampling.LANCZOS), 0, 1) for k in range(3)], -1)
    ink = clean(ink_map(shrink(to_grayscale(rgb))), source)
    box = max(1, round(DIGIT_BOX / DIGIT_FIELD * min(h, w)))
    return centre_by_mass(fit_box(crop_to_ink(ink), box), (h, w))[..., None]


def normalise(pixels: np.ndarray, mean, std) -> np.ndarray:
    """Pixels (..., c) in [0, 1] -> (x - mean) / std per channel, float32: the formula training uses."""
    pixels = np.asarray(pixels, np.float32)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if mean.shape != (pixels.shape[-1],) or std.shape != mean.shape:
        raise ValueError(f"normalise: need one mean and one std per channel ({pixels.shape[-1]}), got mean "
                         f"{mean.tolist()} and std {std.tolist()}")
    return (pixels - mean) / std
