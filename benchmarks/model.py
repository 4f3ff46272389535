"""The model's own speed against this machine's limits, in one run.

For Prismer-Base and PrismerZ-Base (224 px, `freeze_lang_vision`, the
fine-tuning recipes' freeze mode, random weights) and the world model
(configs/world_vqa.yaml), measured with warm-up and medians:

- training step (forward, backward, AdamW step) in float32 and in bf16 autocast;
- caption generation (B = 2, beam 3, 20 new tokens) with and without the key/value cache;
- VQA answer ranking over 128 candidate answers (B = 2): ours, and a naive
  ranking that re-encodes the image and the question for every candidate;
- the training step's achieved GFLOP/s (FlopCounterMode) beside the float32 and
  bf16 matmul peaks measured in the same run, and peak resident memory.

    python benchmarks/model.py [--quick] [--json FILE] [--models Prismer-Base,world] [--demo]

`--demo` adds what the demo costs per photo for each model size (tiny at 224 px,
base and large at the released checkpoints' 480 px): seconds to caption one
photo whose labels exist, peak memory, and an estimate of the GPU memory needed.

`--quick` (Prismer-Base and the world model, fewer repeats, naive ranking
timed on 16 candidates and scaled to 128, linear by construction) finishes
in a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.experts import peak_mib  # noqa: E402
from common.modalities import PRISMER_EXPERTS  # noqa: E402
from helpers.distributed import hardware, matmul_gflops  # noqa: E402
from model import PrismerCaption, PrismerVQA  # noqa: E402
from model.generation import question_answer_tokens  # noqa: E402
from model.tokenizer import train_tokenizer  # noqa: E402
from tests.conftest import random_experts  # noqa: E402

B_TRAIN, B_EVAL, TOKENS, BEAMS, CANDIDATES = 4, 2, 20, 3, 128
COLOURS = ("red", "green", "blue", "yellow", "purple", "white", "black", "orange")
SHAPES = ("cube", "sphere", "cone", "cylinder", "dog", "cat", "car", "table")
ANSWERS = [f"{c} {s}" for c in COLOURS for s in SHAPES] + [str(i) for i in range(50)] + [
    "yes", "no", "left", "right", "stop", "exit", "open", "cafe", "shop", "sale", "push", "pull", "kitchen", "street"
]  # fmt: skip
QUESTIONS = ["what colour is the cube?", "how many dogs are sitting on the table?"]
CAPTIONS = ["a dog sitting on a red table next to a cat", "two people walking down a street in the rain"] * 2


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def models(quick: bool) -> dict[str, dict]:
    world = yaml.safe_load((ROOT / "configs" / "world_vqa.yaml").read_text())
    all_models = {
        "world": dict(
            prismer_model=world["prismer_model"],
            experts=world["experts"],
            image_resolution=world["image_resolution"],
            label_resolution=world["label_resolution"],
        ),
        "PrismerZ-Base": dict(prismer_model="prismerz_base", experts=[], freeze="freeze_lang_vision"),
        "Prismer-Base": dict(prismer_model="prismer_base", experts=list(PRISMER_EXPERTS), freeze="freeze_lang_vision"),
    }
    return {k: v for k, v in all_models.items() if not (quick and k == "PrismerZ-Base")}


def naive_rank(model, experts, questions, answers) -> torch.Tensor:
    """Every candidate scored from scratch: encode the image, run question + answer."""
    scores = []
    for answer in answers:
        ids, mask, labels = question_answer_tokens(model.tokenizer, questions, [answer] * len(questions), "cpu")
        loss = model.text_decoder(ids, mask, model.encode(experts), labels=labels).loss
        scores.append(-loss / (labels != -100).sum(-1))
    return torch.stack(scores, 1).argmax(1)


def measure(name: str, spec: dict, tokenizer, quick: bool, bf16: bool) -> dict:
    cfg = {"pretrained": False, "image_resolution": 224} | {k: v for k, v in spec.items() if k != "label_resolution"}
    label_res = spec.get("label_resolution", cfg["image_resolution"])
    res = cfg["image_resolution"]
    repeats = 2 if quick else 5
    row = {"model": name}

    torch.manual_seed(0)
    model = PrismerCaption(cfg, tokenizer=tokenizer).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05)
    x = random_experts(model.config.experts, B_TRAIN, res, label_res)

    def step(bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            loss = model(x, CAPTIONS[:B_TRAIN])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss = model(x, CAPTIONS[:B_TRAIN])
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    reset_peak()
    row["train_fp32_s"] = timed(lambda: step(False), repeats)
    row["peak_memory_mb"] = peak_mib()
    row["train_fp32_gflops"] = flops / row["train_fp32_s"] / 1e9
    row["train_bf16_s"] = row["train_bf16_gflops"] = None
    if bf16:
        row["train_bf16_s"] = timed(lambda: step(True), 1 if quick else 3)
        row["train_bf16_gflops"] = flops / row["train_bf16_s"] / 1e9
    row["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
    row["trainable_M"] = sum(p.numel() for p in params) / 1e6

    model.eval()
    x = random_experts(model.config.experts, B_EVAL, res, label_res)
    kw = dict(num_beams=BEAMS, max_length=TOKENS + 1, min_length=TOKENS + 1)  # <s> + 20 new tokens
    with torch.no_grad():
        row["generate_cached_s"] = timed(lambda: model.generate(x, use_cache=True, **kw), repeats)
        row["generate_uncached_s"] = timed(lambda: model.generate(x, use_cache=False, **kw), 1 if quick else 3)
        vqa = PrismerVQA(model.config, tokenizer=tokenizer).eval()
        vqa.load_state_dict(model.state_dict())
        answers = ANSWERS[:CANDIDATES]
        row["rank_s"] = timed(lambda: vqa.rank_answers(x, QUESTIONS, answers, k=CANDIDATES), repeats)
        naive = answers[:16] if quick else answers
        scale = len(answers) / len(naive)
        row["rank_naive_s"] = scale * timed(
            lambda: naive_rank(vqa, x, QUESTIONS, naive), 1, warmup=0
        )  # warm by its 2nd candidate
    return row


def caption_one_photo(size: str, resolution: int, tokenizer) -> dict:
    """What the demo costs per photo once labels exist: build the model with all
    six experts, encode one photo and write its caption (beam 3, 20 tokens), float32."""
    reset_peak()
    model = PrismerCaption(
        {"prismer_model": size, "experts": list(PRISMER_EXPERTS), "image_resolution": resolution, "pretrained": False},
        tokenizer=tokenizer,
    ).eval()
    x = random_experts(model.config.experts, 1, resolution, resolution)
    kw = dict(num_beams=BEAMS, max_length=TOKENS + 1, min_length=TOKENS + 1)
    with torch.no_grad():
        seconds = timed(lambda: model.generate(x, **kw), 2)
    params = sum(p.numel() for p in model.parameters())
    peak = peak_mib()
    # Estimate (no GPU measured): fp16 weights, plus the CPU run's memory above its
    # float32 weights halved (activations and workspace in fp16), plus ~0.5 GiB of CUDA context.
    gpu_gib = (2 * params + max(peak * 2**20 - 4 * params, 0) / 2) / 2**30 + 0.5
    return {"size": size, "resolution": resolution, "params_M": params / 1e6, "caption_s": seconds,
            "peak_mb": peak, "gpu_estimate_gib": gpu_gib}  # fmt: skip


def child(job: str, quick: bool, bf16: bool) -> dict:
    """One measurement in this (fresh) process, so its peak memory is its own."""
    kind, name = job.split(":", 1)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(CAPTIONS + QUESTIONS + ANSWERS, 400, tmp)
        if kind == "train":
            return measure(name, models(False)[name], tokenizer, quick, bf16)
        size, resolution = name.split("@")
        return caption_one_photo(size, int(resolution), tokenizer)


def run_child(job: str, args, bf16: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", job, "--bf16", "yes" if bf16 else "no"] + ["--quick"] * args.quick
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(row), file=sys.stderr)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="Prismer-Base and the world model, fewer repeats")
    p.add_argument("--json", help="write Prismer-Base's figures (and the machine's) to this file")
    p.add_argument("--models", help="comma-separated subset of: Prismer-Base, PrismerZ-Base, world")
    p.add_argument(
        "--demo", action="store_true", help="also: caption one photo per model size (tiny, base, large at 480 px)"
    )
    p.add_argument(
        "--bf16",
        choices=["auto", "yes", "no"],
        default="auto",
        help="time bf16 training (auto: where the hardware computes bf16 fast, and the world model)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.quick, args.bf16 == "yes")))
        return []
    hw = hardware()
    peaks = {
        "peak_fp32_gflops": matmul_gflops(torch.float32, 0.2),
        "peak_bf16_gflops": matmul_gflops(torch.bfloat16, 0.2),
    }
    chosen = models(args.quick)
    if args.models:
        chosen = {k: v for k, v in chosen.items() if k in args.models.split(",")}
    # Where bf16 is emulated (AVX2: ~1 GFLOP/s) a Base step in bf16 takes many minutes: time only the world's.
    rows = [
        run_child(
            f"train:{name}", args, args.bf16 == "yes" or (args.bf16 == "auto" and (hw.bf16_fast or name == "world"))
        )
        for name in chosen
    ]
    sizes = ("prismer_tiny@224", "prismer_base@480", "prismer_large@480") if args.demo else ()
    demo = [run_child(f"demo:{size}", args, False) for size in sizes]
    print(
        f"\n{hw.description}; {torch.get_num_threads()} threads; matmul peak float32 "
        f"{peaks['peak_fp32_gflops']:.0f} GFLOP/s, bf16 {peaks['peak_bf16_gflops']:.0f} GFLOP/s"
    )
    head = ("model", "train fp32 s", "train bf16 s", "GFLOP/s fp32", "% peak", "gen cached s", "uncached s",
            "rank s", "naive s", "peak MiB")  # fmt: skip
    print(" | ".join(head))
    for r in rows:
        cells = (
            r["model"],
            f"{r['train_fp32_s']:.2f}",
            f"{r['train_bf16_s']:.2f}" if r["train_bf16_s"] else "not timed",
            f"{r['train_fp32_gflops']:.0f}",
            f"{100 * r['train_fp32_gflops'] / peaks['peak_fp32_gflops']:.0f}",
            f"{r['generate_cached_s']:.2f}",
            f"{r['generate_uncached_s']:.2f}",
            f"{r['rank_s']:.2f}",
            f"{r['rank_naive_s']:.1f}",
            f"{r['peak_memory_mb']:.0f}",
        )
        print(" | ".join(cells))
    if demo:
        print("\ncaption one photo (labels given; all six experts; beam 3, 20 tokens; float32)")
        print("size | px | params M | s/photo | peak MiB | GPU GiB (estimate)")
        for r in demo:
            print(
                f"{r['size']} | {r['resolution']} | {r['params_M']:.0f} | {r['caption_s']:.1f} | {r['peak_mb']:.0f} | "
                f"{r['gpu_estimate_gib']:.1f}"
            )
    if args.json:
        base = next((r for r in rows if r["model"] == "Prismer-Base"), rows[0])
        keys = ("train_fp32_s", "train_bf16_s", "generate_cached_s", "generate_uncached_s", "rank_s", "rank_naive_s",
                "train_fp32_gflops", "train_bf16_gflops", "peak_memory_mb")  # fmt: skip
        out = {"cpu_bf16_fast": hw.bf16_fast, "device": hw.description} | peaks | {k: base[k] for k in keys}
        Path(args.json).write_text(json.dumps(out | {"rows": rows, "demo": demo}, indent=2))
    return rows


if __name__ == "__main__":
    main()
