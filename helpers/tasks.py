"""The three tasks the engine trains: what their batches mean and how they are evaluated."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from tqdm import tqdm

from helpers.engine import Task
from model import PrismerCaption, PrismerVQA

log = logging.getLogger(__name__)


def _datasets(kind: str):
    def make(cfg):
        from dataset import create_dataset

        return create_dataset(kind, cfg)

    return make


def caption_loss(model, batch, cfg):
    experts, captions = batch
    return model(experts, captions, prefix=cfg.prefix)


def vqa_loss(model, batch, cfg):
    experts, questions, answers, weights, per_question = batch
    return model(experts, questions, answers, weights, answers_per_question=torch.tensor(per_question))


def image_id(entry: dict, dataset: str):
    """COCO ids come from the file name (COCO_val2014_000000391895.jpg); NoCaps
    lists carry img_id; a folder of one's own images is keyed by file path."""
    if dataset == "demo":
        return entry["image"]
    if "img_id" in entry:
        return entry["img_id"]
    digits = re.findall(r"\d+", Path(entry["image"]).stem)
    return int(digits[-1]) if digits else entry["image"]


GT_FILES = {"coco": "coco_karpathy_test_gt.json", "nocaps": "nocaps_val_4500_captions.json"}


@torch.no_grad()
def caption_evaluate(session, loader) -> dict:
    from helpers.metrics import coco_caption_scores, format_caption, gather_results, nocaps_cider, write_caption_results

    cfg, accelerator, out_dir = session.cfg, session.accelerator, session.out_dir
    m = accelerator.unwrap_model(session.model).eval()
    results = []
    for experts, index in tqdm(loader, desc="caption eval", disable=not accelerator.is_main_process):
        captions = m.generate(
            experts,
            prefix=cfg.prefix,
            num_beams=cfg.num_beams,
            max_length=cfg.max_length,
            min_length=cfg.min_length,
            **session.generate_kwargs(),
        )
        for i, caption in zip(index.tolist(), captions):
            entry = loader.dataset.data_list[i]
            results.append({"image_id": image_id(entry, cfg.dataset), "caption": format_caption(caption)})
    results = gather_results(results, "image_id")
    metrics = {}
    if accelerator.is_main_process:
        write_caption_results(results, out_dir / f"caption_results_{cfg.dataset}.json")
        gt = Path(cfg.gt_file or Path(cfg.data_path) / GT_FILES.get(cfg.dataset, ""))
        if gt.is_file():
            score = nocaps_cider if cfg.dataset == "nocaps" else coco_caption_scores
            metrics = {f"eval/{k}": v for k, v in score(results, gt).items()}
        else:
            log.info("no ground truth at %s: results written, not scored", gt)
    session.model.train()
    return metrics


def answer_truth(entry: dict) -> dict:
    """A VQA list entry as the metric's annotation; its type (VQAv2's
    `answer_type`, or the synthetic world's `question_type`) gives per-type
    accuracy, so a training curve shows which kinds of question are learned."""
    truth = {"question_id": entry["question_id"], "answers": entry["answer"]}
    kind = entry.get("answer_type", entry.get("question_type"))
    return truth if kind is None else truth | {"answer_type": kind}


@torch.no_grad()
def vqa_evaluate(session, loader) -> dict:
    from helpers.metrics import gather_results, vqa_accuracy, write_vqa_results

    cfg, accelerator, out_dir = session.cfg, session.accelerator, session.out_dir
    m = accelerator.unwrap_model(session.model).eval()
    answer_list = loader.dataset.answer_list
    results = []
    for experts, _index, questions, qids in tqdm(loader, desc="vqa eval", disable=not accelerator.is_main_process):
        if cfg.inference == "rank":
            picks = m.rank_answers(experts, questions, answer_list, k=cfg.k_test)
            answers = [answer_list[i] for i in picks.tolist()]
        else:
            answers = m.generate(experts, questions, num_beams=cfg.num_beams, **session.generate_kwargs())
        results += [{"question_id": q, "answer": a} for q, a in zip(qids, answers)]
    results = gather_results(results, "question_id")
    metrics = {}
    if accelerator.is_main_process:
        submission = write_vqa_results(results, out_dir / "vqa_submission.json")
        truth = [answer_truth(e) for e in loader.dataset.data_list if "answer" in e]
        if truth:  # a local split with answers (test-dev answers are on the evaluation server only)
            # scored from the written file, so the number is the one the submission gets
            scores = vqa_accuracy(submission, truth)
            metrics = {"eval/accuracy": scores["overall"]}
            metrics |= {f"eval/accuracy/{t}": v for t, v in scores["per_answer_type"].items()}
    session.model.train()
    return metrics


CAPTION = Task("caption", PrismerCaption, _datasets("caption"), caption_loss, caption_evaluate, "eval/CIDEr")
VQA = Task("vqa", PrismerVQA, _datasets("vqa"), vqa_loss, vqa_evaluate, "eval/accuracy")
PRETRAIN = Task("pretrain", PrismerCaption, lambda cfg: (_datasets("pretrain")(cfg), None), caption_loss)
