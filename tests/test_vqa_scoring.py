"""VQA accuracy as the official vqaEval.py computes it, on messy answers.

Every expected value is worked out by hand in the comments from the official
rules (GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py):
newlines, tabs and outer spaces go; only when the ten humans disagree are the
humans and the prediction put through processPunctuation and
processDigitArticle; then each human is left out in turn and the prediction
scores min(#other humans equal to it / 3, 1), averaged over the ten.
"""

import json

import pytest

from helpers.metrics import (
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
    vqa_question_accuracy,
    write_vqa_results,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("t-shirt", "t shirt"),  # '-' touches no space: it becomes a space
        ("red, white", "red white"),  # ', ' is in the text: ',' is deleted
        ("red,white", "red white"),  # ',' touches no space, no digit,digit: a space
        ("dog (big)", "dog big "),  # ' (' is in the text: '(' deleted; ')' touches no space: a space
        ("yes!", "yes "),  # '!' at the end touches no space: a space, left for the split to drop
        ("3,000", "3000"),  # digit,digit: every mark is deleted
        ("1,5-2", "152"),  # digit,digit deletes the '-' as well
        ("10.5", "10.5"),  # a period before a digit stays
        ("10.5.", "10.5"),  # the final one does not
        ("U.S.A.", "USA"),
        ("isn't 2:30", "isn't 2:30"),  # the apostrophe and the colon are not in the list
        ("a" + "." * 40, "a" + "." * 8),  # 40 periods, 32 removed (re.UNICODE as the count)
        ("1.5" + "." * 33, "1.5."),  # the period of 1.5 is not a match: 33 matches, 32 removed
    ],
)
def test_process_punctuation(text, expected):
    assert process_punctuation(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Two  Dogs", "2 dogs"),  # lower-cased, "the" dropped, "two" -> "2", single spaces
        ("None", "0"),  # the number-word map has none -> 0
        ("ten eleven", "10 eleven"),  # zero to ten only
        ("an apple", "apple"),
        ("A", ""),  # an article alone leaves nothing
        ("ISNT", "isn't"),
        ("couldnt've", "couldn't've"),
        ("dont its lets", "don't its lets"),  # its and lets are not in the table (let's -> let's is)
        ("Im", "im"),  # the table's key is "Im": it never matches the lower-cased word
        ("somebody'd", "somebodyd"),  # the table's backwards entry
    ],
)
def test_process_digit_article(text, expected):
    assert process_digit_article(text) == expected


SPLIT_3_OF_10 = 0.9  # 3 humans match: they see 2 others (2/3), the 7 others see 3 (1): (3*2/3 + 7)/10
SPLIT_2_OF_10 = 0.6  # 2 match: they see 1 (1/3), the 8 others see 2 (2/3): (2/3 + 16/3)/10
SPLIT_1_OF_10 = 0.3  # 1 matches: it sees 0, the 9 others see 1 (1/3): (9/3)/10


@pytest.mark.parametrize(
    "prediction, humans, expected",
    [
        # unanimous humans: no normalisation at all, only the strip
        ("2", ["2"] * 10, 1.0),  # every subset holds nine "2"
        (" 2\n", ["2"] * 10, 1.0),  # stripped to "2"
        ("Two", ["2"] * 10, 0.0),  # "Two" stays "Two"
        ("2.", ["2"] * 10, 0.0),  # the period stays
        ("isnt", ["isn't"] * 10, 0.0),  # no contraction table either
        ("Red", ["red"] * 9 + ["red\t"], 0.0),  # the tab goes before the comparison: unanimous
        ("red", ["red"] * 9 + ["red\t"], 1.0),
        # split humans: all of them and the prediction normalised
        ("Two", ["2"] * 3 + ["3"] * 7, SPLIT_3_OF_10),  # "Two" -> "2", 3 humans match
        ("2", ["Two", "2", "two."] + ["3"] * 7, SPLIT_3_OF_10),  # "Two", "two." -> "2" too
        ("an Dog!", ["A dog", "the dog", "dog"] + ["dogs"] * 4 + ["cat"] * 3, SPLIT_3_OF_10),
        ("ISNT", ["isn't", "isnt", "is not"] + ["no"] * 7, SPLIT_2_OF_10),  # -> "isn't", 2 match
        ("NONE.", ["none", "0", "Zero"] + ["no"] * 7, SPLIT_3_OF_10),  # "NONE." -> "none" -> "0"
        ("3,000", ["3,000", "3000."] + ["300"] * 8, SPLIT_2_OF_10),  # all three -> "3000"
        ("3000", ["3,000", "3000."] + ["300"] * 8, SPLIT_2_OF_10),
        ("3.000", ["3,000", "3000."] + ["300"] * 8, 0.0),  # a period before a digit stays
        ("10.5.", ["10.5"] * 4 + ["10"] * 6, 1.0),  # -> "10.5"; 4 match: each subset sees >= 3
        ("10,5", ["10.5"] * 4 + ["10"] * 6, 0.0),  # digit,digit: -> "105"
        ("Red, white-blue", ["red white blue"] * 3 + ["red"] * 7, SPLIT_3_OF_10),
        ("yes", ["Yes"] * 9 + ["no"], 1.0),  # 9 match: each subset sees >= 8
        ("YES" + "." * 32, ["yes"] * 9 + ["no"], 1.0),  # all 32 periods go
        ("YES" + "." * 33, ["yes"] * 9 + ["no"], 0.0),  # one is left: "yes."
        ("no", ["Yes"] * 9 + ["no"], SPLIT_1_OF_10),  # the one "no" human counts for the 9 others
        ("blue", ["Yes"] * 9 + ["no"], 0.0),
    ],
)
def test_question_accuracy(prediction, humans, expected):
    records = [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(humans)]
    assert vqa_question_accuracy(prediction, records) == pytest.approx(expected, abs=1e-12)
    assert vqa_question_accuracy(prediction, humans) == pytest.approx(expected, abs=1e-12)  # plain lists alike


def vqa_annotation(qid, answers, answer_type):
    """One question in the official VQAv2 annotation layout."""
    return {
        "question_id": qid,
        "answer_type": answer_type,
        "question_type": "what",
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)],
    }


def test_vqa_accuracy_of_a_submission_file(tmp_path):
    ann_file = tmp_path / "v2_mscoco_val2014_annotations.json"
    annotations = [
        vqa_annotation(1, ["2"] * 3 + ["3"] * 7, "number"),
        vqa_annotation(2, ["dog"] * 2 + ["cat"] * 8, "other"),
        vqa_annotation(3, ["isn't"] * 10, "yes/no"),
        vqa_annotation(4, ["yes"] + ["no"] * 9, "yes/no"),
        vqa_annotation(5, ["red"] * 10, "other"),
    ]
    ann_file.write_text(json.dumps({"annotations": annotations}))
    answers = {1: "Two", 2: "a dog", 3: "isnt", 4: "Yes.", 5: "red"}
    results_file = write_vqa_results([{"question_id": q, "answer": a} for q, a in answers.items()], tmp_path / "r.json")
    # q1: split, "Two" -> "2", 3 humans match          -> 0.9
    # q2: split, "a dog" -> "dog", 2 match             -> 0.6
    # q3: unanimous, "isnt" is compared as written     -> 0
    # q4: split, "Yes." -> "yes", 1 matches            -> 0.3
    # q5: unanimous "red", nine in every subset        -> 1
    acc = vqa_accuracy(results_file, ann_file)
    assert acc["overall"] == pytest.approx(100 * (0.9 + 0.6 + 0 + 0.3 + 1) / 5)  # 56
    # number: q1 = 90; other: (q2 + q5) / 2 = (60 + 100) / 2 = 80; yes/no: (q3 + q4) / 2 = 15
    assert acc["per_answer_type"] == pytest.approx({"number": 90.0, "other": 80.0, "yes/no": 15.0})


def test_vqa_submission_file(tmp_path):
    path = write_vqa_results(
        [{"question_id": 262148000, "answer": "yes"}, {"question_id": 5, "answer": 2}], tmp_path / "s.json"
    )
    assert json.loads(path.read_text()) == [
        {"question_id": 262148000, "answer": "yes"},
        {"question_id": 5, "answer": "2"},
    ]
    with pytest.raises(ValueError, match="more than once"):
        write_vqa_results([{"question_id": 5, "answer": "a"}] * 2, tmp_path / "d.json")
    with pytest.raises(ValueError, match="no annotation"):
        vqa_accuracy([{"question_id": 6, "answer": "a"}], [vqa_annotation(5, ["a"] * 10, "other")])
