"""The one training engine under train_pretrain.py, train_caption.py and
train_vqa.py: config, data, model, optimisation, checkpoints, evaluation.

`run(task, cfg, options)` is the entry point, from Python (the sandbox's jobs)
as from the scripts, whose `main(argv)` turns a command line into its
arguments with `from_argv`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list, set_seed
from tqdm import tqdm

from common.files import atomic_write
from helpers import checkpoint, distributed
from helpers.config import RunConfig, adopt_checkpoint_model, load_config
from helpers.distributed import PRECISIONS, make_accelerator

log = logging.getLogger("engine")
# Every evaluation of a run, one JSON object per line: {"epoch", "step", metric: value, ...}.
EVAL_HISTORY = "eval_history.jsonl"


class TrainingStopped(RuntimeError):
    pass


def cli(main) -> None:
    """Run a script's `main`: a user's mistake (bad config, missing or broken
    file, unusable data, a run that cannot train) ends in one line naming it,
    not a traceback; PRISMER_TRACEBACK=1 shows the traceback too."""
    from dataset.loader import DataError

    try:
        main()
    except (ValueError, OSError, TrainingStopped, DataError) as e:
        if os.environ.get("PRISMER_TRACEBACK"):
            raise
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(1)


def parse_args(argv, description: str, default_config: str, default_section: str | None):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=default_config, help="recipe YAML")
    p.add_argument("--target_dataset", default=default_section, help="section of the recipe (e.g. coco, nocaps)")
    p.add_argument("--exp_name", default="run", help="run name: outputs go to <output_dir>/<task>_<exp_name>")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument(
        "--from_checkpoint",
        nargs="?",
        const="latest",
        default=None,
        help="resume: a checkpoint folder, or the run's latest when no value is given",
    )
    p.add_argument("--fresh_if_missing", action="store_true", help="with --from_checkpoint: start fresh if none")
    p.add_argument("--evaluate", action="store_true", help="evaluate only")
    # Shortcuts for config keys (they win over --set).
    p.add_argument(
        "--mixed_precision",
        choices=PRECISIONS,
        help="sets mixed_precision (default auto: bf16 where the hardware computes it fast, else fp16 on a GPU, "
        "float32 on a CPU)",
    )
    shard = p.add_mutually_exclusive_group()
    shard.add_argument("--shard_grad_op", action="store_true", help="sets sharding=shard_grad_op (FSDP2, ZeRO-2)")
    shard.add_argument("--full_shard", action="store_true", help="sets sharding=full_shard (FSDP2, ZeRO-3)")
    p.add_argument("--seed", type=int, default=None, help="sets seed")
    return p.parse_args(argv)


def shortcut_overrides(args) -> list[str]:
    """The shortcut flags as `key=value` overrides (values JSON-quoted: YAML would read `no` as false)."""
    keys = {
        "seed": args.seed,
        "mixed_precision": args.mixed_precision,
        "sharding": "shard_grad_op" if args.shard_grad_op else "full_shard" if args.full_shard else None,
    }
    return [f"{k}={json.dumps(v)}" for k, v in keys.items() if v is not None]


def lr_at(cfg: RunConfig, epoch: int, global_step: int, total_steps: int | None) -> float:
    """The official schedules: linear warm-up (pre-training), then cosine to
    min_lr, per step (captioning) or per epoch (pre-training, VQA)."""
    if global_step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.init_lr - cfg.warmup_lr) * global_step / cfg.warmup_steps
    if cfg.schedule == "cosine_step":
        if not total_steps:
            raise ValueError("schedule cosine_step needs a dataset of known length; use cosine_epoch for streams")
        progress = global_step / total_steps
    else:
        progress = epoch / cfg.max_epoch
    return cfg.min_lr + (cfg.init_lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Task:
    """What differs between the three scripts."""

    name: str
    model_cls: type
    datasets: callable  # cfg -> (train, test or None)
    loss: callable  # (model, batch, cfg) -> scalar loss
    evaluate: callable | None = None  # (session, loader) -> metrics dict (on the main process)
    best_metric: str | None = None


def build_model(task: Task, cfg: RunConfig, tokenizer=None):
    model_cfg = cfg.model_config()
    if cfg.init_checkpoint:
        model_cfg.pretrained = False  # every weight comes from the checkpoint: no CLIP/RoBERTa download
    model = task.model_cls(model_cfg, tokenizer=tokenizer)
    if cfg.init_checkpoint:
        model.load_official(cfg.init_checkpoint)  # ours (safetensors folder) or official; grid resized
    return model


@dataclass
class Session:
    """One run's live objects; `sharded` runs keep model/optimizer out of
    accelerate's hands (FSDP2 is applied in helpers.distributed)."""

    task: Task
    cfg: RunConfig
    accelerator: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    out_dir: Path

    @property
    def sharded(self) -> bool:
        return self.cfg.sharding != "none"

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def loader(self, dataset, train: bool):
        from dataset import create_loader

        cfg, acc = self.cfg, self.accelerator
        return create_loader(
            dataset,
            cfg.batch_size_train if train else cfg.batch_size_test,
            cfg.num_workers,
            train,
            collate_fn=dataset.collate,
            seed=cfg.seed,
            rank=acc.process_index,
            world_size=acc.num_processes,
            device=acc.device,
            max_bad_fraction=cfg.max_bad_fraction,
            # Sharded evaluation needs every rank to run the same number of batches.
            pad=self.sharded and not train,
        )

    def _sharded_parts(self) -> tuple:
        # Prepared (DDP) model and optimizer are saved by accelerate itself.
        return (self.model, self.optimizer) if self.sharded else (None, None)

    def save_checkpoint(self, progress: dict) -> None:
        checkpoint.save(self.accelerator, self.ckpt_dir, progress, self.cfg.keep_last, *self._sharded_parts())

    def load_checkpoint(self, path: Path) -> dict:
        return checkpoint.load(self.accelerator, path, *self._sharded_parts())

    def evaluate(self, test_set) -> dict:
        """Metrics on every rank (scored on the main one), so that all ranks
        agree whether the model improved: saving `best/` is collective when sharded."""
        if test_set is None or self.task.evaluate is None:
            return {}
        metrics = [self.task.evaluate(self, self.loader(test_set, train=False))]
        return broadcast_object_list(metrics)[0]

    def generate_kwargs(self) -> dict:
        # Sharded generation: every rank keeps stepping until all are done.
        return {"synced_gpus": True} if self.sharded else {}


@dataclass
class RunOptions:
    """How to start a run, beside its config: what a command line says that is not a config key."""

    exp_name: str = "run"  # outputs go to <output_dir>/<task>_<exp_name>
    from_checkpoint: str | None = None  # resume: a training checkpoint folder, or "latest" (the run's newest)
    fresh_if_missing: bool = False  # with from_checkpoint: start fresh when there is no checkpoint
    evaluate: bool = False  # evaluate only


def from_argv(argv, description: str, default_config: str, default_section: str | None) -> tuple[RunConfig, RunOptions]:
    """A script's command line as a run: the recipe with its --set overrides and
    shortcut flags, init_checkpoint's architecture taken over the recipe's
    (except keys the command line sets), and the options. Logs to the terminal."""
    args = parse_args(argv, description, default_config, default_section)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(args.config, args.target_dataset, args.set + shortcut_overrides(args))
    if cfg.init_checkpoint:
        cfg, taken = adopt_checkpoint_model(cfg, {item.partition("=")[0].strip() for item in args.set})
        for key, value in taken.items():
            log.info("%s: %s taken from init_checkpoint %s", key, value, cfg.init_checkpoint)
    return cfg, RunOptions(args.exp_name, args.from_checkpoint, args.fresh_if_missing, args.evaluate)


def run(task: Task, cfg: RunConfig, options: RunOptions | None = None) -> dict:
    """Train (unless options.evaluate) and evaluate `cfg`; returns the final metrics.
    The run's config.json is `cfg` with its precision decided (helpers.distributed)."""
    options = options or RunOptions()
    distributed.stop_with_launcher()
    out_dir = Path(cfg.output_dir) / f"{task.name}_{options.exp_name}"
    resume = None
    if options.from_checkpoint:
        resume = checkpoint.resolve(options.from_checkpoint, out_dir / "checkpoints")
        if resume is None and not options.fresh_if_missing:
            raise FileNotFoundError(
                f"--from_checkpoint: no complete checkpoint in {out_dir / 'checkpoints'}; "
                "pass --fresh_if_missing to start fresh"
            )
    cfg = dataclasses.replace(cfg, mixed_precision=distributed.resolve_precision(cfg.mixed_precision, cfg.sharding))
    accelerator = make_accelerator(cfg.mixed_precision, cfg.grad_accum_steps, str(out_dir), cfg.tracker, cfg.sharding)
    set_seed(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    train_set, test_set = task.datasets(cfg)
    model = build_model(task, cfg)
    tokenizer = model.tokenizer
    if cfg.sharding != "none":
        model = distributed.shard_model(model, accelerator, cfg.sharding, cfg.mixed_precision)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for all parameters (measured 4% of a Prismer-Base CPU step, 13% of the world model's)
    optimizer = torch.optim.AdamW(params, lr=cfg.init_lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.sharding == "none":
        model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.unwrap_model(model).tokenizer = tokenizer
    if accelerator.log_with:
        accelerator.init_trackers(task.name, config={k: str(v) for k, v in cfg.to_dict().items()})
    session = Session(task, cfg, accelerator, model, optimizer, out_dir)

    progress = {"epoch": 0, "batch": 0, "step": 0, "best": None, "skipped_nan": 0}
    if resume is not None:
        progress = session.load_checkpoint(resume)
        log.info("resumed from %s at epoch %d, batch %d", resume, progress["epoch"], progress["batch"])

    if not options.evaluate and train_set is not None:
        metrics = train(session, train_set, test_set, progress)
    else:
        metrics = session.evaluate(test_set)
    accelerator.end_training()
    if accelerator.is_main_process:
        summary(task.name, metrics, progress)
    return metrics


def train_step(session: Session, batch, lr: float) -> float | None:
    """One micro-batch: forward, backward and (when gradients sync) an
    optimizer step. Returns the loss averaged over all ranks, or None when
    any rank's loss is non-finite: then every rank skips the step together
    (DDP and FSDP would otherwise hang or average a NaN into every replica)."""
    cfg, accelerator, model, optimizer = session.cfg, session.accelerator, session.model, session.optimizer
    for group in optimizer.param_groups:
        group["lr"] = lr
    # Batch-norm statistics move in forward: a skipped step must not keep what a NaN batch did to them.
    stats = [(b, b.clone()) for b in model.buffers()]
    with accelerator.accumulate(model):
        # Precision: accelerate autocasts the prepared model's forward; FSDP2 casts a sharded one's parameters.
        loss = session.task.loss(model, batch, cfg)
        # One all-reduce carries both: the summed loss and the number of ranks whose loss is not finite.
        local = loss.detach().float()
        total = accelerator.reduce(torch.stack([local, (~torch.isfinite(local)).float()]), "sum")
        finite = total[1].item() == 0
        if finite:
            accelerator.backward(loss)  # divided by grad_accum_steps
            if accelerator.sync_gradients:
                if cfg.grad_clip:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
        else:
            for buffer, saved in stats:
                buffer.copy_(saved)
        if accelerator.sync_gradients or not finite:
            optimizer.zero_grad()
    return total[0].item() / accelerator.num_processes if finite else None


def train(session: Session, train_set, test_set, progress: dict) -> dict:
    cfg, accelerator, model = session.cfg, session.accelerator, session.model
    loader = session.loader(train_set, train=True)
    try:
        steps_per_epoch = len(loader)
    except TypeError:  # a streamed (web-scale) dataset
        steps_per_epoch = None
    total_steps = steps_per_epoch * cfg.max_epoch if steps_per_epoch else None
    log.info(
        "training on %d process(es): global batch %d (%d per process x %d accumulation step(s)), %s steps per epoch",
        accelerator.num_processes,
        cfg.batch_size_train * accelerator.num_processes * cfg.grad_accum_steps,
        cfg.batch_size_train,
        cfg.grad_accum_steps,
        steps_per_epoch or "unknown (streamed)",
    )
    metrics: dict = {}
    nan_run, trained, skipped = 0, 0, 0
    for epoch in range(progress["epoch"], cfg.max_epoch):
        start = progress["batch"] if epoch == progress["epoch"] else 0
        loader.set_epoch(epoch, start)  # the batches before `start` are skipped unread
        model.train()
        bar = tqdm(
            loader,
            total=steps_per_epoch,
            initial=start,
            desc=f"epoch {epoch}",
            disable=not accelerator.is_main_process,
        )
        t0, seen, loss_sum, n_loss = time.perf_counter(), 0, 0.0, 0
        for batch in bar:
            lr = lr_at(cfg, epoch, progress["step"], total_steps)
            loss = train_step(session, batch, lr)
            progress.update(batch=loader.position, step=progress["step"] + 1)
            if loss is None:
                nan_run, skipped = nan_run + 1, skipped + 1
                progress["skipped_nan"] += 1
                log.warning(
                    "non-finite loss at epoch %d batch %d: step skipped on every rank", epoch, loader.position - 1
                )
                if nan_run >= cfg.max_nan_steps:
                    raise TrainingStopped(
                        f"{nan_run} non-finite losses in a row; the last checkpoint in {session.ckpt_dir} is intact"
                    )
            else:
                nan_run, trained = 0, trained + 1
                loss_sum, n_loss = loss_sum + loss, n_loss + 1
                seen += batch_size(batch) * accelerator.num_processes
                rate = seen / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
                if progress["step"] % cfg.log_every_steps == 0:
                    accelerator.log(
                        {"train/loss": loss, "train/lr": lr, "train/samples_per_s": rate}, step=progress["step"]
                    )
            if cfg.save_every_steps and progress["step"] % cfg.save_every_steps == 0:
                session.save_checkpoint(progress)
            if cfg.max_train_steps and progress["step"] >= cfg.max_train_steps:
                session.save_checkpoint(progress)  # resumable mid-epoch
                check_trained(session, trained, skipped)
                return {"train/loss_epoch": loss_sum / max(1, n_loss)}
        progress.update(epoch=epoch + 1, batch=0)
        metrics = {"train/loss_epoch": loss_sum / max(1, n_loss)}
        every = cfg.eval_every_epochs
        if epoch + 1 == cfg.max_epoch or (every and (epoch + 1) % every == 0):
            metrics |= session.evaluate(test_set)
            if accelerator.is_main_process:
                record_evaluation(session.out_dir / EVAL_HISTORY, progress, metrics)
        accelerator.log(metrics, step=progress["step"])
        key = session.task.best_metric
        improved = key in metrics and (progress["best"] is None or metrics[key] > progress["best"])
        if improved:
            progress["best"] = metrics[key]
        session.save_checkpoint(progress)
        if improved:
            checkpoint.save_model(accelerator, model, session.out_dir / "best")
    check_trained(session, trained, skipped)
    checkpoint.save_model(accelerator, model, session.out_dir / "final")
    return metrics


def record_evaluation(path: Path, progress: dict, metrics: dict) -> None:
    """Appends one evaluation to the run's history (one JSON object per line), so
    the training curve can be read without a tracker. Entries at or after this
    step are dropped first: a resumed run repeats them."""
    entry = {"epoch": progress["epoch"], "step": progress["step"]} | metrics
    kept = [e for e in read_evaluations(path) if e["step"] < progress["step"]] if path.exists() else []
    text = "".join(f"{json.dumps(e)}\n" for e in [*kept, entry])
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_evaluations(path: Path) -> list[dict]:
    """A run's evaluation history (`record_evaluation`), oldest first."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def check_trained(session: Session, trained: int, skipped: int) -> None:
    """A run none of whose steps trained must not look like a success."""
    if trained == 0 and skipped:
        raise TrainingStopped(
            f"every step of this run had a non-finite loss ({skipped} skipped): nothing was "
            f"trained and no model is written; the last checkpoint in {session.ckpt_dir} is intact"
        )


def batch_size(batch) -> int:
    return int(batch[0]["rgb"].shape[0])


def summary(task: str, metrics: dict, progress: dict) -> None:
    rows = [
        ("epochs", progress["epoch"]),
        ("steps", progress["step"]),
        ("skipped (non-finite)", progress["skipped_nan"]),
    ]
    rows += [(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in metrics.items()]
    width = max(len(str(k)) for k, _ in rows)
    print(f"\n{task} summary")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
