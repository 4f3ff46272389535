"""demo.py on a real folder: good photos and the nasty files real folders hold, a
model saved by this project, the edge expert's weights in the official format."""

import html
import json
import os

import numpy as np
import pytest
from PIL import Image

import demo
from model import PrismerCaption
from tests.conftest import tiny_size
from tests.expert_files import write_official

GOOD = ["cat.jpg", "sub/dog.png", "grey16.png", "cmyk.jpg", "palette.png", "tiny.png", "café.jpg", "big.jpg"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("demo")
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(photos / "cat.jpg")
    Image.fromarray(rgb[:, ::-1]).save(photos / "sub" / "dog.png")
    Image.fromarray((rng.integers(0, 65535, (40, 50))).astype(np.uint16)).save(photos / "grey16.png")
    Image.fromarray(rgb).convert("CMYK").save(photos / "cmyk.jpg")
    pal = Image.fromarray(rgb).convert("P")
    pal.info["transparency"] = 0
    pal.save(photos / "palette.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(photos / "tiny.png")
    Image.fromarray(rgb[::-1]).save(photos / "café.jpg")
    Image.new("RGB", (6000, 4000), (30, 90, 200)).save(photos / "big.jpg")
    Image.fromarray(rgb).save(photos / "truncated.jpg")
    (photos / "truncated.jpg").write_bytes((photos / "truncated.jpg").read_bytes()[:400])
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "notes.png").write_text("not an image")
    os.symlink(photos / "gone.jpg", photos / "broken_link.jpg")
    weights = root / "expert_weights"
    weights.mkdir()
    write_official("edge", weights)
    tokenizer.save_pretrained(root / "tokenizer")
    size = tiny_size(len(tokenizer))
    config = {"prismer_model": size, "experts": ["edge"], "image_resolution": 64, "pretrained": False}
    PrismerCaption(config | {"tokenizer": str(root / "tokenizer")}).save_pretrained(root / "model")
    return root


def run(root, *extra):
    argv = ["--images", str(root / "photos"), "--labels", str(root / "labels"), "--model", str(root / "model")]
    argv += ["--expert_weights", str(root / "expert_weights"), "--out", str(root / "out"), *extra]
    return demo.main(argv)


def test_captions_every_readable_photo_and_skips_the_rest(folder):
    done = run(folder)
    results = json.loads((folder / "out" / "results.json").read_text(encoding="utf-8"))
    assert sorted(r["image"] for r in results) == sorted(GOOD)
    assert all(isinstance(r["caption"], str) and r["caption"] for r in results)
    assert done["skipped"] == 3  # truncated, empty, not an image (the broken link is no file)
    assert "café.jpg" in (folder / "out" / "results.json").read_text(encoding="utf-8")  # kept, not \\u-escaped
    page = (folder / "out" / "index.html").read_text(encoding="utf-8")
    assert all(html.escape(r["caption"]) in page for r in results)  # the model is random: any character
    for r in results:
        assert (folder / "out" / r["thumbnail"]).is_file()
        with Image.open(folder / "out" / r["label_sheet"]) as sheet:  # the photo and the edge label side by side
            assert sheet.width > sheet.height
    for name in GOOD:  # the edge labels the model reads, at each photo's size
        with (
            Image.open(folder / "photos" / name) as photo,
            Image.open(folder / "labels" / "edge" / "photos" / (os.path.splitext(name)[0] + ".png")) as label,
        ):
            assert label.size == photo.size


def test_a_second_run_reuses_the_labels_and_replaces_the_output(folder):
    run(folder)
    label = folder / "labels" / "edge" / "photos" / "cat.png"
    before = label.stat().st_mtime_ns
    (folder / "out" / "stale.txt").write_text("from an older run")
    run(folder)
    assert label.stat().st_mtime_ns == before
    assert not (folder / "out" / "stale.txt").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".out.")]  # no half-written folder left


def test_wrong_models_and_questions_are_refused_with_a_reason(folder):
    with pytest.raises(ValueError, match="--question needs --vqa_model"):
        run(folder, "--question", "what is it?")
    with pytest.raises(ValueError, match="vqa_prismer_base is a vqa checkpoint; this needs a caption one"):
        demo.main(["--images", str(folder / "photos"), "--model", "vqa_prismer_base", "--out", str(folder / "x")])
    with pytest.raises(FileNotFoundError, match="neither an official name"):
        demo.main(["--images", str(folder / "photos"), "--model", str(folder / "nowhere"), "--out", str(folder / "x")])
