"""Evaluation metrics against the official toolkits, on hand-made files.

Caption scores are checked against pycocoevalcap's own scorers run directly
on the same files (real Java tokenizer and METEOR); gathering in a real
2-process gloo run. VQA accuracy is in test_vqa_scoring.py.
"""

import json
import logging

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from torch.utils.data import DistributedSampler

from helpers.metrics import (
    coco_caption_scores,
    format_caption,
    gather_results,
    nocaps_cider,
    spice_unavailable_reason,
    write_caption_results,
)

REFERENCES = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave.", "A person surfing in the ocean."],
    2: ["Two dogs playing with a frisbee in the grass.", "Dogs run across a field.", "A pair of dogs on a lawn."],
    3: ["A plate of food with broccoli and rice.", "A meal of rice and vegetables.", "Broccoli, rice and chicken."],
    4: ["A red bus driving down a city street.", "A double decker bus on a road.", "A bus parked by the kerb."],
    5: ["A cat sleeping on a laptop keyboard.", "A kitten lying on a computer.", "A cat on a desk."],
    6: ["A clock tower against a blue sky.", "A tall tower with a clock.", "A church steeple with a clock."],
}
CANDIDATES = {
    1: "a man riding a wave on a surfboard",
    2: "two dogs running in the grass",
    3: "a plate of rice and broccoli",
    4: "a red bus on a city street",
    5: "a cat lying on a laptop",
}


def write_gt(path, references, domains=None):
    """A COCO-format caption ground truth, as coco_karpathy_test_gt.json and the NoCaps val file are."""
    images = [{"id": i, **({"domain": domains[i]} if domains else {})} for i in references]
    anns = [{"image_id": i, "id": 10 * i + k, "caption": c} for i in references for k, c in enumerate(references[i])]
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def toolkit_tokenized(gt_file, results_file):
    """Tokenised references and results for the result images, built from the raw files."""
    gt = json.loads(gt_file.read_text())
    res = json.loads(results_file.read_text())
    ids = [r["image_id"] for r in res]
    refs = {i: [{"caption": a["caption"]} for a in gt["annotations"] if a["image_id"] == i] for i in ids}
    tok = PTBTokenizer()
    return tok.tokenize(refs), tok.tokenize({r["image_id"]: [{"caption": r["caption"]}] for r in res})


def test_format_caption():
    assert format_caption("a dog on a mat") == "A dog on a mat."
    assert format_caption("  a  dog on a mat . ") == "A dog on a mat ."
    assert format_caption("A cat.") == "A cat."
    assert format_caption("") == ""


def test_caption_results_file(tmp_path):
    path = write_caption_results(
        [{"image_id": 7, "caption": "a dog"}, {"image_id": 3, "caption": "a cat"}], tmp_path / "r.json"
    )
    assert json.loads(path.read_text()) == [{"image_id": 7, "caption": "A dog."}, {"image_id": 3, "caption": "A cat."}]
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind
    with pytest.raises(ValueError, match="more than once"):
        write_caption_results([{"image_id": 7, "caption": "a"}, {"image_id": 7, "caption": "b"}], tmp_path / "d.json")


def test_coco_caption_scores_equal_pycocoevalcap(tmp_path, caplog):
    gt_file = write_gt(tmp_path / "gt.json", REFERENCES)  # image 6 has no result: only result images count
    results_file = write_caption_results(
        [{"image_id": i, "caption": c} for i, c in CANDIDATES.items()], tmp_path / "results.json"
    )
    with caplog.at_level(logging.WARNING, logger="helpers.metrics"):
        scores = coco_caption_scores(results_file, gt_file)

    gts, res = toolkit_tokenized(gt_file, results_file)
    bleu, _ = Bleu(4).compute_score(gts, res)
    expected = {f"Bleu_{n}": b for n, b in enumerate(bleu, 1)}
    expected["METEOR"] = Meteor().compute_score(gts, res)[0]
    expected["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    expected["CIDEr"] = Cider().compute_score(gts, res)[0]
    if spice_unavailable_reason() is None:
        expected["SPICE"] = Spice().compute_score(gts, res)[0]
    else:
        assert "SPICE skipped" in caplog.text
    assert scores == pytest.approx(expected, rel=1e-9)
    assert 0 < scores["Bleu_4"] < scores["Bleu_1"] < 1 and scores["CIDEr"] > 0.5


def test_caption_scores_refuse_foreign_and_repeated_images(tmp_path):
    gt_file = write_gt(tmp_path / "gt.json", REFERENCES)
    with pytest.raises(ValueError, match="not in"):
        coco_caption_scores([{"image_id": 99, "caption": "A dog."}], gt_file)
    with pytest.raises(ValueError, match="more than once"):
        coco_caption_scores([{"image_id": 1, "caption": "A dog."}] * 2, gt_file)


def test_nocaps_cider_per_domain(tmp_path):
    domains = {1: "in-domain", 2: "in-domain", 3: "near-domain", 4: "near-domain", 5: "out-domain", 6: "out-domain"}
    gt_file = write_gt(tmp_path / "nocaps_val.json", REFERENCES, domains)
    candidates = {**CANDIDATES, 6: "a clock on a tower"}
    results_file = write_caption_results(
        [{"image_id": i, "caption": c} for i, c in candidates.items()], tmp_path / "nocaps.json"
    )
    assert {tuple(sorted(r)) for r in json.loads(results_file.read_text())} == {("caption", "image_id")}
    scores = nocaps_cider(results_file, gt_file)

    gts, res = toolkit_tokenized(gt_file, results_file)
    expected = {"overall": Cider().compute_score(gts, res)[0]}
    for domain in ("in-domain", "near-domain", "out-domain"):
        ids = [i for i in gts if domains[i] == domain]
        expected[domain] = Cider().compute_score({i: gts[i] for i in ids}, {i: res[i] for i in ids})[0]
    assert scores == pytest.approx(expected, rel=1e-12)

    write_gt(gt_file, REFERENCES)  # no domains: the Karpathy file is not a NoCaps file
    with pytest.raises(ValueError, match="domain"):
        nocaps_cider(results_file, gt_file)


DATASET_SIZE = 5


def gather_worker(rank, tmp_path):
    """One rank: the results of its DistributedSampler share (padded to equal length), gathered."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=rank, world_size=2)
    try:
        indices = list(DistributedSampler(range(DATASET_SIZE), num_replicas=2, rank=rank, shuffle=False))
        items = [{"question_id": 100 + i, "answer": f"answer {i}", "rank": rank} for i in indices]
        (tmp_path / f"rank{rank}.json").write_text(json.dumps(gather_results(items, "question_id")))
    finally:
        dist.destroy_process_group()


def test_gather_results_two_processes(tmp_path):
    padded = [list(DistributedSampler(range(DATASET_SIZE), num_replicas=2, rank=r, shuffle=False)) for r in (0, 1)]
    assert sum(map(len, padded)) == DATASET_SIZE + 1  # the sampler repeats a sample to even out the ranks
    mp.spawn(gather_worker, args=(tmp_path,), nprocs=2)
    gathered = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert gathered[0] == gathered[1]
    assert [g["question_id"] for g in gathered[0]] == [100 + i for i in range(DATASET_SIZE)]
    assert all(g["answer"] == f"answer {g['question_id'] - 100}" for g in gathered[0])
    assert gathered[0][0]["rank"] == 0  # of a padded sample's two copies, the first rank's is kept


def test_gather_results_single_process():
    items = [{"image_id": 3, "caption": "c"}, {"image_id": 1, "caption": "a"}, {"image_id": 3, "caption": "c"}]
    assert gather_results(items, "image_id") == [{"image_id": 1, "caption": "a"}, {"image_id": 3, "caption": "c"}]
