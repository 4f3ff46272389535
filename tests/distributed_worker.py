"""Run by tests/test_distributed*.py under torchrun (gloo on CPU): one mode per check."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers import distributed  # noqa: E402
from helpers.config import RunConfig  # noqa: E402
from helpers.engine import Session, train_step  # noqa: E402
from helpers.tasks import CAPTION  # noqa: E402
from model import PrismerCaption  # noqa: E402
from model.tokenizer import load_tokenizer  # noqa: E402
from tests.conftest import CORPUS, random_experts, tiny_size  # noqa: E402

EXPERTS = ["depth", "seg_coco"]


def build(tokenizer):
    torch.manual_seed(0)
    cfg = {
        "prismer_model": tiny_size(len(tokenizer)),
        "experts": EXPERTS,
        "image_resolution": 64,
        "pretrained": False,
        "freeze": "freeze_vision",
    }
    return PrismerCaption(cfg, tokenizer=tokenizer)


def rank_slice(x, rank, per):
    return {k: v[rank * per : (rank + 1) * per] for k, v in x.items()}


def ddp_grads(out: Path, tokenizer):
    """Gradients after one backward on this rank's share of a fixed batch of 4."""
    acc = distributed.make_accelerator("no", 1, str(out), None)
    model = build(tokenizer).eval()  # no dropout: both runs see the same function
    model = acc.prepare(model)
    per = 4 // acc.num_processes
    x = rank_slice(random_experts(EXPERTS, 4, 64, seed=1), acc.process_index, per)
    captions = CORPUS[acc.process_index * per : (acc.process_index + 1) * per]
    acc.backward(model(x, captions))
    if acc.is_main_process:
        grads = {n: p.grad for n, p in acc.unwrap_model(model).named_parameters() if p.grad is not None}
        torch.save(grads, out / f"grads_{acc.num_processes}.pt")


def fsdp_roundtrip(out: Path, tokenizer):
    """Train one sharded step, then the gathered full state dict must compute what the sharded model computes."""
    acc = distributed.make_accelerator("no", 1, str(out), None, sharding="full_shard")
    model = distributed.shard_model(build(tokenizer), acc, sharding="full_shard", mixed_precision="no")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = random_experts(EXPERTS, 4, 64, seed=1)
    model(rank_slice(x, acc.process_index, 2), CORPUS[:2]).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        sharded = model.encode(x)
        # Ranks generate from different images and stop at different steps: synced_gpus keeps them in step.
        captions = model.generate(rank_slice(x, acc.process_index, 2), min_length=2, synced_gpus=True)
    weights = distributed.full_state_dict(model)
    if acc.is_main_process:
        plain = build(tokenizer).eval()
        plain.load_state_dict(weights)
        with torch.no_grad():
            torch.testing.assert_close(plain.encode(x), sharded, rtol=1e-5, atol=1e-6)
            assert plain.generate(rank_slice(x, 0, 2), min_length=2) == captions
        (out / "fsdp_ok").write_text("ok")


def nan_on_one_rank(out: Path, tokenizer, sharded: str):
    """The engine's step with a NaN in rank 1's images: both ranks skip it and
    keep identical weights; the next (finite) step trains both."""
    sharded = sharded == "1"
    sharding = "full_shard" if sharded else "none"
    cfg = RunConfig(
        prismer_model=tiny_size(len(tokenizer)),
        experts=EXPERTS,
        image_resolution=64,
        pretrained=False,
        mixed_precision="no",
        sharding=sharding,
    )
    acc = distributed.make_accelerator("no", 1, str(out), None, sharding=sharding)
    model = build(tokenizer)
    if sharded:
        model = distributed.shard_model(model, acc, sharding=sharding, mixed_precision="no")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    if not sharded:
        model, optimizer = acc.prepare(model, optimizer)
    session = Session(CAPTION, cfg, acc, model, optimizer, out)
    x = rank_slice(random_experts(EXPERTS, 4, 64, seed=1), acc.process_index, 2)
    captions = CORPUS[acc.process_index * 2 : acc.process_index * 2 + 2]

    def weights() -> dict:  # copies: on CPU, full_state_dict of an unsharded model is the live tensors
        return {k: v.clone() for k, v in distributed.full_state_dict(acc.unwrap_model(model)).items()}

    before = weights()
    poisoned = {k: v.clone() for k, v in x.items()}
    if acc.process_index == 1:
        poisoned["rgb"][0, 0, 0, 0] = float("nan")
    skipped = train_step(session, (poisoned, captions), lr=1e-2) is None
    after_nan = weights()
    assert train_step(session, (x, captions), lr=1e-2) is not None
    after = weights()
    flags = acc.gather(torch.tensor([float(skipped)]))
    # Data-parallel replicas' parameters must still agree (batch-norm statistics are per replica;
    # sharded ranks hold parts: rank 0 has the whole).
    params = [n for n, _ in acc.unwrap_model(model).named_parameters()]
    checksum = None if sharded else acc.gather(torch.stack([sum(after[n].double().sum() for n in params)]))
    if acc.is_main_process:
        result = {
            "skipped": [bool(f) for f in flags.tolist()],
            "unchanged_by_skip": all(torch.equal(before[k], after_nan[k]) for k in before),
            "trained_after": any(not torch.equal(before[k], after[k]) for k in before),
            "replicas_agree": checksum is None or bool((checksum == checksum[0]).all()),
        }
        (out / "nan_ok.json").write_text(json.dumps(result))


if __name__ == "__main__":
    mode, out, tok = sys.argv[1], Path(sys.argv[2]), load_tokenizer(sys.argv[3])
    modes = {"ddp_grads": ddp_grads, "fsdp_roundtrip": fsdp_roundtrip, "nan_on_one_rank": nan_on_one_rank}
    modes[mode](out, tok, *sys.argv[4:])
