"""Evaluation metrics and result files for COCO captions, NoCaps and VQAv2.

Captions are scored with the official COCO caption toolkit (pycocoevalcap on
top of pycocotools, with its Java PTB tokenizer and METEOR), so the numbers are
comparable with the paper's. VQA accuracy is the official VQA evaluation
script's (vqaEval.py) rule for rule, quirks included. Everything here is a plain
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
# The official VQA evaluation, re-implemented rule for rule: VQAEval.evaluate,
# processPunctuation and processDigitArticle of GT-Vision-Lab/VQA
# PythonEvaluationTools/vqaEvaluation/vqaEval.py (master; the code behind the
# VQAv2 evaluation server). Its tables below are that file's data.

_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')  # in its order: no apostrophe, colon or period
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# "(?!<=\d)" is a lookahead for the text "<=digit" (a mistyped lookbehind), always
# true in front of a period: every period not followed by a digit goes.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official call is periodStrip.sub("", text, re.UNICODE): the flag lands in
# the count position, so only the first int(re.UNICODE) == 32 such periods go.
_PERIODS_STRIPPED = 32
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
_ARTICLES = ("a", "an", "the")
# The official contraction table, "key:value" in its order, as is: the
# capitalised keys (Im, Ive, ...) never match the lower-cased words, and
# somebody'd -> somebodyd runs backwards.
_CONTRACTIONS = dict(
    pair.split(":")
    for pair in """
    aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
    couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
    hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's
    howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd
    itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
    mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
    neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at
    'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've
    shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd
    somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's
    someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll
    someones:someone's somethingd:something'd somethingd've:something'd've
    something'dve:something'd've somethingll:something'll thats:that's thered:there'd
    thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd
    theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas
    wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll
    whatre:what're whats:what's whatve:what've whens:when's whered:where'd wheres:where's
    whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's
    whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't
    wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll
    yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've
    you'dve:you'd've youll:you'll youre:you're youve:you've
    """.split()
)


def process_punctuation(text: str) -> str:
    """processPunctuation: a mark written next to a space is deleted, any other
    becomes a space (t-shirt -> t shirt); in a text holding digit,digit every
    mark is deleted (3,000 -> 3000); then periods not followed by a digit go
    (10.5 stays), at most 32 of them."""
    delete_all = _COMMA_STRIP.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        next_to_space = p + " " in text or " " + p in text
        out = out.replace(p, "" if delete_all or next_to_space else " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIODS_STRIPPED)


def process_digit_article(text: str) -> str:
    """processDigitArticle: lower-cased words, number words to digits, articles
    dropped, contractions missing an apostrophe restored, single-spaced."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _strip(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_question_accuracy(answer: str, human_answers: Sequence) -> float:
    """The official accuracy of one answer, in [0, 1].

    Answer and human answers lose newlines, tabs and outer spaces; only when
    the humans disagree are all of them and the answer put through
    `process_punctuation` and `process_digit_article` (against ten "2", "Two"
    scores 0). Each human is left out in turn (the official script compares
    answer records, which differ by answer_id) and the answer scores
    min(#other humans who gave it / 3, 1); the mean is returned.
    """
    humans = [_strip(a["answer"] if isinstance(a, dict) else a) for a in human_answers]
    pred = _strip(answer)
    if len(set(humans)) > 1:
        humans = [process_digit_article(process_punctuation(h)) for h in humans]
        pred = process_digit_article(process_punctuation(pred))
    matches = sum(h == pred for h in humans)
    return sum(min((matches - (h == pred)) / 3, 1.0) for h in humans) / len(humans)


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
