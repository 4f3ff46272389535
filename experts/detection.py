"""The object-detection expert obj_detection: UniDet (Zhou et al., 2022), the unified
722-class Cascade R-CNN `Unified_learned_OCIM_RS200_6x+2x`, as Prismer runs it, in
plain PyTorch (torchvision.ops for roi_align and NMS; no detectron2).

Network (keys exactly those of the official file, no renaming):
- `backbone.bottom_up`: ResNeSt-200 (radix 2, deep stem 64-64-128, stride-2 blocks
  average-pool after the split-attention conv, average-pool shortcuts), 3/24/36/3
  blocks, outputs res3..res5. Written here rather than taken from timm: timm's
  ResNeSt keys (`conv1.0`, `layer1.0.downsample.1`, ...) would need a rename table
  for all 1824 backbone keys and a wrapper for detectron2's output dict, while the
  blocks themselves are ~60 lines. FrozenBN (stem, res2) and SyncBN are both plain
  BatchNorm2d in eval mode, which is the same function with the same buffers.
- `backbone.fpn_*`, `backbone.top_block`: FPN (256 channels, norm, no bias) on
  res3..res5, p6 = conv/2 on p5 and p7 = conv/2 on relu(p6).
- `proposal_generator.rpn_head`: RPN on p3..p7, 3 sizes x 3 ratios per location.
- `roi_heads`: three cascade stages, each 4 conv + 1 fc on 7x7 roi_align features
  of p3..p5, 723 sigmoid logits (the last, background, is dropped) and one
  class-agnostic box.

Weights: `Unified_learned_OCIM_RS200_6x+2x.pth` read with torch.load(weights_only=True)
(or a safetensors file with the same keys): the state dict at the top level or under
'model', `module.` stripped when every key has it, then loaded strictly; only the 16
FrozenBN `num_batches_tracked` counters may be absent (older detectron2 did not save them).

Input: resized with torchvision Resize(479, max_size=480), BGR 0..255, normalised by
channel index with the RGB statistics (Prismer feeds BGR to a network configured for
RGB), each image zero-padded to multiples of 32 on its own (the official run padded a
batch of 32 images to their common size; the padding reaches the RPN and ROI features).
Detections stay in resized-image coordinates, as the official run leaves them.

Labels (the official `get_mask_labels`): each detection's box as a rectangle,
near-duplicates dropped, overlaps resolved by containment or by the mean of the depth
expert's label inside each box (so the depth label of the same image is an input),
later instances painted over earlier ones, ids >= 255 lost in the 8-bit map, resized
NEAREST to the original size. The official run used fp16 autocast on a GPU.

Cost, measured once on the project's shared 2-core CPU in float32 with full-size
synthetic weights (random weights: 1000 proposals, 300 detections, the most there can be):
a 640x480 image (input 480x360, padded 480x384) takes about 24 CPU-seconds (36-41 s wall
on the loaded machine, ~0.03 images/s), of which the label ~1 s; loading the 0.48 GB file
takes ~3 CPU-seconds; peak resident memory 1.6 GB (ru_maxrss), reached while loading.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.ops import batched_nms, nms, roi_align

from common.files import CheckpointError, load_safetensors, load_torch
from common.labels.instance import Instances
from common.weights import load_checked
from experts.network import LabelNetwork

log = logging.getLogger(__name__)

OFFICIAL_FILE = "Unified_learned_OCIM_RS200_6x+2x.pth"
SHORT_SIDE, MAX_SIDE = 479, 480  # the official torchvision Resize(size=479, max_size=480)
SIZE_DIVISIBILITY = 32
PIXEL_MEAN = (123.68, 116.779, 103.939)  # RGB statistics, applied to B, G, R by channel index
PIXEL_STD = (58.393, 57.12, 57.375)

# RPN (p3..p7)
LEVELS = (3, 4, 5, 6, 7)
ANCHOR_SIZES = {lvl: [x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for lvl, x in zip(LEVELS, (32, 64, 128, 256, 512))}
ASPECT_RATIOS = (0.5, 1.0, 2.0)
PRE_NMS_TOPK, POST_NMS_TOPK, RPN_NMS_THRESH = 1000, 1000, 0.7
SCALE_CLAMP = math.log(1000.0 / 16)  # largest dw, dh before exp

# ROI heads (p3..p5)
ROI_LEVELS = (3, 4, 5)
POOLER_RESOLUTION = 7
CANONICAL_LEVEL, CANONICAL_BOX_SIZE = 4, 224
CASCADE_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
SCORE_THRESH, NMS_THRESH, DETECTIONS_PER_IMAGE = 0.5, 0.5, 300  # Prismer's threshold (the config says 1e-4)

DUPLICATE_IOU = 0.95  # a box whose rectangle overlaps a kept one more than this is dropped


@dataclass(frozen=True)
class Sizes:
    """The network's sizes: the official ResNeSt-200 UniDet, or a tiny one for tests."""

    blocks: tuple[int, int, int, int] = (3, 24, 36, 3)
    stem_width: int = 64  # stem: 3 -> w -> w -> 2w
    width: int = 64  # group width of res2, doubled per stage; block output = 4 x width
    channels: int = 256  # FPN, RPN and box-head convolutions
    fc_dim: int = 1024
    num_classes: int = 722


OFFICIAL = Sizes()


# ---- backbone: ResNeSt-200 ---------------------------------------------------------------


class ConvNorm(nn.Conv2d):
    """detectron2's Conv2d with a norm: a bias-free conv (`weight`) then `norm`."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0):
        super().__init__(c_in, c_out, kernel, stride, padding, bias=False)
        self.norm = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return self.norm(super().forward(x))


class SplitAttention(nn.Module):
    """ResNeSt's split-attention 3x3 conv, radix 2, one group: two conv branches
    weighted per channel by a softmax over the branches of an attention computed
    from their pooled sum."""

    radix = 2

    def __init__(self, width: int):
        super().__init__()
        inner = max(width * self.radix // 4, 32)
        self.width = width
        self.conv = nn.Conv2d(width, width * self.radix, 3, padding=1, groups=self.radix, bias=False)
        self.bn0 = nn.BatchNorm2d(width * self.radix)
        self.fc1 = nn.Conv2d(width, inner, 1)
        self.bn1 = nn.BatchNorm2d(inner)
        self.fc2 = nn.Conv2d(inner, width * self.radix, 1)

    def forward(self, x):
        x = F.relu(self.bn0(self.conv(x)))
        branches = torch.split(x, self.width, dim=1)
        pooled = F.adaptive_avg_pool2d(sum(branches), 1)
        attention = self.fc2(F.relu(self.bn1(self.fc1(pooled))))
        attention = attention.view(x.shape[0], self.radix, self.width).softmax(1).view(x.shape[0], -1, 1, 1)
        return sum(a * b for a, b in zip(torch.split(attention, self.width, dim=1), branches))


class Bottleneck(nn.Module):
    """1x1 -> split-attention 3x3 (-> 3x3/2 average pool) -> 1x1, plus a shortcut
    (average pool, then 1x1 conv where the channels change)."""

    def __init__(self, c_in: int, c_out: int, width: int, stride: int):
        super().__init__()
        self.stride = stride
        self.shortcut = ConvNorm(c_in, c_out, 1) if c_in != c_out else None
        self.conv1 = ConvNorm(c_in, width, 1)
        self.conv2 = SplitAttention(width)
        self.conv3 = ConvNorm(width, c_out, 1)

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(x)))
        if self.stride > 1:
            out = F.avg_pool2d(out, 3, self.stride, padding=1)
        out = self.conv3(out)
        if self.shortcut is not None:
            if self.stride > 1:
                x = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True, count_include_pad=False)
            x = self.shortcut(x)
        return F.relu(out + x)


class Stem(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1_1 = ConvNorm(3, width, 3, stride=2, padding=1)
        self.conv1_2 = ConvNorm(width, width, 3, padding=1)
        self.conv1_3 = ConvNorm(width, 2 * width, 3, padding=1)

    def forward(self, x):
        for conv in (self.conv1_1, self.conv1_2, self.conv1_3):
            x = F.relu(conv(x))
        return F.max_pool2d(x, 3, 2, padding=1)


class ResNeSt(nn.Module):
    """Stem and stages res2..res5 (strides 4, 8, 16, 32); returns res3..res5."""

    def __init__(self, sizes: Sizes):
        super().__init__()
        self.stem = Stem(sizes.stem_width)
        c_in = 2 * sizes.stem_width
        for i, blocks in enumerate(sizes.blocks):
            width = sizes.width * 2**i
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(c_in, 4 * width, width, stride=2 if i and not b else 1))
                c_in = 4 * width
            self.add_module(f"res{i + 2}", nn.Sequential(*stage))

    def forward(self, x_B3HW: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.res2(self.stem(x_B3HW))
        out = {}
        for name in ("res3", "res4", "res5"):
            x = out[name] = getattr(self, name)(x)
        return out


class TopBlock(nn.Module):
    """p6 and p7 from p5 (UniDet's LastLevelP6P7_P5)."""

    def __init__(self, channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(channels, channels, 3, 2, 1)
        self.p7 = nn.Conv2d(channels, channels, 3, 2, 1)


class FPN(nn.Module):
    def __init__(self, sizes: Sizes):
        super().__init__()
        for i, level in enumerate(ROI_LEVELS):
            c_in = 4 * sizes.width * 2 ** (i + 1)
            self.add_module(f"fpn_lateral{level}", ConvNorm(c_in, sizes.channels, 1))
            self.add_module(f"fpn_output{level}", ConvNorm(sizes.channels, sizes.channels, 3, padding=1))
        self.top_block = TopBlock(sizes.channels)
        self.bottom_up = ResNeSt(sizes)

    def pyramid(self, res: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """p3..p7 from res3..res5: top-down nearest x2 upsampling plus lateral 1x1 convs."""
        top_down = self.fpn_lateral5(res["res5"])
        out = {"p5": self.fpn_output5(top_down)}
        for level in (4, 3):
            lateral = getattr(self, f"fpn_lateral{level}")(res[f"res{level}"])
            top_down = lateral + F.interpolate(top_down, scale_factor=2.0, mode="nearest")
            out[f"p{level}"] = getattr(self, f"fpn_output{level}")(top_down)
        out["p6"] = self.top_block.p6(out["p5"])
        out["p7"] = self.top_block.p7(F.relu(out["p6"]))
        return {f"p{level}": out[f"p{level}"] for level in LEVELS}

    def forward(self, x_B3HW: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.pyramid(self.bottom_up(x_B3HW))


# ---- boxes ---------------------------------------------------------------------------------


def apply_deltas(deltas_N4: torch.Tensor, boxes_N4: torch.Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """detectron2's Box2BoxTransform: (dx, dy, dw, dh) / weights applied to (x1, y1, x2, y2)
    boxes, dw and dh clamped at log(1000/16)."""
    deltas_N4 = deltas_N4.float()
    boxes_N4 = boxes_N4.to(deltas_N4.dtype)
    widths = boxes_N4[:, 2] - boxes_N4[:, 0]
    heights = boxes_N4[:, 3] - boxes_N4[:, 1]
    ctr_x = boxes_N4[:, 0] + 0.5 * widths
    ctr_y = boxes_N4[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dw = torch.clamp(deltas_N4[:, 2] / ww, max=SCALE_CLAMP)
    dh = torch.clamp(deltas_N4[:, 3] / wh, max=SCALE_CLAMP)
    pred_ctr_x = deltas_N4[:, 0] / wx * widths + ctr_x
    pred_ctr_y = deltas_N4[:, 1] / wy * heights + ctr_y
    pred_w = torch.exp(dw) * widths
    pred_h = torch.exp(dh) * heights
    return torch.stack(
        (pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h, pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h),
        dim=-1,
    )


def clip(boxes_N4: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    h, w = image_hw
    return torch.stack([boxes_N4[:, i].clamp(min=0, max=(w, h)[i % 2]) for i in range(4)], dim=-1)


def nonempty(boxes_N4: torch.Tensor) -> torch.Tensor:
    return (boxes_N4[:, 2] - boxes_N4[:, 0] > 0) & (boxes_N4[:, 3] - boxes_N4[:, 1] > 0)


def cell_anchors(level: int) -> torch.Tensor:
    """(9, 4) anchors centred on 0, index = size index * 3 + ratio index."""
    out = []
    for size in ANCHOR_SIZES[level]:
        for ratio in ASPECT_RATIOS:
            w = math.sqrt(size**2.0 / ratio)
            h = ratio * w
            out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(out)


def grid_anchors(level: int, hw: tuple[int, int], device=None) -> torch.Tensor:
    """(h * w * 9, 4) anchors of one level, ordered (y, x, anchor), centred on (x, y) * stride."""
    stride = 2**level
    shifts_x = torch.arange(0, hw[1] * stride, step=stride, dtype=torch.float32, device=device)
    shifts_y = torch.arange(0, hw[0] * stride, step=stride, dtype=torch.float32, device=device)
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
    return (shifts.view(-1, 1, 4) + cell_anchors(level).to(device).view(1, -1, 4)).reshape(-1, 4)


# ---- RPN -----------------------------------------------------------------------------------


class RPNHead(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        anchors = len(ASPECT_RATIOS) * 3
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.objectness_logits = nn.Conv2d(channels, anchors, 1)
        self.anchor_deltas = nn.Conv2d(channels, anchors * 4, 1)

    def forward(self, features: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per level: logits (B, 9, h, w) and deltas (B, 36, h, w)."""
        out = []
        for x in features:
            x = F.relu(self.conv(x))
            out.append((self.objectness_logits(x), self.anchor_deltas(x)))
        return out


@dataclass
class Proposals:
    boxes_N4: torch.Tensor
    logits_N: torch.Tensor


class RPN(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.rpn_head = RPNHead(channels)

    def forward(self, features: dict[str, torch.Tensor], image_hw: tuple[int, int]) -> list[Proposals]:
        levels = [features[f"p{level}"] for level in LEVELS]
        heads = self.rpn_head(levels)
        anchors = [grid_anchors(level, x.shape[-2:], x.device) for level, x in zip(LEVELS, levels)]
        return find_top_proposals(heads, anchors, image_hw)


def find_top_proposals(heads, anchors: list[torch.Tensor], image_hw: tuple[int, int]) -> list[Proposals]:
    """Per image: the top 1000 anchors of each level by logit, decoded, clipped to the
    image, empty boxes dropped, NMS 0.7 within each level, the best 1000 overall."""
    batch = heads[0][0].shape[0]
    boxes, logits, level_ids = [], [], []
    for i, ((logits_BAhw, deltas_B4Ahw), anchors_M4) in enumerate(zip(heads, anchors)):
        logits_BM = logits_BAhw.permute(0, 2, 3, 1).flatten(1)
        b, _, h, w = deltas_B4Ahw.shape
        deltas_BM4 = deltas_B4Ahw.view(b, -1, 4, h, w).permute(0, 3, 4, 1, 2).flatten(1, -2)
        top_logits, top = logits_BM.topk(min(logits_BM.shape[1], PRE_NMS_TOPK), dim=1)
        decoded = [apply_deltas(deltas_BM4[n, top[n]], anchors_M4[top[n]]) for n in range(batch)]
        boxes.append(torch.stack(decoded))
        logits.append(top_logits)
        level_ids.append(torch.full((top.shape[1],), i, dtype=torch.int64, device=top.device))
    boxes_BK4, logits_BK, level_K = torch.cat(boxes, 1), torch.cat(logits, 1), torch.cat(level_ids)
    out = []
    for n in range(batch):
        b, s, lvl = boxes_BK4[n], logits_BK[n], level_K
        valid = torch.isfinite(b).all(dim=1) & torch.isfinite(s)
        b, s, lvl = b[valid], s[valid], lvl[valid]
        b = clip(b, image_hw)
        keep = nonempty(b)
        b, s, lvl = b[keep], s[keep], lvl[keep]
        keep = batched_nms(b.float(), s.float(), lvl, RPN_NMS_THRESH)[:POST_NMS_TOPK]
        out.append(Proposals(b[keep], s[keep]))
    return out


# ---- ROI heads -----------------------------------------------------------------------------


class BoxHead(nn.Module):
    def __init__(self, sizes: Sizes):
        super().__init__()
        for i in range(1, 5):
            self.add_module(f"conv{i}", ConvNorm(sizes.channels, sizes.channels, 3, padding=1))
        self.fc1 = nn.Linear(sizes.channels * POOLER_RESOLUTION**2, sizes.fc_dim)

    def forward(self, x_RCPP):
        for i in range(1, 5):
            x_RCPP = F.relu(getattr(self, f"conv{i}")(x_RCPP))
        return F.relu(self.fc1(x_RCPP.flatten(1)))


class BoxPredictor(nn.Module):
    def __init__(self, sizes: Sizes):
        super().__init__()
        self.cls_score = nn.Linear(sizes.fc_dim, sizes.num_classes + 1)
        self.bbox_pred = nn.Linear(sizes.fc_dim, 4)  # class-agnostic

    def forward(self, x):
        return self.cls_score(x), self.bbox_pred(x)


@dataclass
class Detections:
    """One image's detections, best first, in the coordinates of the resized image."""

    boxes_N4: torch.Tensor  # x1, y1, x2, y2
    scores_N: torch.Tensor
    classes_N: torch.Tensor  # 0..721, the unified label space
    image_hw: tuple[int, int]  # the resized image (the network input before padding)


class CascadeROIHeads(nn.Module):
    def __init__(self, sizes: Sizes):
        super().__init__()
        self.box_head = nn.ModuleList(BoxHead(sizes) for _ in CASCADE_WEIGHTS)
        self.box_predictor = nn.ModuleList(BoxPredictor(sizes) for _ in CASCADE_WEIGHTS)

    @staticmethod
    def pool(features: dict[str, torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        """(R, C, 7, 7) roi_align (aligned) features, each box from the level
        floor(4 + log2(sqrt(area) / 224)) clamped to p3..p5."""
        boxes_R4 = torch.cat(boxes)
        index = torch.repeat_interleave(
            torch.arange(len(boxes), dtype=boxes_R4.dtype, device=boxes_R4.device),
            torch.tensor([len(b) for b in boxes], device=boxes_R4.device),
        )
        rois_R5 = torch.cat([index[:, None], boxes_R4], dim=1)
        area = (boxes_R4[:, 2] - boxes_R4[:, 0]) * (boxes_R4[:, 3] - boxes_R4[:, 1])
        level = torch.floor(CANONICAL_LEVEL + torch.log2(torch.sqrt(area) / CANONICAL_BOX_SIZE + 1e-8))
        level = level.clamp(min=ROI_LEVELS[0], max=ROI_LEVELS[-1]).to(torch.int64)
        first = features[f"p{ROI_LEVELS[0]}"]
        out = first.new_zeros((len(boxes_R4), first.shape[1], POOLER_RESOLUTION, POOLER_RESOLUTION))
        for lvl in ROI_LEVELS:
            x = features[f"p{lvl}"]
            inds = torch.nonzero(level == lvl).squeeze(1)
            pooled = roi_align(x, rois_R5[inds].to(x.dtype), POOLER_RESOLUTION, 1.0 / 2**lvl, 0, aligned=True)
            out.index_put_((inds,), pooled.to(out.dtype))
        return out

    def stage(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor], k: int):
        """Cascade stage k on per-image boxes: class logits (R, 723) and box deltas (R, 4)."""
        return self.box_predictor[k](self.box_head[k](self.pool(features, boxes)))

    def boxes_and_scores(self, features, proposals: list[Proposals], image_hw: tuple[int, int]):
        """Per image: the last stage's boxes (R, 4) and the class scores (R, 723). Each stage
        refines the previous stage's boxes (clipped); the scores are the sigmoid of each
        stage's logits, averaged over the stages."""
        boxes = [p.boxes_N4 for p in proposals]
        counts = [len(b) for b in boxes]
        probs = []
        for k, weights in enumerate(CASCADE_WEIGHTS):
            logits, deltas = self.stage(features, boxes, k)
            refined = apply_deltas(deltas, torch.cat(boxes), weights).split(counts)
            probs.append(logits.float().sigmoid())
            boxes = [clip(b, image_hw) for b in refined]  # the next stage's proposals
        return list(zip(refined, (sum(probs) * (1.0 / len(CASCADE_WEIGHTS))).split(counts)))

    def forward(self, features, proposals: list[Proposals], image_hw: tuple[int, int]) -> list[Detections]:
        return [fast_rcnn_inference(b, s, image_hw) for b, s in self.boxes_and_scores(features, proposals, image_hw)]


def nms_per_class(boxes_N4: torch.Tensor, scores_N: torch.Tensor, classes_N: torch.Tensor, thresh: float):
    """torchvision's batched_nms as it runs here (one nms per class, boxes in index order;
    kept indices by descending score), without scanning all pairs once per class: with
    random weights ~1e5 (box, class) pairs pass the threshold and that scan takes seconds."""
    order = torch.argsort(classes_N, stable=True)
    keep = torch.zeros_like(classes_N, dtype=torch.bool)
    for members in torch.split(order, torch.unique_consecutive(classes_N[order], return_counts=True)[1].tolist()):
        keep[members[nms(boxes_N4[members], scores_N[members], thresh)]] = True
    kept = torch.nonzero(keep).squeeze(1)
    return kept[scores_N[kept].sort(descending=True)[1]]


def fast_rcnn_inference(
    boxes_R4: torch.Tensor, scores_RC: torch.Tensor, image_hw: tuple[int, int], score_thresh: float = SCORE_THRESH
) -> Detections:
    """detectron2's fast_rcnn_inference + detector_postprocess at scale 1: every
    (box, class) pair scoring above the threshold (background column dropped), NMS 0.5
    within each class, the best 300, empty boxes dropped."""
    valid = torch.isfinite(boxes_R4).all(dim=1) & torch.isfinite(scores_RC).all(dim=1)
    boxes_R4, scores_RC = boxes_R4[valid], scores_RC[valid, :-1]
    boxes_R4 = clip(boxes_R4, image_hw)
    candidates = scores_RC > score_thresh
    pairs = candidates.nonzero()
    boxes, scores, classes = boxes_R4[pairs[:, 0]], scores_RC[candidates], pairs[:, 1]
    keep = nms_per_class(boxes.float(), scores, classes, NMS_THRESH)[:DETECTIONS_PER_IMAGE]
    boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    keep = nonempty(boxes)
    return Detections(boxes[keep], scores[keep], classes[keep], image_hw)


class UniDet(nn.Module):
    """UnifiedRCNN at inference: backbone + FPN, RPN, cascade ROI heads."""

    def __init__(self, sizes: Sizes = OFFICIAL):
        super().__init__()
        self.backbone = FPN(sizes)
        self.proposal_generator = RPN(sizes.channels)
        self.roi_heads = CascadeROIHeads(sizes)

    def forward(self, x_B3HW: torch.Tensor, image_hw: tuple[int, int]) -> list[Detections]:
        """x: normalised, padded to multiples of 32; image_hw: the image inside the padding."""
        features = self.backbone(x_B3HW)
        return self.roi_heads(features, self.proposal_generator(features, image_hw), image_hw)


# ---- the official weight file --------------------------------------------------------------


def frozen_counters(keys) -> list[str]:
    """The num_batches_tracked keys of the FrozenBN modules (stem, res2): only newer
    detectron2 versions save them."""
    prefixes = ("backbone.bottom_up.stem.", "backbone.bottom_up.res2.")
    return [k for k in keys if k.startswith(prefixes) and k.endswith(".num_batches_tracked")]


def official_state(obj, source: str) -> dict[str, torch.Tensor]:
    """What detectron2's checkpointer takes from a loaded file: the dict under 'model' if
    there is one, else the whole dict; numpy arrays as tensors; `module.` stripped when
    every key has it."""
    if isinstance(obj, dict) and "model" in obj:
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{source}: holds no state dict (a {type(obj).__name__}), expected UniDet weights")
    state = {}
    for key, value in obj.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: {key!r} is a {type(value).__name__}, expected a tensor")
        state[key] = value
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def build(state: dict[str, torch.Tensor], source: str, sizes: Sizes = OFFICIAL) -> UniDet:
    """The network holding `state`, strictly (only the FrozenBN counters may be absent), in eval mode."""
    with torch.device("meta"):
        model = UniDet(sizes)
    model = model.to_empty(device="cpu")  # every tensor is set below; skips ~120M random draws
    state = dict(state)
    for key in frozen_counters(model.state_dict()):
        state.setdefault(key, torch.zeros((), dtype=torch.long))
    load_checked(model, state, source)
    return model.eval()


def read_official(path: str | Path) -> dict[str, torch.Tensor]:
    """The official .pth (weights-only torch.load) or a safetensors file with its keys."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return official_state(load_safetensors(path), str(path))
    return official_state(load_torch(path, "a weights-only torch checkpoint"), str(path))


# ---- labels: the official get_mask_labels --------------------------------------------------


def resized_depth(path: str | Path, image_hw: tuple[int, int]) -> torch.Tensor:
    """(h, w) depth label in [0, 1] (brighter = nearer) at the resized image's size: PIL
    bilinear, what the official Resize rule does to a depth label of the image's own size."""
    from torchvision.transforms import functional as TF

    with Image.open(path) as img:
        depth = TF.resize(img.convert("L"), list(image_hw))
    return torch.tensor(np.array(depth)).float() / 255.0


class Rect(NamedTuple):
    """Rows y0:y1 and columns x0:x1 of the map (y1 >= y0, x1 >= x0; empty if equal)."""

    y0: int
    y1: int
    x0: int
    x1: int

    @classmethod
    def of_box(cls, box: list[float], hw: tuple[int, int]) -> Rect:
        """What `mask[int(y1):int(y2), int(x1):int(x2)]` selects."""
        rows, cols = range(hw[0])[int(box[1]) : int(box[3])], range(hw[1])[int(box[0]) : int(box[2])]
        return cls(rows.start, max(rows.start, rows.stop), cols.start, max(cols.start, cols.stop))

    @property
    def area(self) -> int:
        return (self.y1 - self.y0) * (self.x1 - self.x0)

    def overlap(self, other: Rect) -> Rect:
        y0, x0 = max(self.y0, other.y0), max(self.x0, other.x0)
        return Rect(y0, max(y0, min(self.y1, other.y1)), x0, max(x0, min(self.x1, other.x1)))

    def within(self, outer: Rect) -> tuple[slice, slice]:
        """This rectangle's place in an array covering `outer`."""
        return slice(self.y0 - outer.y0, self.y1 - outer.y0), slice(self.x0 - outer.x0, self.x1 - outer.x0)

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


def get_mask_labels(
    depth_HW: torch.Tensor, boxes_N4: torch.Tensor, classes_N: torch.Tensor
) -> tuple[torch.Tensor, dict[int, int]]:
    """Prismer's `get_mask_labels` (generate_objdet.py), same result: an (H, W) float map of
    instance ids (255 = none) and {instance id: class id}.

    Each mask is a rectangle, so the official full-image mask arithmetic is done on
    rectangles and on each working mask's own rectangle (a working mask only ever loses
    pixels inside its rectangle; its values are small integers, exact in any order); the
    IoU ratios and the mean depths are float32 as in the official code, so every decision
    is the same.
    1. In score order, a box whose rectangle has IoU > 0.95 with a kept one is dropped.
    2. For each kept pair i < j (changes accumulate): a rectangle inside the other is in
       front of it; otherwise the one with the larger mean depth (nearer) keeps the overlap.
    3. Instances paint in order, later over earlier, where their working mask is > 0."""
    hw = tuple(depth_HW.shape)
    rects: list[Rect] = []
    classes: list[int] = []
    for box, cls in zip(boxes_N4.tolist(), classes_N.tolist()):
        rect = Rect.of_box(box, hw)
        if rects:
            inter = torch.tensor([rect.overlap(r).area for r in rects])
            union = torch.tensor([rect.area + r.area for r in rects]) - inter
            if (inter / union > DUPLICATE_IOU).any():  # int64 / int64: float32, as the official ratio
                continue
        rects.append(rect)
        classes.append(cls)

    mean_depth = []
    mask = torch.zeros_like(depth_HW)
    for rect in rects:  # the official full-image float32 sum (its rounding), over the exact count
        mask[rect.slices] = 1
        mean_depth.append(((depth_HW * mask).sum() / rect.area).item())
        mask[rect.slices] = 0
    work = [np.ones((r.y1 - r.y0, r.x1 - r.x0), np.float32) for r in rects]
    for i in range(len(rects) - 1):
        for j in range(i + 1, len(rects)):
            inter = rects[i].overlap(rects[j])
            if not inter.area:
                continue
            if inter.area == rects[i].area:  # i inside j
                work[j][rects[i].within(rects[j])] -= work[i]
            elif inter.area == rects[j].area:  # j inside i
                work[i][rects[j].within(rects[i])] -= work[j]
            elif mean_depth[i] > mean_depth[j]:  # i nearer
                work[j][inter.within(rects[j])] -= 1
            elif mean_depth[i] < mean_depth[j]:
                work[i][inter.within(rects[i])] -= 1

    final_HW = np.full(hw, 255, np.float32)
    for i, (rect, mask_i) in enumerate(zip(rects, work)):
        final_HW[rect.slices][mask_i > 0] = i
    return torch.from_numpy(final_HW), dict(enumerate(classes))


def instance_label(final_HW: torch.Tensor, classes: dict[int, int], size: tuple[int, int]) -> Instances:
    """The official PNG: the float map as Pillow's 'F' -> 'L' (ids >= 255 become 255),
    resized NEAREST to the original (W, H); every kept instance keeps its class."""
    ids = Image.fromarray(final_HW.numpy()).convert("L").resize(size, resample=Image.Resampling.NEAREST)
    return Instances(np.asarray(ids).copy(), classes)


class Generator(LabelNetwork):
    """obj_detection: an instance map and its classes, from the detections and the depth label."""

    uses_labels = ("depth",)

    def load(self, weights: str | Path) -> UniDet:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"{weights} does not exist (expected {OFFICIAL_FILE} or a safetensors file with its keys)"
            )
        log.info("%s: official weights %s", self.expert.name, path)
        return build(read_official(path), str(path))

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> (3, h, w): resized (short side 479, long side <= 480), BGR, 0..255,
        normalised with the RGB statistics by channel index, not padded."""
        from torchvision.transforms import functional as TF

        resized = TF.resize(image.convert("RGB"), SHORT_SIDE, max_size=MAX_SIDE)
        x_3hw = torch.from_numpy(np.asarray(resized)[:, :, ::-1].astype(np.float32).transpose(2, 0, 1).copy())
        return (x_3hw - torch.tensor(PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(PIXEL_STD).view(3, 1, 1)

    def predict(self, model: UniDet, x_B3hw: torch.Tensor) -> list[Detections]:
        """Zero-pad to multiples of 32 and detect; detections on the CPU."""
        h, w = x_B3hw.shape[-2:]
        hp, wp = (-(-s // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY for s in (h, w))
        found = model(F.pad(x_B3hw, (0, wp - w, 0, hp - h)), (h, w))
        return [Detections(d.boxes_N4.cpu(), d.scores_N.cpu(), d.classes_N.cpu(), (h, w)) for d in found]

    def to_label(self, raw: Detections, size: tuple[int, int], *, depth: Path) -> Instances:
        """The instance map at the original (W, H) and its classes; `depth`: the depth
        label of the same image (a grey PNG at the original size)."""
        final_HW, classes = get_mask_labels(resized_depth(depth, raw.image_hw), raw.boxes_N4, raw.classes_N)
        return instance_label(final_HW, classes, size)
