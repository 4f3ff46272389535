"""The README's main job (`make quickstart`), end to end on a tiny world."""

import html
import json
import re

import pytest

from sandbox import quickstart


def test_main_job_generates_trains_scores_and_writes_samples(tmp_path, capsys):
    root, out = tmp_path / "world", tmp_path / "out"
    argv = ["--root", str(root), "--output_dir", str(out), "--train_scenes", "16", "--test_scenes", "4"]
    argv += ["--set", "max_epoch=1", "--set", "num_workers=0"]
    rows = quickstart.main(argv)

    assert (root / "world.json").is_file()
    models = {}
    for task, model, metric, score in rows:
        assert 0 <= score <= (1000 if metric == "CIDEr" else 100)
        models.setdefault((task, metric), []).append(model)
    assert set(models) == {("caption", m) for m in ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L")} | {("vqa", "accuracy")}
    for names in models.values():
        assert names[0] == "Prismer, all experts" and names[1].startswith("most frequent")
    assert models["vqa", "accuracy"][2] == "most frequent answer to the same question"

    page = out / "caption_world" / "samples.html"
    sources = re.findall(r'<img src="([^"]+)"', page.read_text())
    assert len(sources) == 4  # every test image, each beside its caption
    assert all((page.parent / html.unescape(s)).is_file() for s in sources)
    assert "Results on the synthetic world's test split" in capsys.readouterr().out


def test_question_prior_answers_each_question_with_its_most_frequent_training_answer(tmp_path):
    def entry(question, answer):
        return {"question": question, "answer": [answer], "weight": [1.0]}

    train = [entry("what colour?", "red"), entry("what colour?", "red"), entry("what colour?", "blue")]
    train += [entry("how many?", "2"), entry("how many?", "3"), entry("how many?", "2"), entry("how many?", "2")]
    test = [
        {"question_id": 1, "question": "what colour?", "answer": ["red"] * 10},  # right: red is its prior
        {"question_id": 2, "question": "how many?", "answer": ["3"] * 10},  # wrong: its prior is 2
        {"question_id": 3, "question": "is there?", "answer": ["2"] * 10},  # unseen: the overall answer, 2
    ]
    (tmp_path / "vqav2_train_val.json").write_text(json.dumps(train))
    (tmp_path / "vqav2_test.json").write_text(json.dumps(test))
    assert quickstart.vqa_question_prior(tmp_path) == pytest.approx(100 * 2 / 3)
    assert quickstart.vqa_baseline(tmp_path) == ("2", pytest.approx(100 / 3))  # only the unseen one is right
