"""Test images of what users feed predict.py: photos of digits on paper, deterministic given the rng.

`photo_of_digit` turns an MNIST digit into such a photo; `font_digit` writes a character in a TrueType font
(not MNIST at all) and photographs it the same way; `paper` alone is a photo of an empty page.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_DIR = Path("/usr/share/fonts")
# Regular, bold, light, italic and slanted monospace: strokes from thin to thick, upright and slanted.
FONT_NAMES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-ExtraLight.ttf", "DejaVuSerif-Italic.ttf",
              "DejaVuSansMono-Oblique.ttf")


def paper(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A photo of an empty page (H, W) in [0, 1]: light paper (0.6-0.95) under a linear gradient of up to
    ±0.2 in a random direction, with mild sensor noise."""
    h, w = shape
    rows, cols = np.mgrid[0:h, 0:w]
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * (cols - (w - 1) / 2) + np.sin(angle) * (rows - (h - 1) / 2)
    ramp /= max(np.abs(ramp).max(), 1)
    light = np.clip(rng.uniform(0.7, 0.85) + rng.uniform(0.05, 0.2) * ramp, 0.6, 0.95)
    return np.clip(light + rng.normal(0, rng.uniform(0.01, 0.03), shape), 0, 1)


def photograph(ink: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Ink (h, w) in [0, 1] written in dark ink (0.05-0.25) at a random place of a page 1.3-2× larger than it
    in each direction (so rarely centred), photographed: `paper` light, a slight colour cast. RGB."""
    h, w = ink.shape
    shape = (round(h * rng.uniform(1.3, 2.0)), round(w * rng.uniform(1.3, 2.0)))
    top, left = rng.integers(0, shape[0] - h + 1), rng.integers(0, shape[1] - w + 1)
    placed = np.zeros(shape)
    placed[top:top + h, left:left + w] = ink
    gray = paper(shape, rng) * (1 - placed) + rng.uniform(0.05, 0.25) * placed
    rgb = np.clip(gray[..., None] * (1 - rng.uniform(0, 0.08, 3)), 0, 1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def photo_of_digit(digit28: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """What a user's photo of an MNIST digit (28, 28) uint8 looks like: enlarged ×3-×8 (Lanczos), dark ink on
    light paper, off-centre on an uneven background, mild noise (`photograph`). Save it as PNG or JPEG."""
    side = round(28 * rng.uniform(3, 8))
    enlarged = Image.fromarray(np.asarray(digit28, np.uint8)).resize((side, side), Image.Resampling.LANCZOS)
    return photograph(np.asarray(enlarged, np.float64) / 255, rng)


def write_photo_folder(folder: str | Path, images: np.ndarray, rng: np.random.Generator,
                       formats: tuple[str, ...] = ("png", "jpg")) -> list[Path]:
    """Each digit of `images` (N, 28, 28) as `photo_of_digit`, saved as folder/0000.png, 0001.jpg, ... (the
    formats in turn; JPEG at Pillow's default quality, 75; PNG at the fastest compression). Returns the paths."""
    paths = []
    for index, digit in enumerate(images):
        suffix = formats[index % len(formats)]
        path = Path(folder) / f"{index:04d}.{suffix}"
        photo_of_digit(digit, rng).save(path, **({"compress_level": 1} if suffix == "png" else {}))
        paths.append(path)
    return paths


def digit_fonts(size: int = 160) -> dict[str, ImageFont.FreeTypeFont]:
    """The `FONT_NAMES` found on this machine at `size` px, by file stem; Pillow's built-in font if none."""
    found = {path.name: path for path in sorted(FONT_DIR.rglob("*.ttf"))} if FONT_DIR.is_dir() else {}
    fonts = {Path(name).stem: ImageFont.truetype(found[name], size) for name in FONT_NAMES if name in found}
    return fonts or {"pillow-default": ImageFont.load_default(size)}


def glyph(char: str, font: ImageFont.FreeTypeFont, stroke: int) -> np.ndarray:
    """`char` written in `font`, its strokes widened by `stroke` px on each side (a thicker pen): the ink (h, w)
    in [0, 1], cropped to it."""
    left, top, right, bottom = font.getbbox(char, stroke_width=stroke)
    canvas = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(canvas).text((-left, -top), char, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    return np.asarray(canvas, np.float64) / 255


def font_digit(char: str, font: ImageFont.FreeTypeFont, stroke: int, rng: np.random.Generator) -> Image.Image:
    """The `glyph` photographed (`photograph`): dark ink on uneven paper, off-centre, noise. RGB."""
    return photograph(glyph(char, font, stroke), rng)
