"""The one training engine under train_pretrain.py, train_caption.py and
train_vqa.py: config, data, model, optimisation, checkpoints, evaluation."""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm import tqdm

from helpers import checkpoint, distributed
from helpers.config import RunConfig, load_config
from helpers.distributed import make_accelerator

log = logging.getLogger("engine")


class TrainingStopped(RuntimeError):
    pass


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
    p.add_argument(
        "--mixed_precision", default="fp16" if torch.cuda.is_available() else "no", choices=["no", "fp16", "bf16"]
    )
    p.add_argument("--shard_grad_op", action="store_true", help="FSDP2, ZeRO-2")
    p.add_argument("--full_shard", action="store_true", help="FSDP2, ZeRO-3")
    p.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    return p.parse_args(argv)


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
    sharded: bool
    out_dir: Path

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
        if test_set is None or self.task.evaluate is None:
            return {}
        return self.task.evaluate(self, self.loader(test_set, train=False))

    def generate_kwargs(self) -> dict:
        # Sharded generation: every rank keeps stepping until all are done.
        return {"synced_gpus": True} if self.sharded else {}


def run(task: Task, argv=None, description: str = "", default_config: str = "", default_section=None) -> dict:
    """Train (unless --evaluate) and evaluate; returns the final metrics."""
    args = parse_args(argv, description, default_config, default_section)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    seed = [f"seed={args.seed}"] if args.seed is not None else []
    cfg = load_config(args.config, args.target_dataset, args.set + seed)
    out_dir = Path(cfg.output_dir) / f"{task.name}_{args.exp_name}"
    resume = None
    if args.from_checkpoint:
        resume = checkpoint.resolve(args.from_checkpoint, out_dir / "checkpoints")
        if resume is None and not args.fresh_if_missing:
            raise FileNotFoundError(
                f"--from_checkpoint: no complete checkpoint in {out_dir / 'checkpoints'}; "
                "pass --fresh_if_missing to start fresh"
            )
    if args.shard_grad_op and args.full_shard:
        raise ValueError("choose one of --shard_grad_op and --full_shard")
    sharded = args.shard_grad_op or args.full_shard
    accelerator = make_accelerator(args.mixed_precision, cfg.grad_accum_steps, str(out_dir), cfg.tracker, sharded)
    set_seed(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    train_set, test_set = task.datasets(cfg)
    model = build_model(task, cfg)
    tokenizer = model.tokenizer
    if sharded:
        model = distributed.shard_model(model, accelerator, args.full_shard, args.mixed_precision)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.init_lr, weight_decay=cfg.weight_decay)
    if not sharded:
        model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.unwrap_model(model).tokenizer = tokenizer
    if accelerator.log_with:
        accelerator.init_trackers(task.name, config={k: str(v) for k, v in cfg.to_dict().items()})
    session = Session(task, cfg, accelerator, model, optimizer, sharded, out_dir)

    progress = {"epoch": 0, "batch": 0, "step": 0, "best": None, "skipped_nan": 0}
    if resume is not None:
        progress = session.load_checkpoint(resume)
        log.info("resumed from %s at epoch %d, batch %d", resume, progress["epoch"], progress["batch"])

    if not args.evaluate and train_set is not None:
        metrics = train(session, train_set, test_set, progress)
    else:
        metrics = session.evaluate(test_set)
    accelerator.end_training()
    if accelerator.is_main_process:
        summary(task.name, metrics, progress)
    return metrics


def train(session: Session, train_set, test_set, progress: dict) -> dict:
    cfg, accelerator, model, optimizer = session.cfg, session.accelerator, session.model, session.optimizer
    loader = session.loader(train_set, train=True)
    try:
        steps_per_epoch = len(loader)
    except TypeError:  # a streamed (web-scale) dataset
        steps_per_epoch = None
    total_steps = steps_per_epoch * cfg.max_epoch if steps_per_epoch else None
    metrics: dict = {}
    nan_run = 0
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
            for group in optimizer.param_groups:
                group["lr"] = lr
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = session.task.loss(model, batch, cfg)
                finite = accelerator.reduce(torch.isfinite(loss.detach()).float(), "min").item() == 1.0
                if finite:
                    accelerator.backward(loss)  # divided by grad_accum_steps
                    if accelerator.sync_gradients:
                        if cfg.grad_clip:
                            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                        optimizer.step()
                if accelerator.sync_gradients or not finite:
                    optimizer.zero_grad()
            progress.update(batch=loader.position, step=progress["step"] + 1)
            if not finite:
                nan_run += 1
                progress["skipped_nan"] += 1
                log.warning("non-finite loss at epoch %d batch %d: step skipped", epoch, loader.position - 1)
                if nan_run >= cfg.max_nan_steps:
                    raise TrainingStopped(
                        f"{nan_run} non-finite losses in a row; the last checkpoint in {session.ckpt_dir} is intact"
                    )
                continue
            nan_run = 0
            loss_sum, n_loss = loss_sum + loss.item(), n_loss + 1
            seen += batch_size(batch) * accelerator.num_processes
            rate = seen / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
            if progress["step"] % cfg.log_every_steps == 0:
                accelerator.log(
                    {"train/loss": loss.item(), "train/lr": lr, "train/samples_per_s": rate}, step=progress["step"]
                )
            if cfg.save_every_steps and progress["step"] % cfg.save_every_steps == 0:
                session.save_checkpoint(progress)
            if cfg.max_train_steps and progress["step"] >= cfg.max_train_steps:
                session.save_checkpoint(progress)  # resumable mid-epoch
                return {"train/loss_epoch": loss_sum / max(1, n_loss)}
        progress.update(epoch=epoch + 1, batch=0)
        metrics = {"train/loss_epoch": loss_sum / max(1, n_loss)}
        every = cfg.eval_every_epochs
        if epoch + 1 == cfg.max_epoch or (every and (epoch + 1) % every == 0):
            metrics |= session.evaluate(test_set)
        accelerator.log(metrics, step=progress["step"])
        key = session.task.best_metric
        improved = key in metrics and (progress["best"] is None or metrics[key] > progress["best"])
        if improved:
            progress["best"] = metrics[key]
        session.save_checkpoint(progress)
        if improved:
            checkpoint.save_model(accelerator, model, session.out_dir / "best")
    checkpoint.save_model(accelerator, model, session.out_dir / "final")
    return metrics


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
