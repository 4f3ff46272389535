"""Evaluation metrics and result files for COCO captions, NoCaps and VQAv2.

Captions are scored with the official COCO caption toolkit (pycocoevalcap on
top of pycocotools, with its Java PTB tokenizer and METEOR), so the numbers are
comparable with the paper's. VQA accuracy follows the rules of the official
VQA evaluation script (re-implemented here). Everything here is a plain
function of result lists and annotation files: the training scripts gather,
write and score with it; no model code.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch.distributed as dist
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import get_stanford_models as spice_models
from pycocoevalcap.spice import spice as spice_module
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from pycocotools.coco import COCO

from common.files import atomic_write

log = logging.getLogger(__name__)

NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")


# ---------------------------------------------------------------- result files


def write_json_atomic(obj, path: str | os.PathLike) -> Path:
    """Write JSON through a temporary file and a rename, so a killed run never
    leaves a half-written results file that a later step would read."""
    path = Path(path)

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)
    return path


def _load_list(results: str | os.PathLike | Sequence[dict]) -> list[dict]:
    """Results given either as a list of dicts or as the JSON file holding one."""
    if isinstance(results, (str, os.PathLike)):
        with open(results) as f:
            return json.load(f)
    return list(results)


def _check_unique(results: Sequence[dict], key: str) -> None:
    """Fail on repeated ids: the official scorers would silently double-count them
    (or assert deep inside) when sampler padding was not removed."""
    counts = defaultdict(int)
    for r in results:
        if key not in r:
            raise ValueError(f"result {r!r} has no {key!r}")
        counts[r[key]] += 1
    repeated = sorted(k for k, n in counts.items() if n > 1)
    if repeated:
        raise ValueError(
            f"{len(repeated)} {key}s appear more than once (first: {repeated[:5]}); gather_results drops repeats"
        )


def format_caption(caption: str) -> str:
    """Capitalised, single-spaced, with a final period: the form the official
    Prismer evaluation writes captions in."""
    text = " ".join(caption.split())
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def write_caption_results(results: Iterable[dict], path: str | os.PathLike) -> Path:
    """Captions as `[{"image_id", "caption"}]`: the COCO results format, which is
    also the NoCaps submission format (integer ids); a folder of one's own
    images keeps file paths as ids. Captions go through `format_caption`."""
    out = [{"image_id": r["image_id"], "caption": format_caption(str(r["caption"]))} for r in results]
    _check_unique(out, "image_id")
    return write_json_atomic(out, path)


def write_vqa_results(results: Iterable[dict], path: str | os.PathLike) -> Path:
    """Answers as `[{"question_id", "answer"}]`: the VQAv2 test-dev submission format."""
    out = [{"question_id": int(r["question_id"]), "answer": str(r["answer"])} for r in results]
    _check_unique(out, "question_id")
    return write_json_atomic(out, path)


# ------------------------------------------------------------ gathering ranks


def gather_results(items: Sequence[dict], key: str) -> list[dict]:
    """All ranks' results on every rank, one per `key`, sorted by `key`.

    DistributedSampler pads the last round by repeating samples, so the same
    id comes back from two ranks; the first copy is kept. The sort makes the
    files identical whatever the number of processes. Without an initialised
    process group this only de-duplicates and sorts.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, list(items))
        items = [item for rank_items in per_rank for item in rank_items]
    unique = {}
    for item in items:
        unique.setdefault(item[key], item)
    return [unique[k] for k in sorted(unique)]


# ------------------------------------------------------------------- captions


def _java_missing() -> None:
    """The PTB tokenizer and METEOR are Java programs; say so before they fail obscurely."""
    if shutil.which("java") is None:
        raise RuntimeError("the COCO caption toolkit needs Java (e.g. apt-get install default-jre-headless)")


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run here, or None if it can.

    pycocoevalcap downloads Stanford CoreNLP for SPICE on first use; where that
    download cannot happen, constructing its scorer would fail, so the jars are
    checked beforehand.
    """
    if shutil.which("java") is None:
        return "java is not on PATH"
    spice_dir = Path(spice_module.__file__).parent
    lib = Path(spice_models.SPICEDIR) / spice_models.SPICELIB
    needed = [
        spice_dir / spice_module.SPICE_JAR,
        lib / f"{spice_models.JAR}.jar",
        lib / f"{spice_models.JAR}-models.jar",
    ]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        return (
            f"missing {', '.join(missing)} (pycocoevalcap fetches Stanford CoreNLP "
            f"from nlp.stanford.edu on first use; run pycocoevalcap.spice.get_stanford_models once online)"
        )
    return None


def _spice(gts: dict, res: dict) -> float | None:
    """SPICE, or None (logged) when its jars are absent or the Java run fails."""
    reason = spice_unavailable_reason()
    if reason is None:
        try:
            return float(spice_module.Spice().compute_score(gts, res)[0])
        except (subprocess.CalledProcessError, OSError, ValueError) as e:
            reason = f"the SPICE run failed ({e})"
    log.warning("SPICE skipped: %s", reason)
    return None


def _tokenized_pairs(results, gt_file) -> tuple[COCO, dict, dict]:
    """Ground truth and results for the result images, PTB-tokenised as in the
    official toolkit (lower-cased, punctuation dropped)."""
    _java_missing()
    results = [{"image_id": r["image_id"], "caption": r["caption"]} for r in _load_list(results)]
    if not results:
        raise ValueError("no caption results to score")
    _check_unique(results, "image_id")
    coco = COCO(str(gt_file))
    unknown = {r["image_id"] for r in results} - set(coco.getImgIds())
    if unknown:
        raise ValueError(f"{len(unknown)} result image_ids are not in {gt_file} (first: {sorted(unknown)[:5]})")
    coco_res = coco.loadRes(results)
    img_ids = coco_res.getImgIds()
    if len(img_ids) < len(coco.getImgIds()):
        log.warning("scoring %d of the %d images in %s", len(img_ids), len(coco.getImgIds()), gt_file)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: coco.imgToAnns[i] for i in img_ids})
    res = tokenizer.tokenize({i: coco_res.imgToAnns[i] for i in img_ids})
    return coco, gts, res


def coco_caption_scores(results, gt_file: str | os.PathLike) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE when usable) of caption
    results (list or results JSON) against a COCO-format ground truth such as
    `coco_karpathy_test_gt.json`, on the images the results cover.

    Keys and scales are pycocoevalcap's (`Bleu_4`, `CIDEr`, ... as fractions;
    the paper's CIDEr is 100x).
    """
    _, gts, res = _tokenized_pairs(results, gt_file)
    bleu, _ = Bleu(4).compute_score(gts, res)
    scores = {f"Bleu_{n}": float(b) for n, b in enumerate(bleu, 1)}
    scores["METEOR"] = float(Meteor().compute_score(gts, res)[0])
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    spice = _spice(gts, res)
    if spice is not None:
        scores["SPICE"] = spice
    return scores


def nocaps_cider(results, gt_file: str | os.PathLike) -> dict[str, float]:
    """CIDEr per NoCaps domain (`in-domain`, `near-domain`, `out-domain`) and
    `overall`, against the NoCaps val annotations (COCO format, each image
    carrying a `domain`).

    Each domain is scored as its own corpus (CIDEr's document frequencies come
    from that domain's images), as per-domain NoCaps evaluations run the COCO
    toolkit on each domain's images. Domains with no result images are left out.
    """
    coco, gts, res = _tokenized_pairs(results, gt_file)
    domains = defaultdict(list)
    for img_id in gts:
        domain = coco.imgs[img_id].get("domain")
        if domain not in NOCAPS_DOMAINS:
            raise ValueError(f"image {img_id} in {gt_file} has domain {domain!r}, not one of {NOCAPS_DOMAINS}")
        domains[domain].append(img_id)
    scores = {}
    for domain in NOCAPS_DOMAINS:
        ids = domains.get(domain)
        if ids:
            scores[domain] = float(Cider().compute_score({i: gts[i] for i in ids}, {i: res[i] for i in ids})[0])
    scores["overall"] = float(Cider().compute_score(gts, res)[0])
    return scores


# ------------------------------------------------------------------------ VQA

_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')  # the official list: no apostrophe, colon or period
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# The contractions the official script restores when written with one
# apostrophe missing. Forms that are also ordinary words (its, well, ill, shell,
# were, wed, id, lets) are not in its table; nor are the "I" forms, whose keys
# there are capitalised and so never match the lower-cased answer.
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't "
    "shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd "
    "they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's "
    "where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't "
    "wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _one_apostrophe_dropped(word: str) -> Iterable[str]:
    """`word` with one of its apostrophes left out (couldn't've -> couldnt've,
    couldn'tve): the misspellings the official table lists."""
    for i, c in enumerate(word):
        if c == "'":
            yield word[:i] + word[i + 1 :]


_CONTRACTION_OF = {variant: word for word in _CONTRACTIONS for variant in _one_apostrophe_dropped(word)}
# The official table has this entry backwards; kept so that scores match its.
_CONTRACTION_OF["somebody'd"] = "somebodyd"


def _strip_punctuation(text: str) -> str:
    """The VQA script's punctuation rule: a mark next to a space (or any mark
    in an answer holding a digit,digit number) is deleted, any other mark
    becomes a space (t-shirt -> t shirt); periods go unless a digit follows."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        delete = delete_all or f"{p} " in text or f" {p}" in text
        out = out.replace(p, "" if delete else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _digits_articles_contractions(text: str) -> str:
    """Lower-case, number words to digits, articles dropped, contractions restored."""
    words = (_NUMBER_WORDS.get(w, w) for w in text.lower().split())
    return " ".join(_CONTRACTION_OF.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """A predicted answer in the form the official VQA evaluation compares."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_strip_punctuation(text))


def _human_answers(answers: Sequence) -> list[str]:
    """Human answers as the official script compares them: punctuation rule
    applied only when the humans disagree, nothing else (the released
    annotations are already normalised)."""
    answers = [a["answer"] if isinstance(a, dict) else a for a in answers]
    if len(set(answers)) > 1:
        answers = [_strip_punctuation(a) for a in answers]
    return answers


def vqa_question_accuracy(answer: str, human_answers: Sequence) -> float:
    """The VQA accuracy of one answer: over the leave-one-human-out subsets
    (10 choose 9 for VQAv2), the mean of min(#humans in the subset who gave
    the answer / 3, 1)."""
    pred = normalize_answer(answer)
    humans = _human_answers(human_answers)
    matches = sum(h == pred for h in humans)
    per_subset = (min((matches - (h == pred)) / 3, 1.0) for h in humans)
    return sum(per_subset) / len(humans)


def load_vqa_annotations(path: str | os.PathLike) -> list[dict]:
    """Annotations from the official VQAv2 file (`{"annotations": [...]}`) or a
    plain list of `{"question_id", "answers", "answer_type"?}`."""
    with open(path) as f:
        data = json.load(f)
    return data["annotations"] if isinstance(data, dict) else data


def vqa_accuracy(results, annotations) -> dict:
    """VQA accuracy in percent, `overall` and `per_answer_type` (when the
    annotations have `answer_type`), on the questions the results answer.

    `results`: list or submission JSON of `{"question_id", "answer"}`;
    `annotations`: list or file as read by `load_vqa_annotations`.
    """
    results = _load_list(results)
    if not results:
        raise ValueError("no VQA results to score")
    _check_unique(results, "question_id")
    if isinstance(annotations, (str, os.PathLike)):
        annotations = load_vqa_annotations(annotations)
    by_question = {int(a["question_id"]): a for a in annotations}
    unknown = {int(r["question_id"]) for r in results} - by_question.keys()
    if unknown:
        raise ValueError(f"{len(unknown)} result question_ids have no annotation (first: {sorted(unknown)[:5]})")
    if len(results) < len(by_question):
        log.warning("scoring %d of the %d annotated questions", len(results), len(by_question))
    overall, per_type = [], defaultdict(list)
    for r in results:
        ann = by_question[int(r["question_id"])]
        acc = vqa_question_accuracy(str(r["answer"]), ann["answers"])
        overall.append(acc)
        if "answer_type" in ann:
            per_type[ann["answer_type"]].append(acc)
    return {
        "overall": 100 * sum(overall) / len(overall),
        "per_answer_type": {t: 100 * sum(v) / len(v) for t, v in sorted(per_type.items())},
    }
