"""The segmentation experts seg_coco and seg_ade: Mask2Former (Cheng et al., 2022)
with a Swin-L backbone (IN21k, 384), 200 queries, as Prismer runs it.

Network: transformers' `Mask2FormerForUniversalSegmentation` with a SwinConfig
(embed_dim 192, depths 2,2,18,2, heads 6,12,24,48, window 12), a deformable
pixel decoder (6 layers, FFN 1024) and a masked-attention transformer decoder
(9 layers + the initial prediction, FFN 2048). 133 classes (COCO panoptic:
80 things then 53 stuff) for seg_coco, 150 (ADE20K panoptic) for seg_ade.

Weights, either form (`Generator.load`):
- a file: the official detectron2 model-zoo pickle (`model_final_f07440.pkl`
  for seg_coco, `model_final_e0c58e.pkl` for seg_ade; a latin1 pickle of
  {'model': name -> numpy array, '__author__': ...}), read by an unpickler that
  admits numpy arrays and plain containers only, or a safetensors file with
  the same keys; renamed to transformers' keys by `RENAMES`.
- a directory or hub id: the Hugging Face conversions
  `facebook/mask2former-swin-large-coco-panoptic` (seg_coco) and
  `facebook/mask2former-swin-large-ade-panoptic` (seg_ade; `-ade-semantic` is
  another model), through from_pretrained.

Input: the image resized so that its short side is 479 px unless the long
side would pass 480 px, then the long side is 480 (640x480 -> 480x360), and fed
as **BGR** 0..255 normalised with the RGB statistics by channel index: the
model was trained on RGB, but Prismer calls the detectron2 model directly on
BGR arrays, which made the official labels. Each image is padded with zeros
(after normalisation) to multiples of 32 on its own; the official run padded
a batch of 4 images of different sizes to their common size, so its labels
also depended on the batch neighbours (padded pixels are valid to the pixel
decoder).

Labels: the official semantic inference (not transformers'
post_process_semantic_segmentation, which resizes masks to a fixed 384x384 and
keeps the padding): class probabilities without "no object" times mask
probabilities, summed over queries at the padded input size, cropped,
resized bilinearly to the original size, argmax -> uint8 class ids. The
official run used fp16 autocast on a GPU, so float32 labels differ along
class boundaries.

Cost, measured once on the project's 2-core CPU in float32 with full-size
synthetic weights: a 640x480 image (input 480x360) takes about 16 CPU-seconds
(preprocess, predict, to_label; 24 s wall on the shared machine); peak resident
memory 2.6 GB (ru_maxrss), of which 2.4 GB is reached while loading the weights.
The label of a 4000x3000 image (the same 480x360 input) takes 23 CPU-seconds
more and 0.35 GB: its class scores are resized and reduced a few classes at a time.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from common.files import CheckpointError, load_safetensors
from common.hub import hub_file, hub_first_file, is_hub_id
from common.weights import WEIGHT_FILES, load_checked
from experts.network import LabelNetwork

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    num_labels: int
    official_file: str  # the detectron2 model-zoo file
    hub_id: str  # its Hugging Face conversion


VARIANTS = {
    "seg_coco": Variant(133, "model_final_f07440.pkl", "facebook/mask2former-swin-large-coco-panoptic"),
    "seg_ade": Variant(150, "model_final_e0c58e.pkl", "facebook/mask2former-swin-large-ade-panoptic"),
}

SHORT_SIDE, MAX_SIDE = 479, 480  # the official torchvision Resize(size=479, max_size=480)
SIZE_DIVISIBILITY = 32
PIXEL_MEAN = (123.675, 116.28, 103.53)  # RGB statistics, applied to B, G, R by channel index
PIXEL_STD = (58.395, 57.12, 57.375)
LABEL_CHUNK_BYTES = 256 * 2**20  # class scores resized to the original size at once, at most

# ---- official (detectron2) keys -> transformers keys ---------------------------------------

E = "model.pixel_level_module.encoder."
D = "model.pixel_level_module.decoder."
T = "model.transformer_module."
BLOCK = r"backbone\.layers\.(\d+)\.blocks\.(\d+)\."
SWIN_BLOCK = E + r"swin.encoder.layers.\1.blocks.\2."
PIX = r"sem_seg_head\.pixel_decoder\."
PRED = r"sem_seg_head\.predictor\."

# (official key pattern, target): a target string is the transformers key (regex
# template); a tuple of three splits the tensor's rows in thirds (q, k, v); None
# drops the key (transformers recomputes it).
RENAMES: list[tuple[str, str | tuple[str, str, str] | None]] = [
    (r"backbone\.patch_embed\.proj\.(weight|bias)", E + r"swin.embeddings.patch_embeddings.projection.\1"),
    (r"backbone\.patch_embed\.norm\.(weight|bias)", E + r"swin.embeddings.norm.\1"),
    (BLOCK + r"norm1\.(weight|bias)", SWIN_BLOCK + r"layernorm_before.\3"),
    (BLOCK + r"norm2\.(weight|bias)", SWIN_BLOCK + r"layernorm_after.\3"),
    (BLOCK + r"attn\.qkv\.(weight|bias)", tuple(SWIN_BLOCK + f"attention.{p}_proj." + r"\3" for p in "qkv")),
    (BLOCK + r"attn\.proj\.(weight|bias)", SWIN_BLOCK + r"attention.o_proj.\3"),
    (
        BLOCK + r"attn\.relative_position_bias_table",
        SWIN_BLOCK + "attention.relative_position_bias.relative_position_bias_table",
    ),
    (BLOCK + r"attn\.relative_position_index", None),
    (BLOCK + r"mlp\.(fc1|fc2)\.(weight|bias)", SWIN_BLOCK + r"mlp.\3.\4"),
    (
        r"backbone\.layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)",
        E + r"swin.encoder.layers.\1.downsample.\2",
    ),
    *[(rf"backbone\.norm{i}\.(weight|bias)", E + rf"hidden_states_norms.stage{i + 1}.\1") for i in range(4)],
    (PIX + r"(adapter_1|layer_1)\.weight", D + r"\1.0.weight"),
    (PIX + r"(adapter_1|layer_1)\.norm\.(weight|bias)", D + r"\1.1.\2"),
    (PIX + r"input_proj\.(\d)\.([01])\.(weight|bias)", D + r"input_projections.\1.\2.\3"),
    (PIX + r"transformer\.level_embed", D + "level_embed"),
    (PIX + r"transformer\.encoder\.layers\.(\d+)\.linear1\.(weight|bias)", D + r"encoder.layers.\1.fc1.\2"),
    (PIX + r"transformer\.encoder\.layers\.(\d+)\.linear2\.(weight|bias)", D + r"encoder.layers.\1.fc2.\2"),
    (
        PIX + r"transformer\.encoder\.layers\.(\d+)\.norm1\.(weight|bias)",
        D + r"encoder.layers.\1.self_attn_layer_norm.\2",
    ),
    (PIX + r"transformer\.encoder\.layers\.(\d+)\.norm2\.(weight|bias)", D + r"encoder.layers.\1.final_layer_norm.\2"),
    (
        PIX + r"transformer\.encoder\.layers\.(\d+)\.self_attn\."
        r"((?:sampling_offsets|attention_weights|value_proj|output_proj)\.(?:weight|bias))",
        D + r"encoder.layers.\1.self_attn.\2",
    ),
    (PIX + r"mask_features\.(weight|bias)", D + r"mask_projection.\1"),
    (
        PRED + r"transformer_self_attention_layers\.(\d+)\.self_attn\.in_proj_(weight|bias)",
        tuple(T + rf"decoder.layers.\1.self_attn.{p}_proj." + r"\2" for p in "qkv"),
    ),
    (
        PRED + r"transformer_self_attention_layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)",
        T + r"decoder.layers.\1.self_attn.out_proj.\2",
    ),
    (
        PRED + r"transformer_self_attention_layers\.(\d+)\.norm\.(weight|bias)",
        T + r"decoder.layers.\1.self_attn_layer_norm.\2",
    ),
    (
        PRED + r"transformer_cross_attention_layers\.(\d+)\.multihead_attn\.((?:in_proj_|out_proj\.)(?:weight|bias))",
        T + r"decoder.layers.\1.cross_attn.\2",
    ),
    (
        PRED + r"transformer_cross_attention_layers\.(\d+)\.norm\.(weight|bias)",
        T + r"decoder.layers.\1.cross_attn_layer_norm.\2",
    ),
    (PRED + r"transformer_ffn_layers\.(\d+)\.linear1\.(weight|bias)", T + r"decoder.layers.\1.fc1.\2"),
    (PRED + r"transformer_ffn_layers\.(\d+)\.linear2\.(weight|bias)", T + r"decoder.layers.\1.fc2.\2"),
    (PRED + r"transformer_ffn_layers\.(\d+)\.norm\.(weight|bias)", T + r"decoder.layers.\1.final_layer_norm.\2"),
    (PRED + r"decoder_norm\.(weight|bias)", T + r"decoder.layernorm.\1"),
    (PRED + r"query_embed\.weight", T + "queries_embedder.weight"),
    (PRED + r"query_feat\.weight", T + "queries_features.weight"),
    (PRED + r"level_embed\.weight", T + "level_embed.weight"),
    (PRED + r"mask_embed\.layers\.(\d)\.(weight|bias)", T + r"decoder.mask_predictor.mask_embedder.\1.0.\2"),
    (PRED + r"class_embed\.(weight|bias)", r"class_predictor.\1"),
    (r"criterion\.empty_weight", "criterion.empty_weight"),
]
# The one transformers key no official key produces: SwinModel's final norm, which
# the backbone never applies (it normalises each stage with hidden_states_norms).
UNSET = (E + "swin.layernorm.weight", E + "swin.layernorm.bias")


def rename_official(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Official keys -> transformers keys; every key must match exactly one rule."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        hits = [(m, target) for pattern, target in RENAMES if (m := re.fullmatch(pattern, key))]
        if len(hits) != 1:
            raise CheckpointError(f"{source}: key {key!r} matches {len(hits)} renaming rules, expected 1")
        m, target = hits[0]
        if target is None:
            continue
        if isinstance(target, str):
            names, parts = [m.expand(target)], [tensor]
        else:
            if tensor.shape[0] % 3:
                raise CheckpointError(f"{source}: {key} has {tensor.shape[0]} rows, not q, k, v thirds")
            names, parts = [m.expand(t) for t in target], tensor.chunk(3, dim=0)
        for name, part in zip(names, parts):
            assert name not in out, f"two official keys produce {name}"
            out[name] = part
    return out


# ---- reading the official pickle without running its code ----------------------------------


def _numpy_globals() -> dict[tuple[str, str], object]:
    """What pickled numpy arrays need (any numpy version, protocols 2-5), and plain containers."""
    import codecs

    core = np._core if hasattr(np, "_core") else np.core
    allowed = {("collections", "OrderedDict"): OrderedDict, ("_codecs", "encode"): codecs.encode}
    for prefix in ("numpy.core", "numpy._core"):
        allowed |= {
            (f"{prefix}.multiarray", "_reconstruct"): core.multiarray._reconstruct,
            (f"{prefix}.multiarray", "scalar"): core.multiarray.scalar,
            (f"{prefix}.numeric", "_frombuffer"): core.numeric._frombuffer,
        }
    return allowed | {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}


class _ArrayUnpickler(pickle.Unpickler):
    """Admits numpy arrays and plain containers; anything else (a function a
    malicious file would call) is refused before it can run."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")
        self.path, self.allowed = path, _numpy_globals()

    def find_class(self, module: str, name: str):
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise CheckpointError(
            f"{self.path}: refused to unpickle {module}.{name} (a detectron2 weight file holds only numpy "
            f'arrays); if you trust the file, convert it on another machine with `python -c "import pickle, '
            f"numpy; from safetensors.numpy import save_file; m = pickle.load(open('{self.path.name}', 'rb'), "
            f"encoding='latin1')['model']; save_file({{k: numpy.ascontiguousarray(v) for k, v in m.items()}}, "
            f"'{self.path.stem}.safetensors')\"` and pass the .safetensors file"
        )


def read_official_pickle(path: str | Path) -> dict[str, torch.Tensor]:
    """The 'model' dict of a detectron2 model-zoo pickle, as tensors."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, path).load()
    except (CheckpointError, OSError):
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: not a detectron2 weight pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise CheckpointError(f"{path}: holds no 'model' dict, expected a detectron2 model-zoo file")
    out = {}
    for key, value in obj["model"].items():
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
            raise CheckpointError(f"{path}: {key!r} is not a numeric numpy array")
        out[key] = torch.from_numpy(np.require(value, requirements=["C", "W"]))
    return out


# ---- the network ---------------------------------------------------------------------------


def mask2former_config(num_labels: int):
    """Prismer's Mask2Former Swin-L configuration, in transformers' terms."""
    from transformers import Mask2FormerConfig, SwinConfig

    swin = SwinConfig(
        embed_dim=192,
        depths=[2, 2, 18, 2],
        num_heads=[6, 12, 24, 48],
        window_size=12,
        drop_path_rate=0.3,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return Mask2FormerConfig(
        backbone_config=swin,
        num_labels=num_labels,
        num_queries=200,
        decoder_layers=10,
        encoder_layers=6,
        encoder_feedforward_dim=1024,
        dim_feedforward=2048,
    )


def build_official(state: dict[str, torch.Tensor], num_labels: int, source: str) -> nn.Module:
    """The transformers model holding an official state dict (strict: every key used, every weight set)."""
    from transformers import Mask2FormerForUniversalSegmentation
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is loaded below; skips ~8 s of random init
        model = Mask2FormerForUniversalSegmentation(mask2former_config(num_labels))
    load_checked(model, rename_official(state, source), source, allow_missing=lambda k: k in UNSET)
    nn.init.ones_(model.get_parameter(UNSET[0]))  # unused, but must not stay uninitialised memory
    nn.init.zeros_(model.get_parameter(UNSET[1]))
    return model.eval()


def load_hf(weights: str | Path, num_labels: int) -> nn.Module:
    """A Hugging Face conversion from a local directory or a hub id (fails fast offline)."""
    from transformers import Mask2FormerForUniversalSegmentation

    folder = Path(weights)
    if not folder.is_dir():
        what = f"the Mask2Former conversion {weights}"
        hub_first_file(str(weights), WEIGHT_FILES, what)
        folder = hub_file(str(weights), "config.json", what).parent
    model, info = Mask2FormerForUniversalSegmentation.from_pretrained(folder, output_loading_info=True)
    missing = [k for k in info["missing_keys"] if k not in UNSET]
    if missing or info["mismatched_keys"]:
        raise CheckpointError(
            f"{folder}: does not fit Mask2FormerForUniversalSegmentation: missing {sorted(missing)[:5]}, "
            f"mismatched {sorted(info['mismatched_keys'])[:5]}"
        )
    if model.config.num_labels != num_labels:
        raise CheckpointError(f"{folder}: has {model.config.num_labels} classes, expected {num_labels}")
    return model.eval()


@dataclass
class Prediction:
    """One image's raw output: what the official semantic inference takes."""

    logits_QC: torch.Tensor  # class logits; the last class is "no object"
    masks_Qhw: torch.Tensor  # mask logits at 1/4 of the padded input
    padded_hw: tuple[int, int]  # the network's input size
    valid_hw: tuple[int, int]  # the resized image inside it


class Generator(LabelNetwork):
    """seg_coco and seg_ade: same network, different classes and weights."""

    def __init__(self, expert: str):
        super().__init__(expert)
        if expert not in VARIANTS:
            raise ValueError(f"{expert!r} is not a Mask2Former expert ({', '.join(VARIANTS)})")
        self.variant = VARIANTS[expert]

    def load(self, weights: str | Path | None = None) -> nn.Module:
        """A file: the official pickle or a safetensors file with its keys; a directory
        or hub id (default: this expert's): a Hugging Face conversion."""
        weights = weights or self.variant.hub_id
        path = Path(weights)
        if path.is_file():
            state = load_safetensors(path) if path.suffix == ".safetensors" else read_official_pickle(path)
            log.info("%s: official weights %s", self.expert.name, path)
            return build_official(state, self.variant.num_labels, str(path))
        if not path.is_dir() and not is_hub_id(str(weights), (".pkl", ".safetensors")):
            raise FileNotFoundError(
                f"{weights} does not exist (expected {self.variant.official_file}, a safetensors file with its keys, "
                f"a Hugging Face folder or hub id such as {self.variant.hub_id})"
            )
        log.info("%s: Hugging Face weights %s", self.expert.name, weights)
        return load_hf(weights, self.variant.num_labels)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> (3, h, w): resized (short side 479, long side <= 480), BGR, 0..255,
        normalised with the RGB statistics by channel index, not padded."""
        from torchvision.transforms import functional as TF

        resized = TF.resize(image.convert("RGB"), SHORT_SIDE, max_size=MAX_SIDE)
        x_hw3 = np.asarray(resized)[:, :, ::-1].astype(np.float32)
        x_3hw = torch.from_numpy(x_hw3.transpose(2, 0, 1).copy())
        return (x_3hw - torch.tensor(PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(PIXEL_STD).view(3, 1, 1)

    def predict(self, model: nn.Module, x_B3hw: torch.Tensor) -> list[Prediction]:
        """Pad with zeros to multiples of 32, run the network; per image its logits and masks."""
        h, w = x_B3hw.shape[-2:]
        hp, wp = (-(-s // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY for s in (h, w))
        out = model(pixel_values=F.pad(x_B3hw, (0, wp - w, 0, hp - h)))
        return [
            Prediction(logits, masks, (hp, wp), (h, w))
            for logits, masks in zip(out.class_queries_logits, out.masks_queries_logits)
        ]

    def to_label(self, raw: Prediction, size: tuple[int, int]) -> np.ndarray:
        """(H, W) uint8 class ids at the original size (W, H)."""
        return official_labels(raw, (size[1], size[0]))


def padded_scores(raw: Prediction) -> torch.Tensor:
    """(C, h, w) class scores of the official semantic inference, cropped to the image
    inside the padding, before the final resize."""
    masks_Qhw = F.interpolate(raw.masks_Qhw[None].float(), size=raw.padded_hw, mode="bilinear", align_corners=False)[0]
    probs_QC = raw.logits_QC.float().softmax(-1)[:, :-1]  # without "no object"
    scores_Chw = torch.einsum("qc,qhw->chw", probs_QC, masks_Qhw.sigmoid())
    return scores_Chw[:, : raw.valid_hw[0], : raw.valid_hw[1]]


def sem_seg(raw: Prediction, out_hw: tuple[int, int]) -> torch.Tensor:
    """The official (C, H, W) class scores at the original size, all at once."""
    return F.interpolate(padded_scores(raw)[None], size=out_hw, mode="bilinear", align_corners=False)[0]


def official_labels(raw: Prediction, out_hw: tuple[int, int], chunk_bytes: int = LABEL_CHUNK_BYTES) -> np.ndarray:
    """argmax of `sem_seg` over classes as uint8, without holding all of it."""
    return resized_argmax(padded_scores(raw), out_hw, chunk_bytes).cpu().numpy()


def resized_argmax(sem_Chw: torch.Tensor, out_hw: tuple[int, int], chunk_bytes: int) -> torch.Tensor:
    """argmax over classes of the bilinear resize of `sem_Chw` to `out_hw` (first index on
    ties), resizing a few classes at a time: exact, since each class resizes on its own,
    while the full (C, H, W) stack of a large original image would not fit in memory."""
    num_classes = sem_Chw.shape[0]
    assert num_classes <= 256, "class ids must fit uint8"
    per_chunk = max(1, chunk_bytes // (out_hw[0] * out_hw[1] * sem_Chw.element_size()))
    best_HW = best_id_HW = None
    for c0 in range(0, num_classes, per_chunk):
        up_kHW = F.interpolate(sem_Chw[None, c0 : c0 + per_chunk], size=out_hw, mode="bilinear", align_corners=False)[0]
        value_HW, index_HW = up_kHW.max(0)  # documented: the index of the first maximum
        if best_HW is None:
            best_HW, best_id_HW = value_HW, index_HW.to(torch.uint8)
        else:
            better = value_HW > best_HW  # strict: an earlier class keeps a tie
            best_HW = torch.where(better, value_HW, best_HW)
            best_id_HW = torch.where(better, (index_HW + c0).to(torch.uint8), best_id_HW)
    return best_id_HW
