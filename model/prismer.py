"""Prismer / PrismerZ: the expert encoder and the text decoder, with the
task heads (captioning, VQA). Training losses live in `forward`; inference
(`generate`, `rank_answers`) is in `model.generation`."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import RobertaConfig

from common.files import CheckpointError, load_json, load_safetensors, reason
from common.weights import load_checked, read_state_dict, weights_file
from model import convert, generation
from model.config import ModelConfig
from model.decoder import PrismerTextDecoder
from model.encoder import ExpertEncoder
from model.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def read_config(path: Path) -> ModelConfig:
    """The model config a `save_pretrained` folder holds (its pretrained parts are never loaded)."""
    cfg = load_json(path, "a model config (the config.json of save_pretrained)")
    try:
        return ModelConfig.from_dict(cfg | {"pretrained": False})
    except (TypeError, ValueError) as e:  # a missing `prismer_model`, unknown keys or values
        raise CheckpointError(f"{path}: not a valid model config ({reason(e)})") from e


class Prismer(nn.Module):
    def __init__(self, config: ModelConfig | Mapping, tokenizer=None):
        super().__init__()
        cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config, strict=False)
        self.config = cfg
        v = cfg.vision
        self.expert_encoder = ExpertEncoder(
            cfg.experts, cfg.image_resolution, v["width"], v["layers"], v["patch_size"], v["act"]
        )
        self.text_decoder = PrismerTextDecoder(RobertaConfig(**cfg.roberta_config))
        self.text_decoder.reset_parameters()
        if cfg.pretrained:
            clip = cfg.clip or cfg.size["clip"]
            roberta = cfg.roberta or cfg.size["roberta_name"]
            if not clip:
                raise ValueError(f"model size {cfg.prismer_model!r} has no pretrained CLIP: set pretrained: false")
            convert.load_clip(self.expert_encoder, clip)
            convert.load_roberta(self.text_decoder, roberta)
        self.set_freeze(cfg.freeze)
        self._tokenizer = tokenizer

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(
                self.config.tokenizer or self.config.roberta or self.config.size["roberta_name"]
            )
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def set_freeze(self, mode: str) -> None:
        """Freeze the pretrained backbones' own weights; adaptors, cross-attention,
        stems, resampler, embeddings, the last decoder layer and the head train."""
        self.config.freeze = mode
        self.requires_grad_(True)
        if mode in ("freeze_vision", "freeze_lang_vision"):
            for clip_block, _adaptor in self.expert_encoder.transformer.resblocks:
                clip_block.requires_grad_(False)
        if mode in ("freeze_lang", "freeze_lang_vision"):
            for roberta_layer, _cross, _adaptor in self.text_decoder.roberta.encoder.layer:
                roberta_layer.requires_grad_(False)

    def encode(self, experts: dict) -> torch.Tensor:
        return self.expert_encoder(experts)

    # ------------------------------------------------------------ checkpoints

    def load_official(self, source: str | os.PathLike) -> None:
        """Load an official checkpoint: a path or a name like `caption_prismer_base`."""
        convert.load_official(self, source)

    def export_official(self, path: str | os.PathLike) -> Path:
        return convert.export_official(self, path)

    @classmethod
    def from_official(cls, name: str, path: str | os.PathLike | None = None, tokenizer=None, **overrides):
        """A released model by name, its config derived from the name; `path`
        points at a local copy of its pytorch_model.bin (else the hub)."""
        cfg = convert.official_config(name) | overrides
        source = weights_file(convert.resolve_checkpoint(path or name))
        state = read_state_dict(source)
        if convert.POS_KEY not in state:
            raise CheckpointError(f"{source}: has no {convert.POS_KEY}, expected a Prismer checkpoint")
        grid = round(state[convert.POS_KEY].shape[0] ** 0.5)
        patch = ModelConfig(cfg["prismer_model"], pretrained=False).vision["patch_size"]
        if "image_resolution" not in overrides and cfg["image_resolution"] // patch != grid:
            cfg["image_resolution"] = grid * patch  # the checkpoint's own grid, when not the official recipe's
        model = cls(cfg, tokenizer=tokenizer)
        convert.check_experts(state, model.config.experts, f"{name} ({source})")
        load_checked(model, convert.official_to_model(state, model), f"{name} ({source})")
        return model

    def save_pretrained(self, folder: str | os.PathLike, state_dict: dict | None = None) -> Path:
        """Our own format: safetensors weights + the config that built them.
        `state_dict`: weights gathered elsewhere (e.g. from a sharded model)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = self.config.to_dict() | {"pretrained": False}
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            # Every key of the official layout, tied ones included (cloned: safetensors refuses shared memory).
            weights = self.state_dict() if state_dict is None else state_dict
            save_file(
                {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}, os.path.join(tmp, WEIGHTS_FILE)
            )
            Path(tmp, CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
            for name in (WEIGHTS_FILE, CONFIG_FILE):
                os.replace(os.path.join(tmp, name), folder / name)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, tokenizer=None, **overrides):
        """Load our own checkpoint folder; no YAML needed, the config is inside."""
        folder = Path(folder)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).exists():
                raise FileNotFoundError(f"{folder} has no {name}: not a checkpoint saved by save_pretrained")
        config = read_config(folder / CONFIG_FILE)
        if overrides:
            config = ModelConfig.from_dict(config.to_dict() | overrides)
        model = cls(config, tokenizer=tokenizer)
        path = folder / WEIGHTS_FILE
        load_checked(model, convert.official_to_model(load_safetensors(path), model), str(path))
        return model


class PrismerCaption(Prismer):
    def forward(self, experts: dict, captions: list[str], prefix: str = "") -> torch.Tensor:
        """Mean over the batch of each caption's summed token loss. Captions
        start with `prefix` ("A picture of" in fine-tuning; the caption
        dataset writes it), whose tokens are context, not targets."""
        tok = self.tokenizer(captions, padding="longest", truncation=True, max_length=30, return_tensors="pt")
        device = experts["rgb"].device
        input_ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
        labels = input_ids.masked_fill(mask == 0, -100)
        if prefix:
            prompt_len = len(self.tokenizer(prefix).input_ids) - 1  # without </s>
            labels[:, :prompt_len] = -100
        out = self.text_decoder(input_ids, mask, self.encode(experts), labels=labels)
        return out.loss.mean()

    def generate(self, experts: dict, prefix: str = "", **kwargs) -> list[str]:
        return generation.generate_captions(self, experts, prefix, **kwargs)


class PrismerVQA(Prismer):
    def forward(
        self,
        experts: dict,
        questions: list[str],
        answers: list[str],
        weights: torch.Tensor,
        answers_per_question: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Weighted answer loss. With `answers_per_question` (B,), `answers`
        and `weights` hold all answers of all questions back to back and the
        image tokens are reused for each, not recomputed."""
        image_BND = self.encode(experts)
        if answers_per_question is not None:
            image_BND = image_BND.repeat_interleave(answers_per_question.to(image_BND.device), dim=0)
            questions = [q for q, n in zip(questions, answers_per_question.tolist()) for _ in range(n)]
        input_ids, mask, labels = generation.question_answer_tokens(
            self.tokenizer, questions, answers, image_BND.device
        )
        out = self.text_decoder(input_ids, mask, image_BND, labels=labels)
        return (weights.to(out.loss.device) * out.loss).mean()

    def generate(self, experts: dict, questions: list[str], **kwargs) -> list[str]:
        return generation.generate_answers(self, experts, questions, **kwargs)

    def rank_answers(self, experts: dict, questions: list[str], answer_list: list[str], k: int = 128) -> torch.Tensor:
        return generation.rank_answers(self, experts, questions, answer_list, k)
