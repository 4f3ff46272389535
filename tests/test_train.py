"""The training scripts end to end on a tiny real dataset written here (images, labels, JSON lists)."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import train_caption
import train_pretrain
import train_vqa
from helpers.engine import TrainingStopped, record_evaluation
from helpers.metrics import vqa_accuracy
from tests.conftest import tiny_size
from tests.dataset_builders import coco_world

ROOT = Path(__file__).resolve().parent.parent
EXPERTS = ["depth", "seg_coco", "obj_detection", "ocr_detection"]


@pytest.fixture
def recipe(tmp_path, tokenizer):
    """A flat recipe for a tiny Prismer on an 8-image world; returns (path, run folder root)."""
    cfg = coco_world(tmp_path / "world", n=8, experts=EXPERTS)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    cfg |= {
        "prismer_model": tiny_size(len(tokenizer)),
        "tokenizer": str(tmp_path / "tokenizer"),
        "pretrained": False,
        "experts": EXPERTS,
        "batch_size_train": 2,
        "batch_size_test": 2,
        "num_workers": 0,
        "max_epoch": 1,
        "output_dir": str(tmp_path / "out"),
        "tracker": None,
        "init_lr": 1e-3,
        "max_length": 8,
        "min_length": 2,
        "datasets": ["vqav2", "vg"],
        "coco_data_path": cfg["data_path"],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, tmp_path / "out"


def args(recipe, *extra):
    return ["--config", str(recipe[0]), "--target_dataset", "", *extra]


def write_caption_gt(recipe) -> None:
    """Reference captions for the two test images, in the Karpathy ground-truth format."""
    data = Path(yaml.safe_load(recipe[0].read_text())["data_path"])
    gt = {
        "images": [{"id": 0}, {"id": 1}],
        "annotations": [
            {"id": i, "image_id": i % 2, "caption": c}
            for i, c in enumerate(
                ["a red square", "a white square on grey", "a square in the middle", "a bright square"]
            )
        ],
    }
    (data / "coco_karpathy_test_gt.json").write_text(json.dumps(gt))


def test_caption_epoch_runs_end_to_end_and_scores_with_the_coco_toolkit(recipe):
    write_caption_gt(recipe)
    metrics = train_caption.main(
        args(recipe, "--exp_name", "e2e", "--set", "save_every_steps=1", "--set", "tracker=tensorboard")
    )
    run = recipe[1] / "caption_e2e"
    results = json.loads((run / "caption_results_coco.json").read_text())
    assert sorted(r["image_id"] for r in results) == [0, 1]  # COCO ids from the file names
    assert all(r["caption"][0].isupper() and r["caption"].endswith(".") for r in results)
    assert {"eval/Bleu_4", "eval/METEOR", "eval/ROUGE_L", "eval/CIDEr"} <= set(metrics)
    assert (run / "best" / "model.safetensors").exists()
    assert (run / "final" / "model.safetensors").exists() and (run / "final" / "config.json").exists()
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert kept == ["step_00000003", "step_00000004"]  # keep_last 2 of a checkpoint every step
    progress = json.loads((run / "checkpoints" / "step_00000004" / "progress.json").read_text())
    assert progress == {"epoch": 1, "batch": 0, "step": 4, "best": metrics["eval/CIDEr"], "skipped_nan": 0}
    assert list((run / "logs").rglob("events.out.tfevents.*"))


def test_gradient_accumulation_and_clipping_run(recipe):
    train_pretrain.main(
        args(
            recipe,
            "--exp_name",
            "acc",
            "--set",
            "datasets=[coco]",
            "--set",
            "schedule=cosine_epoch",
            "--set",
            "grad_accum_steps=2",
            "--set",
            "grad_clip=1.0",
        )
    )
    assert (recipe[1] / "pretrain_acc" / "final" / "model.safetensors").exists()


def test_vqa_epoch_runs_end_to_end(recipe):
    train_vqa.main(args(recipe, "--exp_name", "e2e", "--set", "k_test=2"))
    submission = json.loads((recipe[1] / "vqa_e2e" / "vqa_submission.json").read_text())
    assert [r["question_id"] for r in submission] == [7]
    assert submission[0]["answer"] in ["red", "blue", "square"]
    train_vqa.main(args(recipe, "--exp_name", "gen", "--evaluate", "--set", "inference=generate"))
    assert json.loads((recipe[1] / "vqa_gen" / "vqa_submission.json").read_text())[0]["question_id"] == 7


def test_vqa_evaluation_reports_what_the_submission_file_scores(recipe):
    data = Path(yaml.safe_load(recipe[0].read_text())["data_path"])
    test = json.loads((data / "vqav2_test.json").read_text())
    humans = ["Red", "red.", "RED", "blue", "Blue", "square", "squares", "pink", "pink", "pink"]
    test[0]["answer"] = humans  # a local split with its ten human answers
    test[0]["answer_type"] = "other"  # VQAv2's kinds of answer: yes/no, number, other
    (data / "vqav2_test.json").write_text(json.dumps(test))
    # split humans, normalised: red x3, blue x2, square x1 (as the official script treats them):
    # red (3*2/3 + 7*1)/10 = 0.9, blue (2*1/3 + 8*2/3)/10 = 0.6, square (1*0 + 9*1/3)/10 = 0.3
    by_hand = {"red": 90.0, "blue": 60.0, "square": 30.0}
    for inference in ("rank", "generate"):
        run = f"acc_{inference}"
        metrics = train_vqa.main(args(recipe, "--exp_name", run, "--evaluate", "--set", f"inference={inference}"))
        submission = recipe[1] / f"vqa_{run}" / "vqa_submission.json"
        truth = [{"question_id": 7, "answers": humans}]
        assert metrics["eval/accuracy"] == vqa_accuracy(submission, truth)["overall"]
        assert metrics["eval/accuracy/other"] == metrics["eval/accuracy"]  # the one question is of that type
        if inference == "rank":
            answer = json.loads(submission.read_text())[0]["answer"]
            assert metrics["eval/accuracy"] == pytest.approx(by_hand[answer])


def test_evaluation_runs_every_n_epochs_and_always_after_the_last(recipe):
    write_caption_gt(recipe)
    sets = ["max_epoch=3", "eval_every_epochs=2", "keep_last=3"]
    metrics = train_caption.main(args(recipe, "--exp_name", "every2", *[a for s in sets for a in ("--set", s)]))
    assert "eval/CIDEr" in metrics
    ckpts = sorted((recipe[1] / "caption_every2" / "checkpoints").glob("step_*"))
    best = [json.loads((c / "progress.json").read_text())["best"] for c in ckpts]
    assert [b is None for b in best] == [True, False, False]  # evaluated after epochs 2 and 3 only
    history = (recipe[1] / "caption_every2" / "eval_history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in history] == [2, 3]
    assert json.loads(history[-1])["eval/CIDEr"] == metrics["eval/CIDEr"]


def test_pretrain_epoch_runs_end_to_end(recipe):
    train_pretrain.main(args(recipe, "--exp_name", "e2e", "--set", "datasets=[coco]", "--set", "schedule=cosine_epoch"))
    assert (recipe[1] / "pretrain_e2e" / "final" / "model.safetensors").exists()


def test_fine_tuning_starts_from_a_pretraining_checkpoint_at_a_new_resolution(recipe):
    train_pretrain.main(
        args(
            recipe,
            "--exp_name",
            "p",
            "--set",
            "datasets=[coco]",
            "--set",
            "schedule=cosine_epoch",
            "--set",
            "max_train_steps=1",
        )
    )
    pre = recipe[1] / "pretrain_p" / "checkpoints"
    assert list(pre.glob("step_*"))
    train_pretrain.main(
        args(
            recipe,
            "--exp_name",
            "p2",
            "--set",
            "datasets=[coco]",
            "--set",
            "schedule=cosine_epoch",
            "--set",
            "max_epoch=1",
        )
    )
    init = recipe[1] / "pretrain_p2" / "final"
    train_caption.main(
        args(
            recipe, "--exp_name", "ft", "--evaluate", "--set", f"init_checkpoint={init}", "--set", "image_resolution=96"
        )
    )
    assert json.loads((recipe[1] / "caption_ft" / "caption_results_coco.json").read_text())


def test_loss_falls_on_a_fixed_batch(recipe):
    from dataset import create_dataset, create_loader
    from helpers.config import load_config
    from model import PrismerCaption

    cfg = load_config(recipe[0])
    train, _ = create_dataset("caption", cfg)
    experts, captions = next(iter(create_loader(train, 4, 0, True, collate_fn=train.collate)))
    torch.manual_seed(0)
    model = PrismerCaption(cfg.model_config())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(40):
        loss = model(experts, captions, prefix="A picture of")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_python_api_trains_the_same_weights_as_the_command_line(recipe):
    """`run(task, cfg, options)` (what the sandbox calls) and `main(argv)` are one run:
    a recipe, keys set from Python and the same seed give the same weights."""
    from helpers.config import load_config
    from helpers.engine import RunOptions, run
    from helpers.tasks import CAPTION

    train_caption.main(args(recipe, "--exp_name", "cli", "--set", "keep_last=1", "--seed", "3"))
    cfg = load_config(recipe[0], values={"keep_last": 1, "seed": 3})
    run(CAPTION, cfg, RunOptions(exp_name="api"))
    cli, api = (load_file(recipe[1] / f"caption_{name}" / "final" / "model.safetensors") for name in ("cli", "api"))
    assert cli.keys() == api.keys() and all(torch.equal(cli[k], api[k]) for k in cli)
    recorded = [json.loads((recipe[1] / f"caption_{name}" / "config.json").read_text()) for name in ("cli", "api")]
    assert recorded[0] == recorded[1]


def test_precision_and_sharding_are_recorded_in_the_run_config(recipe):
    """The run's config.json says what precision ran (auto and fp16 are full
    precision without a GPU) and how the model was sharded; the flags set the keys."""
    common = ["--set", "max_train_steps=1"]
    for exp, flags, precision in (("auto", [], "no"), ("fp16", ["--mixed_precision", "fp16"], "no")):
        train_caption.main(args(recipe, "--exp_name", exp, *common, *flags))
        recorded = json.loads((recipe[1] / f"caption_{exp}" / "config.json").read_text())
        assert (recorded["mixed_precision"], recorded["sharding"]) == (precision, "none")
    with pytest.raises(SystemExit):
        train_caption.main(args(recipe, "--shard_grad_op", "--full_shard"))
    with pytest.raises(ValueError, match="sharding must be one of"):
        train_caption.main(args(recipe, "--set", "sharding=zero3"))
    with pytest.raises(ValueError, match="quote it"):
        train_caption.main(args(recipe, "--set", "mixed_precision=no"))


def test_resume_without_a_checkpoint_is_an_error_unless_asked_to_start_fresh(recipe):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train_caption.main(args(recipe, "--exp_name", "r", "--from_checkpoint"))
    train_caption.main(
        args(recipe, "--exp_name", "r", "--from_checkpoint", "--fresh_if_missing", "--set", "max_train_steps=1")
    )


def test_unknown_key_or_wrong_type_fails_before_anything_loads(recipe):
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['batch_size'\]"):
        train_caption.main(args(recipe, "--set", "batch_size=4"))
    with pytest.raises(ValueError, match=r"key 'batch_size_train' must be <class 'int'>, got 'four'"):
        train_caption.main(args(recipe, "--set", "batch_size_train=four"))
    with pytest.raises(ValueError, match="unknown expert 'sonar'"):
        train_caption.main(args(recipe, "--set", "experts=[depth, sonar]"))


def test_non_finite_losses_stop_the_run_with_checkpoints_intact(recipe):
    with pytest.raises(TrainingStopped, match="non-finite"):
        train_caption.main(
            args(
                recipe,
                "--exp_name",
                "nan",
                "--set",
                "init_lr=1e30",
                "--set",
                "max_nan_steps=2",
                "--set",
                "save_every_steps=1",
                "--set",
                "max_epoch=3",
            )
        )
    ckpts = recipe[1] / "caption_nan" / "checkpoints"
    assert all((p / "progress.json").exists() for p in ckpts.glob("step_*"))
    assert not list(ckpts.glob(".*.tmp"))


def test_a_run_whose_every_step_is_non_finite_fails_and_writes_no_model(recipe, tmp_path):
    """A broken starting checkpoint (a NaN weight) makes every loss NaN: the
    run must not end as a success with an untrained `final/`."""
    from model import PrismerCaption

    cfg = yaml.safe_load(recipe[0].read_text())
    model = PrismerCaption(cfg)
    with torch.no_grad():
        model.text_decoder.roberta.embeddings.LayerNorm.weight[0] = float("nan")
    model.save_pretrained(tmp_path / "broken")
    with pytest.raises(TrainingStopped, match=r"every step of this run had a non-finite loss \(4 skipped\)"):
        train_caption.main(
            args(
                recipe,
                "--exp_name",
                "allnan",
                "--set",
                f"init_checkpoint={tmp_path / 'broken'}",
                "--set",
                "max_nan_steps=100",
            )
        )
    assert not (recipe[1] / "caption_allnan" / "final").exists()


def test_skipped_steps_count_toward_max_train_steps_and_checkpoints(recipe, tmp_path):
    from model import PrismerCaption

    cfg = yaml.safe_load(recipe[0].read_text())
    model = PrismerCaption(cfg)
    with torch.no_grad():
        model.text_decoder.roberta.embeddings.LayerNorm.weight[0] = float("nan")
    model.save_pretrained(tmp_path / "broken")
    extra = ["--set", f"init_checkpoint={tmp_path / 'broken'}", "--set", "max_nan_steps=100", "--set", "max_epoch=3"]
    with pytest.raises(TrainingStopped):
        train_caption.main(
            args(recipe, "--exp_name", "cap", *extra, "--set", "max_train_steps=3", "--set", "save_every_steps=2")
        )
    ckpts = recipe[1] / "caption_cap" / "checkpoints"
    steps = [json.loads((p / "progress.json").read_text())["step"] for p in sorted(ckpts.glob("step_*"))]
    assert steps == [2, 3]  # saved at step 2 and where max_train_steps stopped it, not 12 steps later


def test_our_checkpoint_brings_its_own_architecture(recipe, tmp_path):
    """Starting from our checkpoint takes its model size, experts and tokenizer
    over the recipe's (a one-expert model under a four-expert recipe)."""
    from model import PrismerCaption

    cfg = yaml.safe_load(recipe[0].read_text())
    PrismerCaption({**cfg, "experts": ["depth"]}).save_pretrained(tmp_path / "ckpt")
    init = ["--set", f"init_checkpoint={tmp_path / 'ckpt'}"]
    train_caption.main(args(recipe, "--exp_name", "adopt", *init, "--set", "max_train_steps=1"))
    run = recipe[1] / "caption_adopt"
    assert json.loads((run / "config.json").read_text())["experts"] == ["depth"]
    with pytest.raises(ValueError, match=r"trained with experts \['depth'\] but the config names"):
        train_caption.main(args(recipe, "--exp_name", "explicit", *init, "--set", "experts=[depth, seg_coco]"))


def _script(recipe, exp, *extra):
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        str(ROOT / "train_caption.py"),
        *args(recipe, "--exp_name", exp, "--set", "max_epoch=3", "--set", "save_every_steps=1", *extra),
    ]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_run_killed_mid_epoch_resumes_to_the_same_weights(recipe):
    assert _script(recipe, "straight").wait() == 0
    victim = _script(recipe, "killed")
    ckpts = recipe[1] / "caption_killed" / "checkpoints"
    deadline = time.monotonic() + 120
    while not (ckpts / "step_00000002" / "progress.json").exists():
        assert victim.poll() is None and time.monotonic() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    resumed = _script(recipe, "killed", "--from_checkpoint")
    assert resumed.wait() == 0, resumed.stderr.read().decode()[-2000:]
    a = load_file(recipe[1] / "caption_straight" / "final" / "model.safetensors")
    b = load_file(recipe[1] / "caption_killed" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_pretraining_stopped_mid_epoch_resumes_its_stream_unread_to_the_same_weights(recipe):
    """The stream (two DataLoader workers) resumes at the saved batch; the images of the batches before it are
    broken by then, and reading them would stop the run (6 of 8 unreadable)."""
    from dataset import create_dataset, create_loader
    from helpers.config import load_config

    sets = ["datasets=[coco]", "schedule=cosine_epoch", "num_workers=2"]
    common = [a for s in sets for a in ("--set", s)]
    train_pretrain.main(args(recipe, "--exp_name", "straight", *common))
    train_pretrain.main(args(recipe, "--exp_name", "stopped", *common, "--set", "max_train_steps=3"))
    cfg = load_config(recipe[0], None, sets)
    loader = create_loader(create_dataset("pretrain", cfg), cfg.batch_size_train, 2, True, seed=cfg.seed)
    for _, captions in itertools.islice(loader, 3):
        for c in captions:
            Path(cfg.data_path, "vqav2", f"train2014/COCO_train2014_{int(c.split()[-1]):012d}.jpg").write_bytes(b"")
    train_pretrain.main(args(recipe, "--exp_name", "stopped", *common, "--from_checkpoint"))
    a = load_file(recipe[1] / "pretrain_straight" / "final" / "model.safetensors")
    b = load_file(recipe[1] / "pretrain_stopped" / "final" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_caption_a_folder_of_own_images_in_one_command(recipe, tmp_path):
    from PIL import Image

    from model import PrismerCaption

    photos = tmp_path / "my photos"
    (photos / "trip").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(photos / "IMG_0001.jpg")
    Image.new("L", (64, 64), 128).save(photos / "trip" / "beach.png")
    cfg = yaml.safe_load(recipe[0].read_text())
    PrismerCaption({**cfg, "experts": ["none"]}).save_pretrained(tmp_path / "ckpt")
    train_caption.main(
        [
            "--evaluate",
            "--target_dataset",
            "demo",
            "--exp_name",
            "mine",
            "--set",
            f"data_path={photos}",
            "--set",
            f"init_checkpoint={tmp_path / 'ckpt'}",
            "--set",
            f"tokenizer={cfg['tokenizer']}",
            "--set",
            f"prismer_model={cfg['prismer_model']}",
            "--set",
            "image_resolution=64",
            "--set",
            f"output_dir={recipe[1]}",
            "--set",
            "tracker=null",
            "--set",
            "num_workers=0",
            "--set",
            "max_length=8",
        ]
    )
    results = json.loads((recipe[1] / "caption_mine" / "caption_results_demo.json").read_text())
    assert [r["image_id"] for r in results] == ["IMG_0001.jpg", "trip/beach.png"]
    assert all(r["caption"].endswith(".") for r in results)


def test_the_evaluation_history_keeps_one_entry_per_step_when_a_run_repeats_steps(tmp_path):
    """A run resumed from a checkpoint before its last evaluation evaluates that epoch again."""
    path = tmp_path / "eval_history.jsonl"
    record_evaluation(path, {"epoch": 1, "step": 4}, {"eval/accuracy": 10.0})
    record_evaluation(path, {"epoch": 2, "step": 8}, {"eval/accuracy": 20.0})
    record_evaluation(path, {"epoch": 2, "step": 8}, {"eval/accuracy": 25.0})  # resumed: epoch 2 again
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert entries == [
        {"epoch": 1, "step": 4, "eval/accuracy": 10.0},
        {"epoch": 2, "step": 8, "eval/accuracy": 25.0},
    ]
