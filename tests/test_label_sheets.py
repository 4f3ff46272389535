"""Label sheets checked by their pixels: label files written by the label kinds,
a sheet drawn from them, and each panel read back.

Texts are found by stamping them with the sheet's font on white and searching
for the exact pixels; colours are compared between a label region and its
legend swatch or box, so no expectation comes from the drawing code."""

import json
import logging

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageDraw

from common.label_space import DEFAULT_PATH
from common.labels import Instances, Words
from common.modalities import EXPERTS
from helpers.label_sheets import SWATCH, font, label_sheet, palette_colour, save_label_sheet

W, H = 64, 48  # image size; sheets are drawn at HEIGHT, so every label pixel is a 2 x 2 block
HEIGHT = 96
NAMES = json.loads((DEFAULT_PATH / "label_names.json").read_text(encoding="utf-8"))
# magma's ends (matplotlib's published table): darkest for the farthest, brightest for the nearest
MAGMA_0, MAGMA_1 = (0, 0, 4), (252, 253, 191)


def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))


def write(tmp_path, expert: str, label, name: str = "a.png"):
    path = tmp_path / expert / name
    EXPERTS[expert].kind.write(path, label)
    return path


def ids_map(regions: dict[int, tuple[int, int, int, int]]) -> np.ndarray:
    """255 everywhere but each id's (left, top, right, bottom) box."""
    ids = np.full((H, W), 255, np.uint8)
    for i, (l, t, r, b) in regions.items():
        ids[t:b, l:r] = i
    return ids


def crop(sheet: Image.Image, box) -> np.ndarray:
    return np.asarray(sheet.crop(box))


def stamp(text: str) -> np.ndarray:
    """`text` as the sheet writes it: black on white, cut to its ink."""
    canvas = Image.new("L", (40 + 12 * len(text), 40), 255)
    ImageDraw.Draw(canvas).text((10, 10), text, fill=0, font=font())
    ink = np.asarray(canvas)
    ys, xs = np.nonzero(ink < 255)
    return ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def find(region: np.ndarray, text: str) -> list[tuple[int, int]]:
    """Top-left (x, y) of every exact occurrence of `text` in an RGB region."""
    st = stamp(text)
    if region.shape[0] < st.shape[0] or region.shape[1] < st.shape[1]:
        return []
    hit = np.ones((region.shape[0] - st.shape[0] + 1, region.shape[1] - st.shape[1] + 1), bool)
    for c in range(3):
        hit &= (sliding_window_view(region[..., c], st.shape) == st).all(axis=(2, 3))
    return [(int(x), int(y)) for y, x in zip(*np.nonzero(hit))]


def colour_at(region: np.ndarray, x: int, y: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in region[y, x])


def swatches(region: np.ndarray) -> list[tuple[tuple[int, int, int], tuple[int, int]]]:
    """The legend's coloured squares, (colour, top-left (x, y)), in reading order;
    each must be a full SWATCH x SWATCH square of one colour (text is grey)."""
    coloured = region.max(axis=2).astype(int) - region.min(axis=2) > 0
    found = []
    for colour in {tuple(int(v) for v in p) for p in region[coloured]}:
        ys, xs = np.nonzero((region == colour).all(axis=2))
        assert (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == (SWATCH, SWATCH), colour
        assert len(xs) == SWATCH * SWATCH, colour
        found.append((colour, (int(xs.min()), int(ys.min()))))
    return sorted(found, key=lambda s: (s[1][1], s[1][0]))


def test_segmentation_regions_have_their_legend_colours_and_the_legend_lists_the_classes_by_area(tmp_path):
    # coco: 0 person (largest), 2 car, 57 couch (smallest); the rest none (255)
    seg = ids_map({0: (0, 0, 30, 48), 2: (30, 20, 50, 48), 57: (54, 0, 60, 10)})
    paths = {"seg_coco": write(tmp_path, "seg_coco", seg), "seg_ade": write(tmp_path, "seg_ade", seg)}
    sheet = label_sheet(photo(), paths, height=HEIGHT)

    panel = crop(sheet, sheet.info["panels"]["seg_coco"])
    region = {i: colour_at(panel, 2 * x, 2 * y) for i, (x, y) in {0: (5, 5), 2: (40, 40), 57: (56, 5)}.items()}
    assert colour_at(panel, 2 * 52, 2 * 5) == (0, 0, 0)  # none is black
    assert len(set(region.values())) == 3 and (0, 0, 0) not in region.values()
    for i, colour in region.items():  # each region is one colour, edge to edge
        assert (panel[np.repeat(np.repeat(seg == i, 2, 0), 2, 1)] == colour).all()

    legend = crop(sheet, sheet.info["legends"]["seg_coco"])
    found = swatches(legend)
    assert [c for c, _ in found] == [region[0], region[2], region[57]]  # by area, largest first
    for (_, (x, y)), i in zip(found, (0, 2, 57)):
        beside = legend[max(y - 4, 0) : y + SWATCH + 4, x + SWATCH : x + SWATCH + 20 + 9 * len(NAMES["coco"][i])]
        assert find(beside, NAMES["coco"][i]), NAMES["coco"][i]
    for absent in ("bicycle", NAMES["ade"][0]):
        assert not find(legend, absent)

    # the same ids in the ADE space are named from it, in the same colours (a colour is its id's)
    ade = crop(sheet, sheet.info["legends"]["seg_ade"])
    assert [c for c, _ in swatches(ade)] == [region[0], region[2], region[57]]
    assert find(ade, NAMES["ade"][0]) and not find(ade, "person")


def test_a_class_keeps_its_colour_whatever_else_the_image_holds(tmp_path):
    alone = write(tmp_path, "seg_coco", ids_map({5: (0, 0, 20, 20)}), "alone.png")
    crowded = write(
        tmp_path, "seg_coco", ids_map({i: (2 * i, 30, 2 * i + 2, 48) for i in range(5)} | {5: (0, 0, 20, 20)})
    )
    colours = []
    for path in (alone, crowded):
        sheet = label_sheet(photo(), {"seg_coco": path}, height=HEIGHT)
        colours.append(colour_at(crop(sheet, sheet.info["panels"]["seg_coco"]), 10, 10))
    assert colours[0] == colours[1]


def test_the_palette_gives_every_id_its_own_colour_never_grey_or_black():
    colours = [palette_colour(i) for i in range(255)]
    assert len(set(colours)) == 255
    assert all(max(c) - min(c) > 40 for c in colours)


def boxed_texts(panel: np.ndarray, boxes: dict, texts: dict) -> dict[int, tuple[int, int, int]]:
    """Check each id's box (image pixels) is outlined in one colour and its text is on a tag
    at the box's top left framed in that colour; returns the colours."""
    outline = {}
    for i, (l, t, r, b) in boxes.items():
        l, t, r, b = 2 * l, 2 * t, 2 * r - 1, 2 * b - 1  # the box's first and last pixels in the panel
        edges = np.concatenate([panel[b, l : r + 1], panel[t + 1 : b + 1, l], panel[t + 1 : b + 1, r]])
        assert (edges == edges[0]).all(), i
        outline[i] = tuple(int(v) for v in edges[0])
        (x, y) = find(panel, texts[i])[0]
        assert t - 20 < y < t and abs(x - l) < 8, texts[i]  # just above the box's top left corner
        row = panel[y + stamp(texts[i]).shape[0] // 2, :x]
        framed = np.flatnonzero((row != 255).any(axis=1))[-1]  # left of the text: its tag's frame
        assert tuple(int(v) for v in row[framed]) == outline[i]
    assert len(set(outline.values())) == len(outline)
    return outline


def test_detection_boxes_are_outlined_in_their_instance_colour_with_the_class_name_above(tmp_path):
    boxes = {3: (6, 15, 26, 40), 7: (34, 20, 60, 46)}  # left, top, right, bottom in image pixels
    label = Instances(ids_map(boxes), {3: 3, 7: 0, 9: 5})  # 9 is named but absent: not drawn
    sheet = label_sheet(photo(), {"obj_detection": write(tmp_path, "obj_detection", label)}, height=HEIGHT)
    panel = crop(sheet, sheet.info["panels"]["obj_detection"])
    boxed_texts(panel, boxes, {i: NAMES["detection"][label.classes[i]] for i in boxes})
    assert not find(panel, NAMES["detection"][5])


def test_ocr_words_are_written_at_their_boxes(tmp_path):
    boxes = {1: (4, 20, 24, 30), 2: (30, 34, 60, 44)}
    feature = torch.linspace(-1, 1, 64)
    words = {1: {"text": "café", "features": feature}, 2: {"text": "STOP", "features": feature}}
    path = write(tmp_path, "ocr_detection", Words(ids_map(boxes), words))
    sheet = label_sheet(photo(), {"ocr_detection": path}, height=HEIGHT)
    panel = crop(sheet, sheet.info["panels"]["ocr_detection"])
    boxed_texts(panel, boxes, {i: w["text"] for i, w in words.items()})
    assert not find(panel, "no text found")


def test_ocr_without_words_says_no_text_found(tmp_path):
    empty = write(tmp_path, "ocr_detection", Words(np.full((H, W), 255, np.uint8), {}), "empty.png")
    recordless = write(
        tmp_path, "ocr_detection", Words(ids_map({1: (0, 0, 9, 9)}), {1: {"text": "x", "features": torch.zeros(64)}})
    )
    recordless.with_suffix(".json").unlink()  # officially: no record means no words were found
    for path in (empty, recordless):
        sheet = label_sheet(photo(), {"ocr_detection": path}, height=HEIGHT)
        assert find(crop(sheet, sheet.info["panels"]["ocr_detection"]), "no text found")


def test_depth_is_colour_mapped_nearest_brightest_edges_stay_dark_normals_stay_rgb(tmp_path):
    depth = np.zeros((H, W), np.uint8)
    depth[:, 20:40], depth[:, 40:] = 100, 230  # far | middle | near (MiDaS: brighter = nearer)
    edge = np.full((H, W), 255, np.uint8)
    edge[10, :] = 0  # a dark edge on white, as the edge expert writes it
    normal = np.zeros((H, W, 3), np.uint8)
    normal[..., 0], normal[..., 1], normal[..., 2] = 30, 140, 250
    labels = {
        "depth": write(tmp_path, "depth", Image.fromarray(depth, "L")),
        "edge": write(tmp_path, "edge", Image.fromarray(edge, "L")),
        "normal": write(tmp_path, "normal", Image.fromarray(normal, "RGB")),
    }
    sheet = label_sheet(photo(), labels, height=HEIGHT)
    panel = crop(sheet, sheet.info["panels"]["depth"])
    far, middle, near = (colour_at(panel, 2 * x, 40) for x in (5, 30, 50))
    assert far == MAGMA_0 and near == MAGMA_1
    assert sum(far) < sum(middle) < sum(near)
    panel = crop(sheet, sheet.info["panels"]["edge"])
    assert colour_at(panel, 30, 2 * 10) == (0, 0, 0) and colour_at(panel, 30, 2 * 30) == (255, 255, 255)
    panel = crop(sheet, sheet.info["panels"]["normal"])
    assert (panel == (30, 140, 250)).all()


def test_a_missing_or_unreadable_label_is_a_panel_saying_so_and_the_rest_is_drawn(tmp_path, caplog):
    truncated = write(tmp_path, "depth", Image.fromarray(np.arange(H * W, dtype=np.uint8).reshape(H, W)))
    truncated.write_bytes(truncated.read_bytes()[:60])
    unnamed = write(tmp_path, "obj_detection", Instances(ids_map({4: (0, 0, 9, 9)}), {4: 2}))
    unnamed.with_suffix(".json").write_text("{}")
    labels = {
        "depth": truncated,
        "edge": tmp_path / "edge" / "nowhere.png",
        "normal": None,
        "obj_detection": unnamed,
        "seg_coco": write(tmp_path, "seg_coco", ids_map({0: (0, 0, W, H)})),
    }
    with caplog.at_level(logging.WARNING):
        sheet = label_sheet(photo(), labels, height=HEIGHT)
    panels = {name: crop(sheet, box) for name, box in sheet.info["panels"].items()}
    assert find(panels["edge"], "no label") and find(panels["normal"], "no label")
    for name in ("depth", "obj_detection"):
        assert find(panels[name], "unreadable label") and not find(panels[name], "no label")
        assert str(labels[name]) in caplog.text
    assert find(crop(sheet, sheet.info["legends"]["seg_coco"]), "person")


def test_sheet_layout_titles_sizes_and_saving(tmp_path):
    seg = write(tmp_path, "seg_coco", ids_map({0: (0, 0, 9, 9)}))
    for size, picture in (((1000, 100), (192, 19)), ((1, 1), (96, 96)), ((W, H), (128, 96))):
        sheet = label_sheet(Image.new("RGB", size, (10, 200, 10)), {"seg_coco": seg}, height=HEIGHT)
        boxes = sheet.info["panels"]
        for name, (l, t, r, b) in boxes.items():
            assert (r - l, b - t) == picture
            assert find(crop(sheet, (l - 40, t - 20, r + 40, t)), name)
        assert (crop(sheet, boxes["photo"]) == (10, 200, 10)).all()

    out = tmp_path / "sheets" / "a.png"
    sheet = save_label_sheet(photo(), {"seg_coco": seg}, out, height=HEIGHT)
    with Image.open(out) as img:
        assert img.format == "PNG" and (np.asarray(img.convert("RGB")) == np.asarray(sheet)).all()
    assert [p.name for p in out.parent.iterdir()] == ["a.png"]


@pytest.mark.parametrize("expert", ["rgb", "sketch"])
def test_an_expert_without_a_label_kind_is_refused(tmp_path, expert):
    with pytest.raises(ValueError, match=expert):
        label_sheet(photo(), {expert: tmp_path / "a.png"})
