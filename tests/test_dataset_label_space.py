import hashlib
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from common.label_space import DEFAULT_PATH, SAFETENSORS_NAME, SPACES
from dataset import SampleError, load_label_spaces, paint, read_ocr_record, write_ocr_record

# The shipped copy of the official label spaces: a changed byte changes what every checkpoint sees.
SHIPPED_SHA256 = {
    SAFETENSORS_NAME: "a153696da9123a53b323c433690e7d73441fd6f1397044120a3236227aba6867",
    "label_names.json": "57d74280af9228db5a3525a47478fc3bb4b56fa2e7c9df3b7ad6f817c8af800a",
}


def test_shipped_label_spaces_are_the_official_ones():
    for name, digest in SHIPPED_SHA256.items():
        assert hashlib.sha256((DEFAULT_PATH / name).read_bytes()).hexdigest() == digest, name
    names = json.loads((DEFAULT_PATH / "label_names.json").read_text())
    assert {s: len(names[s]) for s in SPACES} == {"coco": 133, "ade": 150, "detection": 722}
    assert names["coco"][:3] == ["person", "bicycle", "car"] and names["coco"][-1] == "rug"
    assert names["ade"][:3] == ["wall", "building", "sky"] and names["ade"][-1] == "flag"
    assert names["detection"][:3] == ["bottle", "cup", "dining table"] and names["detection"][-1] == "trailer"
    raw = load_file(str(DEFAULT_PATH / SAFETENSORS_NAME))
    assert {k: tuple(v.shape) for k, v in raw.items()} == {
        "coco.features": (133, 64),
        "ade.features": (150, 64),
        "detection.features": (722, 64),
        "background.features": (64,),
        "clip_pca.components": (64, 768),
        "clip_pca.mean": (768,),
    }


def test_tables_have_a_background_row_per_space():
    spaces = load_label_spaces()  # the default: the shipped copy
    raw = load_file(str(DEFAULT_PATH / SAFETENSORS_NAME))
    for space in SPACES:
        table = spaces.tables[space]
        assert table.shape == (raw[f"{space}.features"].shape[0] + 1, 64)
        torch.testing.assert_close(table[:-1], raw[f"{space}.features"])
        torch.testing.assert_close(table[-1], raw["background.features"])


def test_official_pt_files_load_with_weights_only(tmp_path):
    """The official repo's dataset/*_features.pt layout: dicts with `features`,
    background a bare tensor."""
    raw = load_file(str(DEFAULT_PATH / SAFETENSORS_NAME))
    for space in SPACES:
        torch.save({"features": raw[f"{space}.features"]}, tmp_path / f"{space}_features.pt")
    torch.save(raw["background.features"], tmp_path / "background_features.pt")
    spaces = load_label_spaces(tmp_path)
    torch.testing.assert_close(spaces.tables["coco"][:-1], raw["coco.features"])
    torch.testing.assert_close(spaces.tables["detection"][-1], raw["background.features"])


def test_missing_label_space_files_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="label_space_path"):
        load_label_spaces(tmp_path)


def test_painting_is_a_table_lookup_per_pixel():
    spaces = load_label_spaces()
    ids = torch.full((2, 1, 5, 7), 255, dtype=torch.uint8)
    ids[0, 0, 1:3, 2:4] = 5
    ids[1, 0, 0, 0] = 132
    table = spaces.id_tables["coco"].expand(2, -1, -1)
    out = paint({"seg_coco": {"ids": ids, "table": table}})["seg_coco"]
    assert out.shape == (2, 64, 5, 7)
    coco = spaces.tables["coco"]
    torch.testing.assert_close(out[0, :, 1, 2], coco[5])
    torch.testing.assert_close(out[1, :, 0, 0], coco[132])
    torch.testing.assert_close(out[0, :, 0, 0], spaces.background)


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_ocr_records_round_trip_without_pickle(tmp_path, suffix):
    words = {0: {"text": "stop", "features": torch.randn(64)}, 4: {"text": "exit", "features": torch.randn(64)}}
    path = tmp_path / f"img{suffix}"
    write_ocr_record(path, words)
    assert not (tmp_path / "img.pt").exists()
    back = read_ocr_record(tmp_path / "img.png")
    assert set(back) == {0, 4} and back[4]["text"] == "exit"
    torch.testing.assert_close(back[0]["features"], words[0]["features"])


def test_ocr_records_refuse_pickle_output(tmp_path):
    with pytest.raises(ValueError, match="json or .safetensors"):
        write_ocr_record(tmp_path / "img.pt", {})


def test_official_ocr_record_loads_but_code_in_it_does_not(tmp_path):
    words = {1: {"features": torch.ones(64), "text": "open"}}
    torch.save(words, tmp_path / "ok.pt")
    assert read_ocr_record(tmp_path / "ok.png")[1]["text"] == "open"

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle ran')",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({1: Evil()}, f, protocol=2)
    with pytest.raises(SampleError, match="not an official OCR word record") as err:
        read_ocr_record(tmp_path / "evil.png")  # a skipped sample, not a crashed worker
    assert "weights_only" not in str(err.value)


def test_palette_id_map_keeps_raw_ids(tmp_path):
    from common.labels.base import read_ids

    img = Image.fromarray(np.array([[5, 255], [7, 5]], np.uint8), "L").convert("P")
    img.putpalette([(i * 37) % 256 for i in range(768)])
    img.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    np.testing.assert_array_equal(read_ids(tmp_path / "p.png", (2, 2)), [[5, 255], [7, 5]])
