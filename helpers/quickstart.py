"""The main job on built-in data, runnable on any laptop in seconds.

Until the synthetic world lands, it fits a small Prismer (all six experts,
random init) to a handful of generated scenes and captions them, so a new
user sees the whole path (tokenizer, expert encoder, resampler, decoder,
loss, cached beam search) run end to end.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from experts.registry import EXPERTS, PRISMER_EXPERTS
from model import PrismerCaption
from model.tokenizer import train_tokenizer

log = logging.getLogger("quickstart")
COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.2), "blue": (0.1, 0.2, 1.0), "yellow": (1.0, 0.9, 0.1)}
SIZE = {
    "vision": {"width": 64, "layers": 2, "patch_size": 16},
    "roberta": {
        "hidden_size": 64,
        "vision_hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "max_position_embeddings": 66,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "type_vocab_size": 1,
        "is_decoder": True,
    },
}


def scene(colour: str, left: bool, res: int, label_res: int = 64) -> tuple[dict, str]:
    """A coloured square on a grey floor, with every expert's 'label' derived from it."""
    rgb = torch.full((3, res, res), 0.5)
    lo, hi = (res // 8, res // 2) if left else (res // 2, 7 * res // 8)
    rgb[:, res // 4 : 3 * res // 4, lo:hi] = torch.tensor(COLOURS[colour])[:, None, None]
    mask = torch.nn.functional.interpolate(
        (rgb.std(0, keepdim=True) > 0.1).float()[None], size=(label_res, label_res), mode="nearest"
    )[0]
    experts = {"rgb": (rgb - 0.45) / 0.27}
    for name in PRISMER_EXPERTS:
        e = EXPERTS[name]
        x = mask.expand(e.channels, -1, -1) * 2 - 1
        experts[name] = (
            {"label": x, "instance": (mask * 254).long() + (1 - mask.long()) * 255} if name == "obj_detection" else x
        )
    return experts, f"a {colour} square on the {'left' if left else 'right'}"


def batch(items: list[dict]) -> dict:
    out = {}
    for k, v in items[0].items():
        out[k] = (
            {kk: torch.stack([i[k][kk] for i in items]) for kk in v}
            if isinstance(v, dict)
            else torch.stack([i[k] for i in items])
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--out", default="outputs/quickstart")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)

    scenes = [scene(c, left, 64) for c in COLOURS for left in (True, False)]
    captions = [c for _, c in scenes]
    tokenizer = train_tokenizer(captions * 10, 300, Path(args.out) / "tokenizer")
    model = PrismerCaption(
        {
            "prismer_model": SIZE | {"roberta": SIZE["roberta"] | {"vocab_size": len(tokenizer)}},
            "experts": list(PRISMER_EXPERTS),
            "image_resolution": 64,
            "pretrained": False,
        },
        tokenizer=tokenizer,
    )
    experts = batch([s for s, _ in scenes])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    t0, losses = time.time(), []
    model.train()
    for _ in (bar := tqdm(range(args.steps), desc="train", unit="step")):
        loss = model(experts, captions)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    generated = model.generate(experts, min_length=2)  # these captions are shorter than COCO's
    correct = sum(g == c for g, c in zip(generated, captions))
    print(f"\n{'reference':<32} {'generated':<32}")
    for c, g in zip(captions, generated):
        print(f"{c:<32} {g:<32}")
    print(
        f"\nloss {losses[0]:.2f} -> {losses[-1]:.2f} in {args.steps} steps ({time.time() - t0:.0f} s); "
        f"{correct}/{len(captions)} captions exact"
    )
    saved = model.save_pretrained(Path(args.out) / "model")
    log.info("model saved to %s", saved)
    return {"first_loss": losses[0], "last_loss": losses[-1], "exact": correct, "total": len(captions)}


if __name__ == "__main__":
    main()
