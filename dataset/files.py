"""Reading images from disk (label files are read by their kinds, common/labels)."""

from __future__ import annotations

import io
import math
from pathlib import Path

from PIL import Image, ImageFile

from common.labels.dense import to_8bit

# A truncated file must fail, not decode to grey; the sample is then skipped.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Exceptions that mean "this sample's files are unusable", never a bug in our code.
READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (grey, 16-bit, palette with transparency, CMYK, RGBA) to 8-bit RGB."""
    img = to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def read_image(path: str | Path | bytes, min_side: int | None = None) -> Image.Image:
    """Decode fully now so a truncated or empty file raises here, inside the
    sample's error handling. With `min_side`, a JPEG much larger than needed
    is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) keeping its
    shorter side >= min_side: web images are often several times the 224 px
    of pre-training, and decoding dominates the pipeline."""
    if isinstance(path, bytes):
        path = io.BytesIO(path)
    with Image.open(path) as img:
        if min_side is not None and img.format == "JPEG":
            k = min_side / min(img.size)
            if k < 0.5:
                img.draft(img.mode, (math.ceil(img.width * k), math.ceil(img.height * k)))
        img.load()
        return to_rgb(img)
