"""The depth expert: DPT-Hybrid (Ranftl et al., 2021), MiDaS v3 `dpt_hybrid`, as Prismer runs it.

- Network: a ResNet-50 (3 stages) + ViT-B/16 hybrid encoder built from timm's
  `vit_base_r50_s16_384` parts (ResNetV2 without pre-activation, StdConv2dSame
  with eps 1e-8 and TF 'same' padding, GroupNorm(32); ViT-B blocks with
  LayerNorm eps 1e-6), DPT's reassembly (readout 'project') of ResNet stages 1
  and 2 and transformer blocks 8 and 11 (before the final norm), four fusion
  blocks and a head ending in a ReLU. Output: relative inverse depth (larger =
  nearer) at the input's H x W, both multiples of 32.
- Official weights: `dpt_hybrid-midas-501f0c75.pt`, a flat state_dict
  (`pretrained.*`, `scratch.*`, 368 keys) whose keys are this module's, loaded
  strictly. Three parts of it never reach the output, as in the original
  network: `pretrained.model.norm` and `pretrained.model.head` (the ViT's
  final norm and ImageNet classifier; DPT reads the blocks' outputs) and
  `scratch.refinenet4.resConfUnit1` (refinenet4 has no skip input). They are
  kept as modules so that the file loads strictly.
- Hugging Face format: `Intel/dpt-hybrid-midas` (transformers'
  `DPTForDepthEstimation`, hybrid config), a local folder (config.json +
  model.safetensors or pytorch_model.bin) or a hub id; its keys are renamed to
  the official ones by the table `HF_TO_OFFICIAL`. That file lacks the unused
  classifier (left at zero here) and its config says LayerNorm eps 1e-12,
  which is ignored: the official network uses 1e-6.
- Input: RGB resized to 480 x 480 (bilinear, antialiased), (x - 0.5) / 0.5.
- Cost on CPU, float32, one 480 x 480 image (measured once): 12.6 CPU-seconds
  (wall 16-26 s on a busy 2-core box, about 6.5 s with both cores free);
  peak resident memory 1.6 GB: 1.2 GB once loaded (weights 0.49 GB), +0.4 GB
  during the forward pass.

Why not transformers' `DPTForDepthEstimation`, which has the same layers: its
hybrid embeddings refuse any input size but `config.image_size`, which the
577-token position embedding ties to 384, and `DPTModel` never passes
`interpolate_pos_encoding`, so the official 480 x 480 input (and the 128 x 128
reference) cannot run; no config field changes that. Its format is still read.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from timm.layers import GroupNormAct, StdConv2dSame
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import Block
from torch import nn

from common.files import CheckpointError
from common.hub import hub_file, hub_first_file, is_hub_id
from common.weights import WEIGHT_FILES, load_checked, read_state_dict
from experts.network import LabelNetwork

log = logging.getLogger(__name__)

RESOLUTION = 480  # the official generation resizes every image to 480 x 480
PATCH = 16  # the ResNet's stride: one token per 16 x 16 pixels
HF_ID = "Intel/dpt-hybrid-midas"


@dataclass(frozen=True)
class DPTSizes:
    """Sizes of the network; the defaults are the official ones (MiDaS 'vitb_rn50_384')."""

    stem: int = 64
    stages: tuple[int, ...] = (3, 4, 9)  # bottleneck blocks per ResNet stage
    stage_channels: tuple[int, ...] = (256, 512, 1024)
    groups: int = 32  # GroupNorm groups in the ResNet
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp: int = 3072
    grid: int = 24  # the position embedding's grid (384 / 16), resized to the input's
    taps: tuple[int, int] = (8, 11)  # the transformer blocks whose outputs feed the decoder
    features: int = 256  # the decoder's width
    classes: int = 1000  # the unused ImageNet classifier


class HybridViT(nn.Module):
    """timm's R50+ViT-B/16 hybrid (parameter names as timm's VisionTransformer), run as
    DPT runs it: position embedding resized to the input, the ResNet's first two stage
    outputs and the tapped blocks' tokens returned; `norm` and `head` unused."""

    def __init__(self, cfg: DPTSizes):
        super().__init__()
        backbone = ResNetV2(
            layers=list(cfg.stages),
            channels=cfg.stage_channels,
            num_classes=0,
            global_pool="",
            stem_chs=cfg.stem,
            stem_type="same",
            preact=False,
            conv_layer=partial(StdConv2dSame, eps=1e-8),
            norm_layer=partial(GroupNormAct, num_groups=cfg.groups),
        )
        self.patch_embed = nn.ModuleDict({"backbone": backbone, "proj": nn.Conv2d(cfg.stage_channels[-1], cfg.dim, 1)})
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid**2, cfg.dim))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(
            *(Block(cfg.dim, cfg.heads, cfg.mlp / cfg.dim, qkv_bias=True, norm_layer=norm) for _ in range(cfg.depth))
        )
        self.norm = norm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.classes)
        self.grid, self.taps = cfg.grid, cfg.taps

    def resized_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """(1, 1 + h*w, D): the cls position kept, the grid resized bilinearly (align_corners=False)."""
        cls_1CD, grid_1ND = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid_1DGG = grid_1ND.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid_1Dhw = F.interpolate(grid_1DGG, size=(h, w), mode="bilinear", align_corners=False)
        return torch.cat([cls_1CD, grid_1Dhw.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x_B3HW: torch.Tensor):
        """Stage-1 map (1/4), stage-2 map (1/8), the tapped blocks' tokens (cls first)."""
        backbone = self.patch_embed["backbone"]
        x = backbone.stem(x_B3HW)
        s1_BCHW = backbone.stages[0](x)
        s2_BCHW = backbone.stages[1](s1_BCHW)
        x = backbone.norm(backbone.stages[2](s2_BCHW))
        tokens_BND = self.patch_embed["proj"](x).flatten(2).transpose(1, 2)
        h, w = x_B3HW.shape[2] // PATCH, x_B3HW.shape[3] // PATCH
        tokens_BND = torch.cat([self.cls_token.expand(len(tokens_BND), -1, -1), tokens_BND], dim=1)
        tokens_BND = tokens_BND + self.resized_pos_embed(h, w)
        tapped = []
        for i, block in enumerate(self.blocks[: max(self.taps) + 1]):
            tokens_BND = block(tokens_BND)
            if i in self.taps:
                tapped.append(tokens_BND)
        return s1_BCHW, s2_BCHW, *tapped


class Readout(nn.Module):
    """The 'project' readout: each patch token concatenated with the cls token, Linear 2D -> D, GELU."""

    def __init__(self, dim: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())

    def forward(self, tokens_BND: torch.Tensor) -> torch.Tensor:
        patches_BPD = tokens_BND[:, 1:]
        return self.project(torch.cat([patches_BPD, tokens_BND[:, :1].expand_as(patches_BPD)], dim=-1))


class Reassemble(nn.Sequential):
    """Tokens -> a (D, H/16, W/16) map: readout, 1x1 conv, and for the last tap a 3x3
    stride-2 conv (1/32). Children are named by their index in the official Sequential,
    whose 1 and 2 (transpose, fixed-size unflatten) are done here for any size."""

    def __init__(self, dim: int, downsample: bool):
        layers = [("0", Readout(dim)), ("3", nn.Conv2d(dim, dim, 1))]
        if downsample:
            layers.append(("4", nn.Conv2d(dim, dim, 3, stride=2, padding=1)))
        super().__init__(OrderedDict(layers))

    def forward(self, tokens_BND: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        readout, *convs = self
        x = readout(tokens_BND).transpose(1, 2).unflatten(2, hw)
        for conv in convs:
            x = conv(x)
        return x


class ResidualConvUnit(nn.Module):
    """relu -> conv3x3 -> relu -> conv3x3, plus the input."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """(x + RCU1(skip) if a skip is given) -> RCU2 -> bilinear x2 (align_corners=True) -> 1x1 conv."""

    def __init__(self, features: int):
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x, skip=None):
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = F.interpolate(self.resConfUnit2(x), scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHybrid(nn.Module):
    """DPTDepthModel('vitb_rn50_384', non_negative=True): (B, 3, H, W) -> (B, H, W) inverse depth."""

    def __init__(self, cfg: DPTSizes = DPTSizes()):
        super().__init__()
        f = cfg.features
        self.pretrained = nn.ModuleDict(
            {
                "model": HybridViT(cfg),
                "act_postprocess3": Reassemble(cfg.dim, downsample=False),
                "act_postprocess4": Reassemble(cfg.dim, downsample=True),
            }
        )
        widths = (*cfg.stage_channels[:2], cfg.dim, cfg.dim)
        self.scratch = nn.ModuleDict(
            {f"layer{i + 1}_rn": nn.Conv2d(c, f, 3, padding=1, bias=False) for i, c in enumerate(widths)}
            | {f"refinenet{i}": FusionBlock(f) for i in range(1, 5)}
            | {
                "output_conv": nn.Sequential(
                    nn.Conv2d(f, f // 2, 3, padding=1),
                    nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                    nn.Conv2d(f // 2, 32, 3, padding=1),
                    nn.ReLU(),
                    nn.Conv2d(32, 1, 1),
                    nn.ReLU(),  # non_negative
                )
            }
        )

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        if x_B3HW.shape[2] % 32 or x_B3HW.shape[3] % 32:
            raise ValueError(f"DPT needs a height and width that are multiples of 32, got {tuple(x_B3HW.shape[2:])}")
        hw = (x_B3HW.shape[2] // PATCH, x_B3HW.shape[3] // PATCH)
        p, s = self.pretrained, self.scratch
        l1, l2, t3, t4 = p["model"](x_B3HW)
        l3, l4 = p["act_postprocess3"](t3, hw), p["act_postprocess4"](t4, hw)
        path = s["refinenet4"](s["layer4_rn"](l4))
        path = s["refinenet3"](path, s["layer3_rn"](l3))
        path = s["refinenet2"](path, s["layer2_rn"](l2))
        path = s["refinenet1"](path, s["layer1_rn"](l1))
        return s["output_conv"](path).squeeze(1)


# The Hugging Face names (transformers' DPTForDepthEstimation, hybrid) of the
# official keys, matched whole. The query, key and value of a block all go to
# its fused `qkv`, concatenated in that order.
_W = r"(weight|bias)"
_BIT, _RES = r"dpt\.embeddings\.backbone\.bit\.", "pretrained.model.patch_embed.backbone."
_LAYER, _BLOCK = r"dpt\.encoder\.layer\.(\d+)\.", r"pretrained.model.blocks.\1."
_READOUT, _REASSEMBLE = r"neck\.reassemble_stage\.readout_projects\.", r"neck\.reassemble_stage\.layers\."
_FUSE = r"neck\.fusion_stage\.layers\."  # from the deepest: layers.0 is refinenet4
HF_TO_OFFICIAL = [
    (r"dpt\.embeddings\.cls_token", "pretrained.model.cls_token"),
    (r"dpt\.embeddings\.position_embeddings", "pretrained.model.pos_embed"),
    (rf"dpt\.embeddings\.projection\.{_W}", r"pretrained.model.patch_embed.proj.\1"),
    (rf"{_BIT}embedder\.convolution\.weight", f"{_RES}stem.conv.weight"),
    (rf"{_BIT}embedder\.norm\.{_W}", rf"{_RES}stem.norm.\1"),
    (
        rf"{_BIT}encoder\.stages\.(\d+)\.layers\.(\d+)\.((?:downsample\.)?(?:conv|norm)\d?\.{_W})",
        rf"{_RES}stages.\1.blocks.\2.\3",
    ),
    (rf"{_LAYER}attention\.attention\.(?:query|key|value)\.{_W}", rf"{_BLOCK}attn.qkv.\2"),
    (rf"{_LAYER}attention\.output\.dense\.{_W}", rf"{_BLOCK}attn.proj.\2"),
    (rf"{_LAYER}layernorm_before\.{_W}", rf"{_BLOCK}norm1.\2"),
    (rf"{_LAYER}layernorm_after\.{_W}", rf"{_BLOCK}norm2.\2"),
    (rf"{_LAYER}intermediate\.dense\.{_W}", rf"{_BLOCK}mlp.fc1.\2"),
    (rf"{_LAYER}output\.dense\.{_W}", rf"{_BLOCK}mlp.fc2.\2"),
    (rf"dpt\.layernorm\.{_W}", r"pretrained.model.norm.\1"),
    (rf"{_READOUT}2\.0\.{_W}", r"pretrained.act_postprocess3.0.project.0.\1"),
    (rf"{_READOUT}3\.0\.{_W}", r"pretrained.act_postprocess4.0.project.0.\1"),
    (rf"{_REASSEMBLE}2\.projection\.{_W}", r"pretrained.act_postprocess3.3.\1"),
    (rf"{_REASSEMBLE}3\.projection\.{_W}", r"pretrained.act_postprocess4.3.\1"),
    (rf"{_REASSEMBLE}3\.resize\.{_W}", r"pretrained.act_postprocess4.4.\1"),
    (r"neck\.convs\.0\.weight", "scratch.layer1_rn.weight"),
    (r"neck\.convs\.1\.weight", "scratch.layer2_rn.weight"),
    (r"neck\.convs\.2\.weight", "scratch.layer3_rn.weight"),
    (r"neck\.convs\.3\.weight", "scratch.layer4_rn.weight"),
    (rf"{_FUSE}0\.projection\.{_W}", r"scratch.refinenet4.out_conv.\1"),
    (rf"{_FUSE}1\.projection\.{_W}", r"scratch.refinenet3.out_conv.\1"),
    (rf"{_FUSE}2\.projection\.{_W}", r"scratch.refinenet2.out_conv.\1"),
    (rf"{_FUSE}3\.projection\.{_W}", r"scratch.refinenet1.out_conv.\1"),
    (rf"{_FUSE}0\.residual_layer(\d)\.convolution(\d)\.{_W}", r"scratch.refinenet4.resConfUnit\1.conv\2.\3"),
    (rf"{_FUSE}1\.residual_layer(\d)\.convolution(\d)\.{_W}", r"scratch.refinenet3.resConfUnit\1.conv\2.\3"),
    (rf"{_FUSE}2\.residual_layer(\d)\.convolution(\d)\.{_W}", r"scratch.refinenet2.resConfUnit\1.conv\2.\3"),
    (rf"{_FUSE}3\.residual_layer(\d)\.convolution(\d)\.{_W}", r"scratch.refinenet1.resConfUnit\1.conv\2.\3"),
    (rf"head\.head\.([024])\.{_W}", r"scratch.output_conv.\1.\2"),
]
QKV = ("query", "key", "value")
HF_MISSING = ("pretrained.model.head.weight", "pretrained.model.head.bias")  # the HF conversion dropped the classifier


def official_key(hf_key: str) -> str:
    """The official key a Hugging Face key's tensor goes to (a qkv part: to the fused qkv)."""
    for pattern, target in HF_TO_OFFICIAL:
        m = re.fullmatch(pattern, hf_key)
        if m:
            return m.expand(target)
    raise KeyError(hf_key)


def hf_to_official(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face state dict; every key must match the table."""
    unknown = [k for k in state if not any(re.fullmatch(p, k) for p, _ in HF_TO_OFFICIAL)]
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} keys not in DPT-Hybrid's Hugging Face layout: {unknown[:5]}")
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for k, v in state.items():
        order = next((i for i, name in enumerate(QKV) if f".attention.attention.{name}." in k), 0)
        parts.setdefault(official_key(k), []).append((order, v))
    out = {}
    for k, pieces in parts.items():
        expected = len(QKV) if ".attn.qkv." in k else 1
        if sorted(i for i, _ in pieces) != list(range(expected)):
            raise CheckpointError(f"{source}: {k} needs one each of {', '.join(QKV[:expected])}")
        out[k] = torch.cat([v for _, v in sorted(pieces, key=lambda p: p[0])])
    return out


def hf_config(cfg: DPTSizes):
    """transformers' DPTConfig of the network with sizes `cfg` (laid out as `Intel/dpt-hybrid-midas`'s)."""
    from transformers import DPTConfig as HFConfig

    return HFConfig(
        is_hybrid=True,
        hidden_size=cfg.dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.mlp,
        layer_norm_eps=1e-6,
        image_size=cfg.grid * PATCH,
        patch_size=PATCH,
        backbone_out_indices=[0, 0, *cfg.taps],  # hybrid: only the last two are read
        readout_type="project",
        reassemble_factors=[1, 1, 1, 0.5],
        neck_hidden_sizes=[*cfg.stage_channels[:2], cfg.dim, cfg.dim],
        fusion_hidden_size=cfg.features,
        backbone_featmap_shape=[1, cfg.stage_channels[-1], cfg.grid, cfg.grid],
        backbone_config={
            "layer_type": "bottleneck",
            "global_padding": "same",
            "embedding_dynamic_padding": True,
            "embedding_size": cfg.stem,
            "depths": list(cfg.stages),
            "hidden_sizes": list(cfg.stage_channels),
            "num_groups": cfg.groups,
            "out_features": [f"stage{i + 1}" for i in range(len(cfg.stages))],
        },
    )


# The config fields that change what the Hugging Face model computes
HF_FIELDS = [
    "is_hybrid",
    "hidden_act",
    "qkv_bias",
    "patch_size",
    "readout_type",
    "reassemble_factors",
    "neck_hidden_sizes",
    "use_batch_norm_in_fusion_residual",
    "add_projection",
    "head_in_index",
]
BIT_FIELDS = ["layer_type", "global_padding", "embedding_dynamic_padding", "hidden_act", "width_factor", "out_features"]


def config_from_hf(hf, source: str) -> DPTSizes:
    """The sizes of a Hugging Face DPT config, refused unless it is the DPT-Hybrid network."""
    if not hf.is_hybrid or hf.backbone_config is None:
        raise CheckpointError(f"{source}: not a DPT-Hybrid config (is_hybrid={hf.is_hybrid})")
    bit = hf.backbone_config
    cfg = DPTSizes(
        stem=bit.embedding_size,
        stages=tuple(bit.depths),
        stage_channels=tuple(bit.hidden_sizes[: len(bit.depths)]),
        groups=bit.num_groups,
        dim=hf.hidden_size,
        depth=hf.num_hidden_layers,
        heads=hf.num_attention_heads,
        mlp=hf.intermediate_size,
        grid=hf.image_size // hf.patch_size,
        taps=tuple(hf.backbone_out_indices[2:]),
        features=hf.fusion_hidden_size,
    )
    want = hf_config(cfg)

    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    differ = [f"{f}={getattr(hf, f)!r}" for f in HF_FIELDS if norm(getattr(hf, f)) != norm(getattr(want, f))]
    differ += [
        f"backbone_config.{f}={getattr(bit, f)!r}"
        for f in BIT_FIELDS
        if norm(getattr(bit, f)) != norm(getattr(want.backbone_config, f))
    ]
    if hf.use_bias_in_fusion_residual is False:
        differ.append("use_bias_in_fusion_residual=False")
    if differ:
        raise CheckpointError(f"{source}: not the DPT-Hybrid network: {', '.join(differ)}")
    return cfg


def load_official(path: str | Path) -> DPTHybrid:
    """`dpt_hybrid-midas-501f0c75.pt` (a flat state_dict, or one under 'model'), strictly, in eval mode."""
    model = DPTHybrid()
    load_checked(model, read_state_dict(path), str(path))
    return model.eval()


def load_hf(folder: str | Path) -> DPTHybrid:
    """A Hugging Face DPT-Hybrid folder (config.json + weights), in eval mode."""
    from transformers import DPTConfig as HFConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}: not a Hugging Face model folder")
    model = DPTHybrid(config_from_hf(HFConfig.from_pretrained(folder), str(folder / "config.json")))
    state = hf_to_official(read_state_dict(folder), str(folder))
    for key in HF_MISSING:  # unused; zero rather than random
        state.setdefault(key, torch.zeros_like(model.state_dict()[key]))
    load_checked(model, state, str(folder))
    return model.eval()


class Generator(LabelNetwork):
    """Depth labels as `experts/generate_depth.py` writes them: grey, brighter = nearer."""

    def load(self, weights: str | Path) -> DPTHybrid:
        """A file: the official format; a folder or a hub id (e.g. `Intel/dpt-hybrid-midas`):
        the Hugging Face format (a hub id is fetched, failing at once when offline)."""
        path = Path(weights)
        if path.is_file():
            return load_official(path)
        if path.is_dir():
            return load_hf(path)
        if not is_hub_id(str(weights), (".pt", ".pth", ".bin", ".safetensors")):
            raise FileNotFoundError(f"depth weights {weights}: no such file or folder")
        what = f"the depth expert's Hugging Face weights ({weights})"
        config = hub_file(str(weights), "config.json", what)
        hub_first_file(str(weights), WEIGHT_FILES, what)
        log.info("depth weights from the hub: %s", config.parent)
        return load_hf(config.parent)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB -> 3 x 480 x 480: bilinear resize (antialiased, as PIL does), then 2x - 1."""
        from torchvision.transforms import functional as TF

        x_3HW = TF.to_tensor(TF.resize(image.convert("RGB"), [RESOLUTION, RESOLUTION]))
        return TF.normalize(x_3HW, [0.5] * 3, [0.5] * 3)

    def predict(self, model: DPTHybrid, x_BCHW: torch.Tensor) -> list[torch.Tensor]:
        """One (H, W) relative inverse depth map per image."""
        return list(model(x_BCHW))

    def to_label(self, raw_HW: torch.Tensor, size: tuple[int, int]) -> Image.Image:
        """Min-max to [0, 1] per image, bilinear (align_corners=True) to the original
        (W, H), x255 truncated to uint8 (Pillow's 'F' -> 'L'). A constant map, which the
        official formula turns into NaN (written as 0), gives 0 everywhere."""
        d_HW = raw_HW.detach().float().cpu()
        span = d_HW.max() - d_HW.min()
        d_HW = (d_HW - d_HW.min()) / span if span > 0 else torch.zeros_like(d_HW)
        d_HW = F.interpolate(d_HW[None, None], size=(size[1], size[0]), mode="bilinear", align_corners=True)[0, 0]
        return Image.fromarray(255 * d_HW.numpy()).convert("L")  # float32: mode 'F'
