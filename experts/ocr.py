"""The OCR expert: CharNet (Xing et al., 2019) with an hourglass-88 backbone, as
Prismer runs it (`experts/generate_ocrdet.py`), plus the CLIP text features of
the words it reads.

- Network: `backbone` (a 7x7/2 stem, a stride-2 residual, two stacked
  three-level hourglasses; 256 channels at 1/4), a word detector (foreground,
  top/bottom/left/right distances, orientation), a character detector
  (foreground, distances) and a character recogniser (68 classes). Keys are
  those of the official `icdar2015_hourglass88.pth` (a flat state_dict, 594
  keys), loaded strictly without unpickling code. H, W: multiples of 32.
- Input: PIL bilinear resize to 480 x 480 (as the official pipeline does it,
  with PIL), ToTensor, ImageNet normalisation, RGB.
- Post-processing (`read_words`): the official OrientedTextPostProcessing with
  its defaults (stride 4; word score > 0.5, polygon NMS at IoU 0.15; char score
  > 0.25 inside the word foreground, NMS at 0.3; both NMS keep a box only with
  at least one neighbour of IoU > 0.5 and move it to the score-weighted mean of
  them). Polygon areas and intersections are computed here (Sutherland-Hodgman),
  not with shapely/pyclipper. Each character goes to the word of highest IoU,
  characters are read left to right, a word's text score is the mean of its
  characters' top probabilities. Kept: text score >= 0.8 and (not purely
  alphabetic with score >= 0.9, or score >= 0.98, or corrected to the nearest
  lexicon word within edit distance 0 / 1 / 2 for lexicon words of length
  <= 2 / <= 5 / longer).
- Lexicon: the official run used `GenericVocabulary.txt` (NVlabs/prismer,
  `experts/ocr_detection/datasets/ICDAR2015/test/`), which is not shipped
  here. Pass a lexicon file (one word a line, `#` lines skipped) as
  `Generator(lexicon=...)`. Without one, every word that would need the
  correction (text score in [0.8, 0.98), alphabetic or below 0.9) is dropped,
  so fewer words are kept than officially (the official code itself fails
  with an empty lexicon); with the official file the result is the official one.
- Label (`Words`): the official map at the original size, all 255, word quads
  filled with ids 0, 1, ... over the words in reverse order (later fills win),
  by `fill_polygon`, which reproduces cv2.fillPoly (checked pixel for pixel on
  20,000 random quads; PIL's ImageDraw.polygon differs by ~5 pixels per quad);
  each word's 64-d feature is the PCA (common/label_space.py) of the projected
  end-of-text embedding of CLIP ViT-L/14's text encoder, unnormalised, as
  `clip.encode_text` gives it, for the lower-cased word. At most 255 words
  (ids 0..254): beyond that the lowest-scored are dropped (officially the ids
  would overflow).
- The official run used fp16 autocast (CharNet) and an fp16 CLIP; in float32
  scores near the thresholds may fall the other way.
- An image without words gives an all-255 map and no words: `no_text(label)`
  (equivalently `not label.words`) tells a driver to count it as "no text found".
- Cost on the project's 2-core CPU, float32, one 480 x 480 input, measured once with
  synthetic weights: CharNet forward 7.4-8.4 CPU-seconds (15-17 s wall on the busy
  box); peak resident memory 1.7 GB with a ViT-L/14-sized text encoder loaded (1.5 GB
  once loaded). Post-processing grows with the text found: random weights, whose
  every cell is word foreground (14,400 boxes), take 4 CPU-seconds.
"""

from __future__ import annotations

import html
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from common.files import CheckpointError
from common.hub import hub_file, hub_first_file, is_hub_id
from common.label_space import load_clip_pca
from common.labels import NONE_ID, Words
from common.weights import WEIGHT_FILES, load_checked, read_state_dict
from experts.network import LabelNetwork

log = logging.getLogger(__name__)

RESOLUTION = 480  # the official generation resizes every image to 480 x 480
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CLIP_ID = "openai/clip-vit-large-patch14"
CLIP_FILES = ("config.json", "vocab.json", "merges.txt", "tokenizer_config.json")
CONTEXT = 77  # CLIP's text length
# The 68 classes of the official char_dict.txt (NVlabs/prismer,
# experts/ocr_detection/datasets/ICDAR2015/test/char_dict.txt), class id = position;
# the official reader upper-cases them.
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789" + "!#\"%$'&)(+*-,/.;:=<?>@[]\\_^`{}|~"
XY_SHIFT = 16  # cv2's fixed-point fraction bits in polygon filling


# ---- network ---------------------------------------------------------------------------------


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv without bias, BN, ReLU, under the names the official heads use."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    return nn.Sequential(OrderedDict([("conv", conv), ("bn", nn.BatchNorm2d(c_out)), ("relu", nn.ReLU())]))


class Residual(nn.Module):
    """conv3x3-BN-ReLU, conv3x3-BN, plus the input (through a 3x3 conv + BN when the
    stride or width changes), ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv_1 = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, stride=stride, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
        )
        self.conv_2 = nn.Sequential(nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.skip = None
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        skip = x if self.skip is None else self.skip(x)
        return F.relu(self.conv_2(self.conv_1(x)) + skip)


def residuals(c_in: int, c_out: int, n: int, widen_first: bool = True) -> nn.Sequential:
    """n residuals from c_in to c_out channels: the first changes the width (or the last)."""
    if widen_first:
        return nn.Sequential(Residual(c_in, c_out), *(Residual(c_out, c_out) for _ in range(n - 1)))
    return nn.Sequential(*(Residual(c_in, c_in) for _ in range(n - 1)), Residual(c_in, c_out))


class HourGlass(nn.Module):
    """One level: a full-resolution branch plus (max-pool, deeper levels, x2 bilinear
    upsampling with align_corners=True); `channels[i]` is the width at level i."""

    def __init__(self, levels: int, channels: tuple[int, ...], blocks: tuple[int, ...]):
        super().__init__()
        c0, c1 = channels[0], channels[1]
        self.up_1 = residuals(c0, c0, blocks[0])
        self.low_1 = residuals(c0, c1, blocks[0])
        self.low_2 = residuals(c1, c1, blocks[1]) if levels <= 1 else HourGlass(levels - 1, channels[1:], blocks[1:])
        self.low_3 = residuals(c1, c0, blocks[0], widen_first=False)

    def forward(self, x_BCHW):
        low = self.low_3(self.low_2(self.low_1(F.max_pool2d(x_BCHW, 2, 2))))
        return F.interpolate(low, scale_factor=2, mode="bilinear", align_corners=True) + self.up_1(x_BCHW)


class HourGlassNet(nn.Module):
    """hourglass-88: 256 channels at 1/4 of the input."""

    def __init__(self, levels: int = 3, channels=(256, 256, 256, 512), blocks=(2, 2, 2, 2), stacks: int = 2):
        super().__init__()
        self.pre = nn.Sequential(
            nn.Conv2d(3, 128, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(128), nn.ReLU(), Residual(128, 256, 2)
        )
        self.hourglass_blocks = nn.Sequential(*(HourGlass(levels, channels, blocks) for _ in range(stacks)))

    def forward(self, x_B3HW):
        return self.hourglass_blocks(self.pre(x_B3HW))


class WordDetector(nn.Module):
    def __init__(self, c_in: int = 256, width: int = 128):
        super().__init__()
        self.word_det_conv_final = conv_bn_relu(c_in, width)
        self.word_fg_feat = conv_bn_relu(width, width)
        self.word_regression_feat = conv_bn_relu(width, width)
        self.word_fg_pred = nn.Conv2d(width, 2, 1)
        self.word_tblr_pred = nn.Conv2d(width, 4, 1)
        self.orient_pred = nn.Conv2d(width, 1, 1)

    def forward(self, x):
        feat = self.word_det_conv_final(x)
        regression = self.word_regression_feat(feat)
        fg = self.word_fg_pred(self.word_fg_feat(feat))
        return fg, F.relu(self.word_tblr_pred(regression)) * 10.0, self.orient_pred(regression)


class CharDetector(nn.Module):
    def __init__(self, c_in: int = 256, width: int = 128):
        super().__init__()
        self.character_det_conv_final = conv_bn_relu(c_in, width)
        self.char_fg_feat = conv_bn_relu(width, width)
        self.char_regression_feat = conv_bn_relu(width, width)
        self.char_fg_pred = nn.Conv2d(width, 2, 1)
        self.char_tblr_pred = nn.Conv2d(width, 4, 1)

    def forward(self, x):
        feat = self.character_det_conv_final(x)
        fg = self.char_fg_pred(self.char_fg_feat(feat))
        return fg, F.relu(self.char_tblr_pred(self.char_regression_feat(feat))) * 10.0


class CharRecognizer(nn.Module):
    def __init__(self, c_in: int = 256, width: int = 128, classes: int = len(CHARS)):
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(c_in, width), conv_bn_relu(width, width), conv_bn_relu(width, width))
        self.classifier = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        return self.classifier(self.body(x))


class CharNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = HourGlassNet()
        self.word_detector = WordDetector()
        self.char_detector = CharDetector()
        self.char_recognizer = CharRecognizer()

    def forward(self, x_B3HW: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw maps at 1/4 of the input: logits, and distances already ReLU x 10 (in cells)."""
        features = self.backbone(x_B3HW)
        word_fg, word_tblr, word_orient = self.word_detector(features)
        char_fg, char_tblr = self.char_detector(features)
        return {
            "features": features,
            "word_fg_logits": word_fg,
            "word_tblr": word_tblr,
            "word_orient": word_orient,
            "char_fg_logits": char_fg,
            "char_tblr": char_tblr,
            "char_cls_logits": self.char_recognizer(features),
        }


def load_charnet(path: str | Path) -> CharNet:
    """The official `icdar2015_hourglass88.pth` (flat state_dict, weights_only), strictly, in eval mode."""
    model = CharNet()
    load_checked(model, read_state_dict(path), str(path))
    return model.eval()


# ---- the CLIP text encoder -------------------------------------------------------------------


class OcrNetwork(nn.Module):
    """CharNet and the CLIP text encoder, so that one `.to(device)` moves both."""

    def __init__(self, charnet: CharNet, text: nn.Module, tokenizer):
        super().__init__()
        self.charnet, self.text = charnet, text
        self.tokenizer = tokenizer


def load_text_encoder(source: str | Path):
    """(CLIPTextModelWithProjection in eval mode, CLIPTokenizer) from a local folder (a
    CLIPModel or CLIPTextModelWithProjection save) or a hub id, fetched, failing at once offline."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer
    from transformers.utils import logging as hf_logging

    folder = Path(source)
    if not folder.is_dir():
        if not is_hub_id(str(source)):
            raise FileNotFoundError(f"CLIP text encoder {source}: no such folder (expected a folder or a hub id)")
        what = f"the OCR expert's CLIP text encoder ({source})"
        for name in CLIP_FILES:
            folder = hub_file(str(source), name, what).parent
        hub_first_file(str(source), WEIGHT_FILES, what)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the hub folder holds the whole CLIP: its vision keys are expected extras
    try:
        model, info = CLIPTextModelWithProjection.from_pretrained(folder, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    log.info("CLIP text encoder from %s (%d unused keys, the vision tower)", folder, len(info["unexpected_keys"]))
    if info["missing_keys"] or info["mismatched_keys"]:
        raise CheckpointError(
            f"{folder}: not a CLIP text encoder with projection: missing {sorted(info['missing_keys'])[:5]}, "
            f"mismatched {sorted(info['mismatched_keys'])[:5]}"
        )
    return model.eval(), CLIPTokenizer.from_pretrained(folder)


def clip_clean(text: str) -> str:
    """What `clip.tokenize` feeds its BPE besides lower-casing: html unescaped twice, spaces squeezed."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


@torch.no_grad()
def word_features(texts: list[str], text_model: nn.Module, tokenizer, pca=None) -> torch.Tensor:
    """(N, 64): `(e - mean) @ components.T` for each text's projected end-of-text embedding `e`
    (`clip.encode_text`, unnormalised), in float32 on the CPU."""
    components, mean = pca if pca is not None else load_clip_pca()
    if not texts:
        return torch.zeros(0, components.shape[0])
    device = next(text_model.parameters()).device
    batch = tokenizer(
        [clip_clean(t) for t in texts], padding=True, truncation=True, max_length=CONTEXT, return_tensors="pt"
    )
    e_ND = text_model(**{k: v.to(device) for k, v in batch.items()}).text_embeds.float().cpu()
    return (e_ND - mean) @ components.T


# ---- geometry --------------------------------------------------------------------------------


def polygon_areas(poly_NK2: np.ndarray) -> np.ndarray:
    """Signed shoelace areas (positive when the vertices turn from +x towards +y)."""
    x, y = poly_NK2[..., 0], poly_NK2[..., 1]
    return 0.5 * (x * np.roll(y, -1, axis=-1) - np.roll(x, -1, axis=-1) * y).sum(-1)


def intersection_areas(clip_M2: np.ndarray, subjects_NK2: np.ndarray) -> np.ndarray:
    """Area of each subject polygon inside the convex polygon `clip_M2`, by
    Sutherland-Hodgman clipping (subjects may be concave), for all subjects at once."""
    clip = np.asarray(clip_M2, np.float64)
    poly = np.asarray(subjects_NK2, np.float64)
    n, k = poly.shape[:2]
    clip_area = polygon_areas(clip)
    if n == 0 or clip_area == 0:
        return np.zeros(n)
    if clip_area < 0:
        clip = clip[::-1]
    count = np.full(n, k)
    rows = np.arange(n)[:, None]
    for p, q in zip(clip, np.roll(clip, -1, axis=0)):
        slots = poly.shape[1]
        live = np.arange(slots) < count[:, None]
        nxt = poly[rows, (np.arange(slots) + 1) % np.maximum(count, 1)[:, None]]
        side = (q[0] - p[0]) * (poly[..., 1] - p[1]) - (q[1] - p[1]) * (poly[..., 0] - p[0])
        side_next = (q[0] - p[0]) * (nxt[..., 1] - p[1]) - (q[1] - p[1]) * (nxt[..., 0] - p[0])
        crosses = live & ((side >= 0) != (side_next >= 0))
        t = np.divide(side, side - side_next, out=np.zeros_like(side), where=crosses)[..., None]
        crossing = poly + t * (nxt - poly)
        # per edge: the crossing point (if it crosses), then the edge's end (if inside)
        out = np.stack([crossing, nxt], axis=2).reshape(n, 2 * slots, 2)
        keep = np.stack([crosses, live & (side_next >= 0)], axis=2).reshape(n, 2 * slots)
        count = keep.sum(1)
        poly = out[rows, np.argsort(~keep, axis=1, kind="stable")[:, : max(int(count.max()), 1)]]
    pad = np.arange(poly.shape[1]) >= count[:, None]
    poly = np.where(pad[..., None], poly[:, :1], poly)  # repeated first vertex: no area
    return np.abs(polygon_areas(poly))


def rotated_quads(x, y, t, b, l, r, angle, sx: float, sy: float) -> np.ndarray:
    """(N, 8) float32 corners (x1,y1, x2,y1, x2,y2, x1,y2) of the box t/b/l/r cells around
    cell (x, y), scaled to the original image and rotated by `angle` (radians) about the cell,
    in float64 as the official code computes them."""
    x1, y1, x2, y2 = sx * (x - l), sy * (y - t), sx * (x + r), sy * (y + b)
    cx, cy = sx * x, sy * y
    cos, sin = np.cos(angle.astype(np.float64)), np.sin(angle.astype(np.float64))
    corners = []
    for px, py in ((x1, y1), (x2, y1), (x2, y2), (x1, y2)):
        dx, dy = px - cx, py - cy
        corners += [cx + dx * cos - dy * sin, cy + dx * sin + dy * cos]
    return np.stack(corners, axis=1).astype(np.float32).reshape(-1, 8)


def polygon_nms(boxes_N9: np.ndarray, scores_NC: np.ndarray | None, iou_thresh: float, neighbour_iou: float = 0.5):
    """The official rotated NMS (num_neig=1): highest score first, it suppresses the
    remaining boxes of IoU > iou_thresh; it is kept only if some box has IoU > neighbour_iou
    with it, and then becomes the score-weighted mean of itself and those neighbours (so
    do the class scores). Returns (kept indices in score order, new boxes, new scores)."""
    quads = boxes_N9[:, :8].reshape(-1, 4, 2).astype(np.float64)
    areas = np.abs(polygon_areas(quads))
    lo, hi = quads.min(1), quads.max(1)
    new_boxes = np.zeros_like(boxes_N9)
    new_scores = None if scores_NC is None else np.zeros_like(scores_NC)
    order = boxes_N9[:, 8].argsort()[::-1]
    # The boxes still in play, best first. One of zero area has IoU 0 with every box: it is
    # never kept, never suppressed and suppresses nothing, so it is left out from the start.
    queue = order[areas[order] > 0]
    keep = []
    while len(queue):
        i, rest = queue[0], queue[1:]
        inter = np.zeros(len(rest))
        near = ~((lo[rest] > hi[i]).any(1) | (hi[rest] < lo[i]).any(1))  # bounding boxes overlap
        inter[near] = intersection_areas(quads[i], quads[rest[near]])
        union = areas[i] + areas[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        neighbours = rest[iou > neighbour_iou]
        queue = rest[~((union > 0) & (iou > iou_thresh))]
        if len(neighbours) == 0:
            continue
        group = np.append(neighbours, i)
        w = boxes_N9[group, 8].reshape(-1, 1)
        new_boxes[i, :8] = (boxes_N9[group, :8] * w).sum(axis=0) / w.sum()
        new_boxes[i, 8] = boxes_N9[i, 8]
        if scores_NC is not None:
            new_scores[i] = (scores_NC[group] * w).sum(axis=0) / w.sum()
        keep.append(i)
    return keep, new_boxes, new_scores


def round_and_clip(quads_N8: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Rounded (half to even) and clipped to the image, as the official boxes are."""
    w, h = size
    out = quads_N8.round()
    out[:, 0::2] = np.maximum(0, np.minimum(w - 1, out[:, 0::2]))
    out[:, 1::2] = np.maximum(0, np.minimum(h - 1, out[:, 1::2]))
    return out


def line_pixels(p0, p1) -> tuple[np.ndarray, np.ndarray]:
    """cv2's 8-connected line between integer points: walked from the left end, one pixel
    per step of the major axis, the minor coordinate rounded to nearest, halves towards the start."""
    (x0, y0), (x1, y1) = (p1, p0) if p1[0] < p0[0] else (p0, p1)
    dx, dy = x1 - x0, abs(y1 - y0)
    sign = -1 if y1 < y0 else 1
    major, minor = max(dx, dy), min(dx, dy)
    k = np.arange(major + 1)
    m = (2 * k * minor + major - 1) // (2 * major) if major else k
    return (x0 + m, y0 + sign * k) if dy > dx else (x0 + k, y0 + sign * m)


def fill_polygon(mask_HW: np.ndarray, poly_K2: np.ndarray, value) -> None:
    """Fill as cv2.fillPoly(mask, [int32 polygon], value) does: the outline's 8-connected
    lines plus, per row y, the pixels from ceil to floor of the even-odd crossings of the
    edges active on it (y0 <= y < y1), x stepped in 16.16 fixed point with a truncated slope."""
    h, w = mask_HW.shape
    pts = [(int(x), int(y)) for x, y in poly_K2]
    edges = []
    for (xa, ya), (xb, yb) in zip([pts[-1], *pts[:-1]], pts):
        xs, ys = line_pixels((xa, ya), (xb, yb))
        inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
        mask_HW[ys[inside], xs[inside]] = value
        if ya != yb:
            (xa, ya), (xb, yb) = sorted([(xa, ya), (xb, yb)], key=lambda p: p[1])
            num = (xb - xa) << XY_SHIFT
            slope = abs(num) // (yb - ya) * (1 if num >= 0 else -1)  # C division: towards zero
            edges.append((ya, yb, xa << XY_SHIFT, slope))
    if len(edges) < 2:
        return
    for y in range(max(min(e[0] for e in edges), 0), min(max(e[1] for e in edges), h)):
        xs = sorted(x + (y - y0) * slope for y0, y1, x, slope in edges if y0 <= y < y1)
        for left, right in zip(xs[0::2], xs[1::2]):
            a, b = max((left + (1 << XY_SHIFT) - 1) >> XY_SHIFT, 0), min(right >> XY_SHIFT, w - 1)
            if a <= b:
                mask_HW[y, a : b + 1] = value


# ---- post-processing -------------------------------------------------------------------------


@dataclass(frozen=True)
class PostProcessing:
    """The official defaults (charnet/config/defaults.py)."""

    word_min_score: float = 0.5
    word_nms_iou: float = 0.15
    char_min_score: float = 0.25
    char_nms_iou: float = 0.3
    stride: int = 4


@dataclass
class CharNetOutput:
    """One image's probabilities, as the official post-processing receives them."""

    word_fg_hw: np.ndarray  # P(word) per cell
    word_tblr_4hw: np.ndarray  # distances to the box sides, in cells
    word_orient_hw: np.ndarray  # radians
    char_fg_hw: np.ndarray
    char_tblr_4hw: np.ndarray
    char_cls_Chw: np.ndarray  # class probabilities
    input_hw: tuple[int, int]  # the network input's size


@dataclass
class Word:
    quad: np.ndarray  # (8,) float32, integral: x1,y1 .. x4,y4 in the original image
    score: float  # the word box's foreground score
    text: str  # upper case, as recognised (or the lexicon word it was corrected to)
    text_score: float


class Lexicon:
    """Words to correct recognised text to, by edit distance (case-insensitive)."""

    MAX_EDITS = 2  # the most the official rule ever accepts

    def __init__(self, words: list[str]):
        self.words = list(words)
        upper = [w.upper() for w in self.words]
        self.lengths = np.array([len(w) for w in upper], np.int64)
        self.codes = np.full((len(upper), max(self.lengths, default=0)), -1, np.int32)
        for i, word in enumerate(upper):
            self.codes[i, : len(word)] = [ord(c) for c in word]

    @classmethod
    def from_file(cls, path: str | Path) -> Lexicon:
        """One word a line, `#` lines skipped, surrounding white space stripped (as officially)."""
        with open(path, encoding="utf-8") as f:
            return cls([line.strip() for line in f if not line.startswith("#")])

    def distances(self, text: str, rows: np.ndarray) -> np.ndarray:
        """Levenshtein distance from `text` to the words `rows`, all at once: per character of
        `text`, a row of the DP table over every word's prefixes; the insertions of a row are a
        running minimum of (value - column) plus the column."""
        text = text.upper()
        codes = self.codes[rows, : self.lengths[rows].max(initial=0)]
        cols = np.arange(codes.shape[1] + 1)
        prev = np.broadcast_to(cols, (len(rows), len(cols)))
        for i, c in enumerate(text, 1):
            base = np.minimum(prev[:, :-1] + (codes != ord(c)), prev[:, 1:] + 1)
            base = np.concatenate([np.full((len(rows), 1), i), base], axis=1)
            prev = np.minimum.accumulate(base - cols, axis=1) + cols
        return prev[np.arange(len(rows)), self.lengths[rows]]

    def correct(self, text: str) -> str | None:
        """The official correction: the first word at the smallest distance replaces `text` (an
        exact match keeps `text`) if that distance is at most 0 / 1 / 2 for a word of length
        <= 2 / <= 5 / more; else None. Only words within MAX_EDITS in length can pass, so only
        they are compared; an empty lexicon corrects nothing."""
        rows = np.nonzero(np.abs(self.lengths - len(text.upper())) <= self.MAX_EDITS)[0]
        if len(rows) == 0:
            return None
        d = self.distances(text, rows)
        best = int(np.argmin(d))
        if d[best] == 0:
            return text
        word = self.words[rows[best]]
        return word if d[best] <= (0 if len(word) <= 2 else 1 if len(word) <= 5 else 2) else None


def keep_word(word: Word, lexicon: Lexicon) -> Word | None:
    """The official keep rules; a word the lexicon corrects takes the lexicon's spelling."""
    if word.text_score < 0.8:
        return None
    if (not word.text.isalpha() and word.text_score >= 0.9) or word.text_score >= 0.98:
        return word
    corrected = lexicon.correct(word.text)
    return None if corrected is None else Word(word.quad, word.score, corrected, word.text_score)


def read_words(raw: CharNetOutput, size: tuple[int, int], post: PostProcessing, lexicon: Lexicon) -> list[Word]:
    """The official OrientedTextPostProcessing for one image of original size (W, H):
    the kept words in word-NMS order (highest box score first)."""
    sx = size[0] / raw.input_hw[1] * post.stride
    sy = size[1] / raw.input_hw[0] * post.stride
    word_fg = raw.word_fg_hw > post.word_min_score
    rows, cols = np.nonzero(word_fg)
    t, b, l, r = raw.word_tblr_4hw[:, rows, cols]
    boxes = np.zeros((len(rows), 9), np.float32)
    boxes[:, :8] = rotated_quads(cols, rows, t, b, l, r, raw.word_orient_hw[rows, cols], sx, sy)
    boxes[:, 8] = raw.word_fg_hw[rows, cols]
    keep, boxes, _ = polygon_nms(boxes, None, post.word_nms_iou)
    words = boxes[keep]
    words[:, :8] = round_and_clip(words[:, :8], size)

    rows, cols = np.nonzero(word_fg & (raw.char_fg_hw > post.char_min_score))
    t, b, l, r = raw.char_tblr_4hw[:, rows, cols]
    chars = np.zeros((len(rows), 9), np.float32)
    chars[:, :8] = rotated_quads(cols, rows, t, b, l, r, np.zeros(len(rows), np.float32), sx, sy)
    chars[:, 8] = raw.char_fg_hw[rows, cols]
    keep, chars, char_scores = polygon_nms(chars, raw.char_cls_Chw[:, rows, cols].T.copy(), post.char_nms_iou)
    chars, char_scores = chars[keep], char_scores[keep]
    chars[:, :8] = round_and_clip(chars[:, :8], size)
    return [w for w in (keep_word(w, lexicon) for w in assemble(words, chars, char_scores)) if w is not None]


def assemble(words_N9: np.ndarray, chars_M9: np.ndarray, char_scores_MC: np.ndarray) -> list[Word]:
    """Each character joins the word of highest IoU (first on ties; none at IoU 0); a word's
    characters are read in the order of their mean corner x; words without characters go."""
    word_quads = words_N9[:, :8].reshape(-1, 4, 2)
    char_quads = chars_M9[:, :8].reshape(-1, 4, 2)
    word_areas = np.abs(polygon_areas(word_quads.astype(np.float64)))
    lo, hi = word_quads.min(1), word_quads.max(1)
    members = [[] for _ in range(len(words_N9))]
    for j, quad in enumerate(char_quads):
        c_lo, c_hi = quad.min(0), quad.max(0)
        near = np.nonzero(~((c_lo > hi).any(1) | (c_hi < lo).any(1)))[0]
        if len(near) == 0:
            continue
        inter = intersection_areas(quad, word_quads[near])
        union = abs(polygon_areas(quad.astype(np.float64))) + word_areas[near] - inter
        iou = np.zeros(len(words_N9), np.float32)
        iou[near] = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        best = int(np.argmax(iou))
        if iou[best] > 0:
            members[best].append(j)
    out = []
    for i, idx in enumerate(members):
        if not idx:
            continue
        x_M = (chars_M9[idx, :8].reshape(-1, 4, 2) - words_N9[i, 0:2]).mean(axis=1).dot(np.array([1, 0], np.float32))
        probs = char_scores_MC[idx][np.argsort(x_M)]
        best = probs.argmax(axis=1)
        text = "".join(CHARS[c].upper() for c in best)
        score = np.array(probs[np.arange(len(best)), best], dtype=np.float32).mean()
        out.append(Word(words_N9[i, :8].copy(), float(words_N9[i, 8]), text, float(score)))
    return out


def word_map(words: list[Word], size: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    """The official label: (H, W) uint8, 255 = no word, the words' quads filled in reverse
    order with ids 0, 1, ... (later fills win); their lower-cased texts in id order."""
    w, h = size
    ids = np.full((h, w), NONE_ID, np.uint8)
    texts = []
    for i, word in enumerate(words[:NONE_ID][::-1]):
        fill_polygon(ids, word.quad.reshape(4, 2).astype(np.int32), i)
        texts.append(word.text.lower())
    return ids, texts


class Generator(LabelNetwork):
    """OCR labels as `experts/generate_ocrdet.py` writes them (the protocol in experts/network.py).

    `clip`: the CLIP ViT-L/14 text encoder, a hub id (default) or a local folder;
    `lexicon`: a word list file for the correction (default none: see the module docstring)."""

    def __init__(
        self,
        expert: str = "ocr_detection",
        clip: str | Path = CLIP_ID,
        lexicon: str | Path | None = None,
        post: PostProcessing = PostProcessing(),
    ):
        super().__init__(expert)
        self.clip, self.post = clip, post
        self.lexicon = Lexicon.from_file(lexicon) if lexicon is not None else Lexicon([])
        self.model: OcrNetwork | None = None

    def load(self, weights: str | Path) -> OcrNetwork:
        """The CLIP text encoder (`self.clip`; first, so that a missing one fails at once),
        then CharNet from the official weight file."""
        text, tokenizer = load_text_encoder(self.clip)
        self.model = OcrNetwork(load_charnet(weights), text, tokenizer).eval()
        return self.model

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB -> 3 x 480 x 480: PIL bilinear resize, ToTensor, ImageNet normalisation."""
        resized = image.convert("RGB").resize((RESOLUTION, RESOLUTION), Image.BILINEAR)
        x_3HW = torch.from_numpy(np.asarray(resized, np.float32).transpose(2, 0, 1).copy()) / 255
        return (x_3HW - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)

    @torch.no_grad()
    def predict(self, model: OcrNetwork, x_B3HW: torch.Tensor) -> list[CharNetOutput]:
        """Per image the probabilities and maps the official post-processing takes, on the CPU."""
        out = model.charnet(x_B3HW)
        probs = {k: out[k].float().softmax(1).cpu().numpy() for k in ("word_fg_logits", "char_fg_logits")}
        cls = out["char_cls_logits"].float().softmax(1).cpu().numpy()
        maps = {k: out[k].float().cpu().numpy() for k in ("word_tblr", "word_orient", "char_tblr")}
        hw = tuple(x_B3HW.shape[-2:])
        return [
            CharNetOutput(
                probs["word_fg_logits"][i, 1],
                maps["word_tblr"][i],
                maps["word_orient"][i, 0],
                probs["char_fg_logits"][i, 1],
                maps["char_tblr"][i],
                cls[i],
                hw,
            )
            for i in range(len(x_B3HW))
        ]

    def to_label(self, raw: CharNetOutput, size: tuple[int, int]) -> Words:
        """The word-id map at the original (W, H) and {id: {"text", "features" (64,)}}."""
        if self.model is None:
            raise RuntimeError("Generator.load must run before to_label: the CLIP text encoder is loaded there")
        ids, texts = word_map(read_words(raw, size, self.post, self.lexicon), size)
        features = word_features(texts, self.model.text, self.model.tokenizer)
        return Words(ids, {i: {"text": t, "features": f} for i, (t, f) in enumerate(zip(texts, features))})
