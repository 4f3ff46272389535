import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dataset import SampleError, load_label_spaces, paint, read_ocr_record, write_ocr_record
from dataset.label_space import SPACES
from tests.conftest import shared_path


def test_tables_have_a_background_row_per_space():
    spaces = load_label_spaces(shared_path("label_spaces"))
    names = json.loads(shared_path("label_spaces", "label_names.json").read_text())
    raw = load_file(str(shared_path("label_spaces", "label_features.safetensors")))
    for space in SPACES:
        table = spaces.tables[space]
        assert table.shape == (len(names[space]) + 1, 64)
        torch.testing.assert_close(table[:-1], raw[f"{space}.features"])
        torch.testing.assert_close(table[-1], raw["background.features"])


def test_official_pt_files_load_with_weights_only(tmp_path):
    """The official repo's dataset/*_features.pt layout: dicts with `features`,
    background a bare tensor."""
    raw = load_file(str(shared_path("label_spaces", "label_features.safetensors")))
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
    spaces = load_label_spaces(shared_path("label_spaces"))
    ids = torch.full((2, 1, 5, 7), 255, dtype=torch.uint8)
    ids[0, 0, 1:3, 2:4] = 5
    ids[1, 0, 0, 0] = 132
    table = spaces.id_table("coco").expand(2, -1, -1)
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
    with pytest.raises(SampleError, match="refused"):
        read_ocr_record(tmp_path / "evil.png")  # a skipped sample, not a crashed worker


def test_palette_id_map_keeps_raw_ids(tmp_path):
    from dataset.files import read_ids

    img = Image.fromarray(np.array([[5, 255], [7, 5]], np.uint8), "L").convert("P")
    img.putpalette([(i * 37) % 256 for i in range(768)])
    img.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    np.testing.assert_array_equal(read_ids(tmp_path / "p.png", (2, 2)), [[5, 255], [7, 5]])
