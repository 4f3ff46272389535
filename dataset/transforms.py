"""Image + label augmentation (SPEC "Data"), with geometric ops moving the labels.

RGB goes to `resolution` (bicubic) and CLIP normalisation; every label goes to
224x224 (nearest). Training adds random resized crop, horizontal flip and
RandAugment(2 ops, magnitude 5). Randomness comes from a `random.Random`
passed in, so a sample's augmentation depends only on (seed, epoch, index),
not on which worker draws it.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from common.modalities import EXPERTS

LABEL_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RGB_FILL = (0, 0, 0)


def crop_params(width: int, height: int, scale, rng: random.Random, ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision's RandomResizedCrop draws them: ten tries
    at a random area fraction and log-uniform aspect ratio, else a centre crop
    of the whole image clamped to `ratio` (so scales above 1, used in
    pre-training, mostly fall back to the whole image as in the official code)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# RandAugment: (name, min, max) at magnitude m of 10 -> value min + m/10 * (max - min).
AUGMENT_OPS = (
    ("identity", 0.0, 1.0),
    ("shear_x", 0.0, 0.3),
    ("shear_y", 0.0, 0.3),
    ("translate_x", 0.0, 0.33),
    ("translate_y", 0.0, 0.33),
    ("rotate", 0.0, 30.0),
    ("auto_contrast", 0.0, 1.0),
    ("equalize", 0.0, 1.0),
    ("brightness", 0.1, 1.9),
    ("sharpness", 0.1, 1.9),
)
GEOMETRIC = {"shear_x", "shear_y", "translate_x", "translate_y", "rotate"}


def _geometric(img: Image.Image, op: str, v: float, resample, fill) -> Image.Image:
    """Apply one geometric op. Translations are a fraction of each image's own
    width, so RGB at 480 px and labels at 224 px move by the same fraction
    (the official code shifted labels by the RGB pixel count)."""
    if op == "rotate":
        return img.rotate(v, resample=resample, fillcolor=fill)
    w, h = img.size
    coeffs = {
        "shear_x": (1, v, 0, 0, 1, 0),
        "shear_y": (1, 0, 0, v, 1, 0),
        "translate_x": (1, 0, v * w, 0, 1, 0),
        "translate_y": (1, 0, 0, 0, 1, v * h),
    }[op]
    return img.transform(img.size, Image.AFFINE, coeffs, resample=resample, fillcolor=fill)


def _photometric(img: Image.Image, op: str, v: float) -> Image.Image:
    if op == "auto_contrast":
        return ImageOps.autocontrast(img)
    if op == "equalize":
        return ImageOps.equalize(img)
    if op == "brightness":
        return ImageEnhance.Brightness(img).enhance(v)
    return ImageEnhance.Sharpness(img).enhance(v)


def _label_fill(name: str, img: Image.Image):
    fill = EXPERTS[name].kind.fill
    return (fill,) * 3 if img.mode == "RGB" else fill


def rand_augment(image: Image.Image, labels: dict[str, Image.Image], rng: random.Random, n: int = 2, m: int = 5):
    """n ops drawn with replacement; geometric ones (random sign) move the
    labels with nearest resampling and the expert's fill value; photometric
    ones touch RGB only."""
    for op, lo, hi in rng.choices(AUGMENT_OPS, k=n):
        v = lo + m / 10 * (hi - lo)
        if op in GEOMETRIC:
            v = -v if rng.random() > 0.5 else v
            image = _geometric(image, op, v, Image.BILINEAR, RGB_FILL)
            labels = {k: _geometric(x, op, v, Image.NEAREST, _label_fill(k, x)) for k, x in labels.items()}
        elif op != "identity":
            image = _photometric(image, op, v)
    return image, labels


_RGB_SCALE = torch.tensor([1 / (255 * s) for s in CLIP_STD]).view(3, 1, 1)
_RGB_SHIFT = torch.tensor([m / s for m, s in zip(CLIP_MEAN, CLIP_STD)]).view(3, 1, 1)


def rgb_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 RGB -> CLIP-normalised (3, H, W) float32, in place on one
    channel-first buffer (8x faster than chained out-of-place ops at 480 px)."""
    x_CHW = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    out = torch.empty(x_CHW.shape, dtype=torch.float32)
    out.copy_(x_CHW)
    return out.mul_(_RGB_SCALE).sub_(_RGB_SHIFT)


class Transform:
    """PIL image + labels -> tensors. `labels` maps expert name -> PIL image at
    the image's size (dense: 'L'/'RGB' values; painted experts: 'L' ids)."""

    def __init__(self, resolution: int, train: bool, scale=(0.5, 1.0), label_resolution: int = LABEL_SIZE):
        self.resolution = int(resolution)
        # 224 as officially; smaller only for small-scale research (the stems
        # and positional embedding adapt to any label grid).
        self.label_resolution = int(label_resolution)
        self.train = train
        self.scale = tuple(scale)
        # Shortest image side that still gives the smallest random crop
        # (area `scale[0]`, aspect 3/4) `resolution` pixels: decoding finer is wasted.
        shrink = math.sqrt(self.scale[0] * 3 / 4) if train else 1.0
        self.min_decode_side = math.ceil(self.resolution / shrink)

    def __call__(self, image: Image.Image, labels: dict[str, Image.Image], rng: random.Random) -> dict:
        if self.train:
            top, left, h, w = crop_params(image.width, image.height, self.scale, rng)
            box = (left, top, left + w, top + h)
            image = image.crop(box)
            labels = {k: x.crop(box) for k, x in labels.items()}
        image = image.resize((self.resolution, self.resolution), Image.BICUBIC)
        size = (self.label_resolution, self.label_resolution)
        labels = {k: x.resize(size, Image.NEAREST) for k, x in labels.items()}
        if self.train:
            if rng.random() > 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
                labels = {k: x.transpose(Image.FLIP_LEFT_RIGHT) for k, x in labels.items()}
            image, labels = rand_augment(image, labels, rng)
        out = {"rgb": rgb_tensor(image)}
        for name, x in labels.items():
            out[name] = EXPERTS[name].kind.to_tensor(x)
        return out
