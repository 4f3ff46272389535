"""Checkpoint adapters: official Prismer checkpoints, CLIP and RoBERTa.

Our module layout *is* the official checkpoint layout, so an official
`pytorch_model.bin` loads with `strict=True` after three fixes: a DDP
`module.` prefix, the positional embedding's grid (224 pre-training vs 480
fine-tuning) and the integer `position_ids` buffer some files omit. CLIP and
RoBERTa weights go through plain, asserted key-rename tables.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from common.files import CheckpointError, atomic_write, reason
from common.hub import OFFICIAL_REPO, hub_file, hub_first_file
from common.modalities import EXPERTS, PRISMER_EXPERTS
from common.weights import WEIGHT_FILES, load_checked, read_state_dict, weights_file
from model.layers import resize_pos_embed

log = logging.getLogger(__name__)

OFFICIAL_NAME = re.compile(r"^(pretrain|caption|vqa)_(prismerz?)_(base|large)$")
POS_KEY = "expert_encoder.positional_embedding"


# ------------------------------------------------------- official Prismer


def official_config(name: str) -> dict:
    """Model config of a released checkpoint, e.g. `caption_prismer_base`."""
    m = OFFICIAL_NAME.match(name)
    if not m:
        raise ValueError(
            f"{name!r} is not an official checkpoint name ({{pretrain,caption,vqa}}_{{prismer,prismerz}}"
            "_{base,large})"
        )
    task, variant, size = m.groups()
    return {
        "prismer_model": f"{variant}_{size}",
        "experts": list(PRISMER_EXPERTS) if variant == "prismer" else [],
        "image_resolution": 224 if task == "pretrain" else 480,
        "freeze": "none",
        "pretrained": False,
    }


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """A local file or folder, or an official name fetched from the hub."""
    if Path(source).exists():
        return Path(source)
    if OFFICIAL_NAME.match(str(source)):
        return hub_file(OFFICIAL_REPO, f"{source}/pytorch_model.bin", f"the official {source} checkpoint")
    raise FileNotFoundError(
        f"checkpoint {source} is neither a local path nor an official name like caption_prismer_base"
    )


def checkpoint_experts(state: dict[str, torch.Tensor]) -> list[str]:
    stems = {k.split(".")[2] for k in state if k.startswith("expert_encoder.conv1.")} - {"rgb"}
    return sorted("seg_*" if s == "seg" else s for s in stems)


def check_experts(state: dict[str, torch.Tensor], experts: list[str], source: str) -> None:
    """The PrismerZ-vs-Prismer mix-up gets its own message, listing both sets."""
    have = checkpoint_experts(state)
    want = sorted("seg_*" if EXPERTS[e].stem == "seg" else e for e in set(experts))
    if have != want:
        raise ValueError(
            f"checkpoint {source} was trained with experts {have or ['none (PrismerZ)']} but the config names "
            f"{want or ['none (PrismerZ)']}; set `experts` to match the checkpoint"
        )


def official_to_model(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapt an official state dict to `model`: positional grid, position_ids."""
    state = dict(state)
    own = model.state_dict()
    if POS_KEY in state and POS_KEY in own and state[POS_KEY].shape[0] != own[POS_KEY].shape[0]:
        log.info("resizing positional embedding %s -> %s", tuple(state[POS_KEY].shape), tuple(own[POS_KEY].shape))
        state[POS_KEY] = resize_pos_embed(state[POS_KEY], own[POS_KEY].shape[0])
    ids = "text_decoder.roberta.embeddings.position_ids"
    if ids in own and ids not in state:
        state[ids] = own[ids]
    # Files saved with tied weights may store the LM-head tensors under one name only.
    for tied, src in (
        ("text_decoder.lm_head.decoder.weight", "text_decoder.roberta.embeddings.word_embeddings.weight"),
        ("text_decoder.lm_head.decoder.bias", "text_decoder.lm_head.bias"),
    ):
        if tied in own and tied not in state and src in state:
            state[tied] = state[src]
    return state


def load_official(model: nn.Module, source: str | os.PathLike) -> None:
    path = weights_file(resolve_checkpoint(source))
    state = read_state_dict(path)
    check_experts(state, model.config.experts, str(path))
    load_checked(model, official_to_model(state, model), str(path))


def export_official(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write `pytorch_model.bin` in the official layout (atomically)."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / "pytorch_model.bin"
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


# ------------------------------------------------------------------- CLIP

# HF CLIPVisionModel / CLIPModel (prefix vision_model.) -> OpenAI/open_clip (prefix visual.)
HF_CLIP_RENAMES = [
    (r"^embeddings\.patch_embedding\.weight$", "conv1.weight"),
    (r"^embeddings\.position_embedding\.weight$", "positional_embedding"),
    (r"^embeddings\.class_embedding$", "class_embedding"),
    (r"^pre_layrnorm\.", "ln_pre."),
    (r"^post_layernorm\.", "ln_post."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.resblocks.\1.attn.out_proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"transformer.resblocks.\1.ln_1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"transformer.resblocks.\1.ln_2."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc1\.", r"transformer.resblocks.\1.mlp.c_fc."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc2\.", r"transformer.resblocks.\1.mlp.c_proj."),
]
# OpenAI/open_clip visual.* -> our expert_encoder (the class token and projection are not used).
CLIP_RENAMES = [
    (r"^conv1\.weight$", "conv1.rgb.weight"),
    (r"^positional_embedding$", "positional_embedding"),
    (r"^ln_(pre|post)\.", r"ln_\1."),
    (r"^transformer\.resblocks\.(\d+)\.", r"transformer.resblocks.\1.0."),
]
CLIP_DROPPED = re.compile(r"^(class_embedding|proj|attnpool\..*)$")


def rename(key: str, table) -> str | None:
    for pattern, repl in table:
        if re.search(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def hf_clip_to_openai(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP vision weights in OpenAI naming; q/k/v projections fused."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        m = re.match(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if m:
            qkv.setdefault(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = value
            continue
        new = rename(key, HF_CLIP_RENAMES)
        if new is None:
            raise ValueError(f"unknown HF CLIP vision key {key!r}")
        out[new] = value
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def clip_to_encoder(state: dict[str, torch.Tensor], num_positions: int) -> dict[str, torch.Tensor]:
    """CLIP vision weights (any supported format) -> expert_encoder keys."""
    hf_patch = next((k for k in state if k.endswith("embeddings.patch_embedding.weight")), None)
    if hf_patch is not None:  # HF CLIPVisionModel (no prefix) or CLIPModel (vision_model.)
        prefix = hf_patch.removesuffix("embeddings.patch_embedding.weight")
        visual = hf_clip_to_openai({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    else:
        visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise ValueError("no CLIP vision weights found (expected keys under visual.* or vision_model.*)")
    out = {}
    for key, value in visual.items():
        if CLIP_DROPPED.match(key):
            continue
        new = rename(key, CLIP_RENAMES)
        if new is None:
            raise ValueError(f"unknown CLIP vision key {key!r}")
        out[new] = value
    # Drop the class token's position, then fit the grid to our resolution.
    out["positional_embedding"] = resize_pos_embed(out["positional_embedding"][1:], num_positions)
    return out


def clip_source(name_or_path: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """The CLIP weights file (local, or fetched from the hub) and its tensors."""
    path = Path(name_or_path)
    if not path.exists():
        path = hub_first_file(
            name_or_path,
            ["model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"],
            f"CLIP weights {name_or_path}",
        )
    path = weights_file(path)
    if path.suffix == ".pt" and _is_torchscript(path):
        # OpenAI's own release is a TorchScript archive: code, not a pickle to trust.
        try:
            return path, torch.jit.load(path, map_location="cpu").state_dict()
        except RuntimeError as e:
            raise CheckpointError(f"{path}: not a loadable TorchScript CLIP archive ({reason(e)})") from e
    return path, read_state_dict(path)


def _is_torchscript(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


def load_clip(encoder: nn.Module, name_or_path: str) -> None:
    path, state = clip_source(name_or_path)
    try:
        state = clip_to_encoder(state, encoder.positional_embedding.shape[0])
    except ValueError as e:  # unknown or absent CLIP keys
        raise CheckpointError(f"{path}: {e}") from e
    load_checked(encoder, state, f"CLIP {path}", allow_missing=lambda k: not _is_clip_key(k))


def _is_clip_key(key: str) -> bool:
    """Encoder keys CLIP provides; stems, adaptors, resampler and instance rows are new."""
    return bool(
        re.match(r"^(conv1\.rgb\.|positional_embedding$|ln_(pre|post)\.|transformer\.resblocks\.\d+\.0\.)", key)
    )


# ---------------------------------------------------------------- RoBERTa

ROBERTA_RENAMES = [
    (r"^embeddings\.(word|position|token_type)_embeddings\.weight$", r"roberta.embeddings.\1_embeddings.weight"),
    (r"^embeddings\.LayerNorm\.", "roberta.embeddings.LayerNorm."),
    (r"^encoder\.layer\.(\d+)\.", r"roberta.encoder.layer.\1.0."),
]
ROBERTA_DROPPED = re.compile(r"^(pooler\..*|embeddings\.(position_ids|token_type_ids))$")


def roberta_to_decoder(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF RobertaModel / RobertaForMaskedLM / RobertaForCausalLM -> text_decoder keys."""
    out = {}
    for key, value in state.items():
        if key.startswith("lm_head."):
            out[key] = value
            continue
        body = key.removeprefix("roberta.")
        if ROBERTA_DROPPED.match(body):
            continue
        new = rename(body, ROBERTA_RENAMES)
        if new is None:
            raise ValueError(f"unknown RoBERTa key {key!r}")
        out[new] = value
    if "lm_head.decoder.weight" not in out and "lm_head.dense.weight" in out:
        out["lm_head.decoder.weight"] = out["roberta.embeddings.word_embeddings.weight"]
    if "lm_head.bias" in out:
        out["lm_head.decoder.bias"] = out["lm_head.bias"]
    return out


def load_roberta(decoder: nn.Module, name_or_path: str) -> None:
    path = Path(name_or_path)
    if not path.exists():
        path = hub_first_file(name_or_path, WEIGHT_FILES, f"RoBERTa weights {name_or_path}")
    path = weights_file(path)
    state = read_state_dict(path)
    try:
        state = roberta_to_decoder(state)
    except ValueError as e:  # an unknown RoBERTa key
        raise CheckpointError(f"{path}: {e}") from e
    if "lm_head.dense.weight" not in state:
        log.warning("%s has no LM head (a RobertaModel): the head starts from scratch", path)
    load_checked(decoder, state, f"RoBERTa {path}", allow_missing=lambda k: not _is_roberta_key(k))


def _is_roberta_key(key: str) -> bool:
    """Decoder keys RoBERTa provides; cross-attention, adaptors and the last layer are new."""
    return bool(re.match(r"^roberta\.(embeddings\.(?!position_ids)|encoder\.layer\.\d+\.0\.)", key))
