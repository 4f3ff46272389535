"""`python -m sandbox.curves` end to end on a tiny world: one curve point per epoch
and model, each what its evaluation scored, per question type."""

import contextlib
import csv
import io
import json

import pytest

from helpers.metrics import vqa_accuracy
from helpers.tasks import answer_truth
from sandbox import curves


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curves")
    argv = ["--root", str(tmp / "world"), "--output_dir", str(tmp / "out"), "--train_scenes", "12"]
    argv += ["--test_scenes", "4", "--epochs", "2", "--models", "PrismerZ", "depth", "--workers", "2"]
    argv += ["--set", "num_workers=0", "--set", "batch_size_train=8"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rows = curves.main(argv)
    return rows, tmp, printed.getvalue()


def test_every_model_has_one_point_per_epoch_with_every_question_type(job):
    rows, tmp, _ = job
    test = json.loads((tmp / "world" / "data" / "vqav2_test.json").read_text())
    kinds = {e["question_type"] for e in test}
    for model in ("PrismerZ", "depth"):
        points = [r for r in rows if r["model"] == model]
        assert [r["epoch"] for r in points] == [1, 2]
        assert 0 < points[0]["step"] < points[1]["step"]
        assert kinds <= points[-1].keys()
    with open(tmp / "out" / "curves.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp / "out" / "curves.png").stat().st_size > 0


def test_the_last_point_is_what_the_final_submission_scores(job):
    rows, tmp, printed = job
    test = json.loads((tmp / "world" / "data" / "vqav2_test.json").read_text())
    truth = [answer_truth(e) for e in test]
    for model in ("PrismerZ", "depth"):
        submission = tmp / "out" / model / "vqa_run" / "vqa_submission.json"
        scores = vqa_accuracy(submission, truth)
        last = [r for r in rows if r["model"] == model][-1]
        assert last["overall"] == pytest.approx(scores["overall"])
        for kind, value in scores["per_answer_type"].items():
            assert last[kind] == pytest.approx(value)
        config = json.loads((tmp / "out" / model / "vqa_run" / "config.json").read_text())
        assert config["experts"] == {"PrismerZ": [], "depth": ["depth"]}[model]
        assert "vqa summary" in (tmp / "out" / model / "train.log").read_text()  # its own log, side by side
    assert "question prior" in printed and "chance" in printed


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--set", "max_epoch=3"], "--set max_epoch=3: use --epochs"),
        (["--set", "no_such_key=1"], "no_such_key"),
    ],
)
def test_bad_arguments_fail_before_the_world_is_made(tmp_path, capsys, argv, message):
    with pytest.raises((SystemExit, ValueError)) as failed:
        curves.main(["--root", str(tmp_path / "world"), *argv])
    assert message in str(failed.value) + capsys.readouterr().err
    assert not (tmp_path / "world").exists()
