"""The OCR expert (CharNet + CLIP word features): the official network's outputs
(tests/fixtures/experts), and the official post-processing and label worked out by hand."""

import json
import math
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from common.files import CheckpointError
from common.hub import DownloadError
from common.label_space import DEFAULT_PATH, SAFETENSORS_NAME
from common.labels import OCR, read_ocr_record
from common.modalities import EXPERTS
from experts import ocr
from tests.conftest import FIXTURES, synthetic_weights
from tests.expert_files import write_tiny_clip

PARITY = FIXTURES / "experts" / "parity_ocr_detection.safetensors"
TOL = 1e-5  # relative; a float32 reimplementation reaches ~2e-6


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """The official weight file's format (a flat state_dict) with the synthetic weights."""
    path = tmp_path_factory.mktemp("charnet") / "icdar2015_hourglass88.pth"
    torch.save(synthetic_weights(ocr.CharNet().state_dict()), path)
    return path


def test_keys_and_shapes_are_the_official_files():
    layout = json.loads((FIXTURES / "experts" / "layout_ocr_detection.json").read_text())
    state = ocr.CharNet().state_dict()
    assert len(layout) == 594
    assert list(state) == list(layout)
    assert {k: list(v.shape) for k, v in state.items()} == layout


@pytest.fixture(scope="module")
def generator(official_file, tiny_clip):
    """Loaded once, as the driver does: the official file, the tiny CLIP folder."""
    generator = ocr.Generator("ocr_detection", clip=tiny_clip[0])
    generator.load(official_file)
    return generator


@torch.no_grad()
def test_outputs_match_the_official_network(generator):
    ref = load_file(PARITY)
    with safe_open(PARITY, "pt") as f:
        meta = f.metadata()
    x = torch.rand((1, 3, 128, 128), generator=torch.Generator().manual_seed(7))  # the reference input
    mean, std = torch.tensor(ocr.MEAN).view(1, 3, 1, 1), torch.tensor(ocr.STD).view(1, 3, 1, 1)
    out = generator.model.charnet((x - mean) / std)
    for name in ("features", "word_fg_logits", "word_tblr", "word_orient", "char_fg_logits", "char_tblr"):
        got, want = out[name], ref[f"output.{name}"]
        if f"stride.output.{name}" in meta:
            assert list(got.shape) == [int(s) for s in meta[f"shape.output.{name}"].split(",")], name
            got = got.flatten()[:: int(meta[f"stride.output.{name}"])]
        else:
            assert got.shape == want.shape, name
        assert ((got - want).norm() / want.norm()).item() < TOL, name
    cls = out["char_cls_logits"].flatten()[:: int(meta["stride.output.char_cls_logits"])]
    assert ((cls - ref["output.char_cls_logits"]).norm() / ref["output.char_cls_logits"].norm()).item() < TOL


def test_a_file_that_is_not_charnet_is_refused_naming_it(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"backbone.pre.0.weight": torch.zeros(128, 3, 7, 7)}, path)
    with pytest.raises(CheckpointError, match=r"other\.pth.*593 missing keys"):
        ocr.load_charnet(path)


def test_preprocessing_is_a_pil_480_resize_then_imagenet_normalisation():
    x = ocr.Generator().preprocess(Image.fromarray(np.full((37, 91, 3), (255, 0, 128), np.uint8)))
    assert x.shape == (3, 480, 480)
    want = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    assert torch.allclose(x, torch.tensor(want).view(3, 1, 1).expand(3, 480, 480), atol=1e-6)
    # Black | white, 2 px wide, stretched bilinearly: output column 240 samples the source at
    # x = (240 + 0.5) * 2 / 480 - 0.5 = 0.502, i.e. 0.502 * 255 = 128 (within PIL's rounding);
    # column 200: x = 0.335, 85.5 (bicubic would give 76).
    x = ocr.Generator().preprocess(Image.fromarray(np.array([[[0] * 3, [255] * 3]] * 2, np.uint8)))
    red = x[0] * 0.229 + 0.485
    assert abs(red[5, 240].item() - 128 / 255) <= 1 / 255
    assert abs(red[5, 200].item() - 85.5 / 255) <= 1 / 255
    assert red[5, 0].item() == pytest.approx(0, abs=1e-6) and red[5, 479].item() == pytest.approx(1, abs=1e-6)


# ---- geometry, worked by hand ----------------------------------------------------------------


def square(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


def test_polygon_intersections_worked_by_hand():
    clip = square(0, 0, 2, 2)
    subjects = np.stack(
        [
            square(1, 1, 3, 3),  # a corner: 1
            np.array([[1, -1], [3, 1], [1, 3], [-1, 1]], float),  # a diamond holding the square: 4
            square(5, 5, 6, 6),  # apart: 0
            square(1, 1, 3, 3)[::-1],  # clockwise: still 1
            square(0.5, 0.5, 1.5, 1.5),  # inside: 1
        ]
    )
    assert np.allclose(ocr.intersection_areas(clip, subjects), [1, 4, 0, 1, 1])
    assert np.allclose(ocr.intersection_areas(clip[::-1], subjects), [1, 4, 0, 1, 1])
    # A concave dart (area 1) cut at x = 1: between y = x/2 .. 2 - x/2 minus x .. 2 - x, i.e.
    # a height of x at x, integrated over 0..1: 1/2.
    dart = np.array([[[0, 0], [2, 1], [0, 2], [1, 1]]], float)
    assert np.allclose(ocr.polygon_areas(dart), [1])
    assert np.allclose(ocr.intersection_areas(square(0, 0, 1, 2), dart), [0.5])
    assert np.allclose(ocr.intersection_areas(square(1, 1, 1, 1), subjects), 0)  # a degenerate clip


def test_polygon_nms_worked_by_hand():
    """The official rule: suppress IoU > 0.15; keep only boxes with a neighbour of IoU > 0.5,
    moved to the score-weighted mean of the group."""
    boxes = [
        (square(0, 0, 10, 10), 0.9),  # A
        (square(1, 0, 11, 10), 0.8),  # IoU(A) = 90/110: a neighbour of A, suppressed
        (square(6, 0, 16, 10), 0.7),  # IoU(A) = 40/160 = 0.25: suppressed, not a neighbour
        (square(50, 0, 60, 10), 0.65),  # alone: dropped, but it suppresses the next (IoU 1/3)
        (square(55, 0, 65, 10), 0.3),
        (square(30, 20, 40, 30), 0.5),  # E
        (square(31, 20, 41, 30), 0.4),  # its neighbour
        (square(30, 50, 40, 60), 0.45),  # alone: dropped
    ]
    arr = np.array([[*q.flatten(), s] for q, s in boxes], np.float32)
    cls = np.eye(8, dtype=np.float32)
    keep, new, new_cls = ocr.polygon_nms(arr, cls, 0.15)
    assert keep == [0, 5]
    assert np.allclose(new[0, :8], [0.8 / 1.7, 0, 10 + 0.8 / 1.7, 0, 10 + 0.8 / 1.7, 10, 0.8 / 1.7, 10])
    assert np.allclose(new[5, :8], [30 + 0.4 / 0.9, 20, 40 + 0.4 / 0.9, 20, 40 + 0.4 / 0.9, 30, 30 + 0.4 / 0.9, 30])
    assert np.isclose(new[0, 8], 0.9) and np.isclose(new[5, 8], 0.5)
    assert np.allclose(new_cls[0], [0.9 / 1.7, 0.8 / 1.7, 0, 0, 0, 0, 0, 0])
    assert np.allclose(new_cls[5], [0, 0, 0, 0, 0, 0.5 / 0.9, 0.4 / 0.9, 0])


def test_polygon_fill_is_cv2_fillpoly_worked_by_hand():
    """cv2.fillPoly(mask, [[(1,1), (6,2), (5,5), (0,4)]], 1) on 8 x 7, worked out from its rule:
    the 8-connected outline (rows 1: x 1-3; 2: 1, 4-6; 3: 0, 6; 4: 0-2, 5; 5: 3-5) plus per row
    the pixels from ceil(left) to floor(right) crossing (1: 1-1; 2: 0.67-6; 3: 0.33-5.67; 4: 0-5.33).
    (PIL's ImageDraw.polygon leaves out (2,1), (3,1), (3,5), (4,5) here.)"""
    mask = np.zeros((7, 8), np.uint8)
    ocr.fill_polygon(mask, np.array([[1, 1], [6, 2], [5, 5], [0, 4]]), 1)
    want = [
        "........",
        ".###....",
        ".######.",
        "#######.",
        "######..",
        "...###..",
        "........",
    ]
    assert ["".join(".#"[v] for v in row) for row in mask] == want
    rect = np.zeros((5, 6), np.uint8)
    ocr.fill_polygon(rect, np.array([[1, 1], [4, 1], [4, 3], [1, 3]]), 7)  # edges included
    assert (rect == 7).sum() == 12 and (rect[1:4, 1:5] == 7).all()


# ---- post-processing on hand-made network outputs ---------------------------------------------

H = W = 16  # cells; the network input is 64 x 64 and so is the original image: 4 pixels a cell
THETA = math.atan2(0.6, 0.8)  # cos 0.8, sin 0.6


def char_probs(c: str, p: float) -> np.ndarray:
    probs = np.full(68, (1 - p) / 67, np.float32)
    probs[ocr.CHARS.index(c)] = p
    return probs


def two_words() -> ocr.CharNetOutput:
    """Word A: cells x 2..10, y 2..9 (pixels 8..40 x 8..36), score 0.9, upright, chars 'H'
    (12..24 x 8..20) and 'I' (28..36 x 8..20). Word B: two cells at x 6, y 10 and 11 (centres
    (24, 40), (24, 44)), score 0.8, box 16..36 x 38..46 about each centre rotated by THETA:
    the mean of the two is the box rotated about (24, 42); chars '4' (20..26 x 38..46) and
    '2' (26..32 x 40..48), read on cells x 6 and 7 (the x 7 cells have empty word boxes)."""
    word_fg = np.full((H, W), 0.05, np.float32)
    word_tblr = np.zeros((4, H, W), np.float32)
    orient = np.zeros((H, W), np.float32)
    char_fg = np.full((H, W), 0.1, np.float32)
    char_tblr = np.zeros((4, H, W), np.float32)
    cls = np.tile(char_probs("a", 0.2)[:, None, None], (1, H, W))
    for y, x in [(3, 4), (4, 4), (3, 8), (4, 8), (5, 5), (6, 6)]:
        word_fg[y, x] = 0.9
        word_tblr[:, y, x] = [y - 2, 9 - y, x - 2, 10 - x]
    for y in (10, 11):
        word_fg[y, 6], orient[y, 6] = 0.8, THETA
        word_tblr[:, y, 6] = [y - 9.5, 11.5 - y, 2, 3]
        word_fg[y, 7] = 0.6
    chars = {  # cell -> (char box in cells x0, y0, x1, y1, class, P(class), char score)
        (3, 4): (3, 2, 6, 5, "h", 0.99, 0.8),
        (4, 4): (3, 2, 6, 5, "h", 0.99, 0.7),
        (3, 8): (7, 2, 9, 5, "i", 0.99, 0.8),
        (4, 8): (7, 2, 9, 5, "i", 0.99, 0.7),
        (10, 6): (5, 9.5, 6.5, 11.5, "4", 0.95, 0.9),
        (11, 6): (5, 9.5, 6.5, 11.5, "4", 0.95, 0.9),
        (10, 7): (6.5, 10, 8, 12, "2", 0.93, 0.85),
        (11, 7): (6.5, 10, 8, 12, "2", 0.93, 0.85),
    }
    for (y, x), (x0, y0, x1, y1, c, p, score) in chars.items():
        char_fg[y, x] = score
        char_tblr[:, y, x] = [y - y0, y1 - y, x - x0, x1 - x]
        cls[:, y, x] = char_probs(c, p)
    return ocr.CharNetOutput(word_fg, word_tblr, orient, char_fg, char_tblr, cls, (4 * H, 4 * W))


# B's corners: (16, 38), (36, 38), (36, 46), (16, 46) minus (24, 42), rotated, plus (24, 42):
# (-8, -4) -> (-4, -8); (12, -4) -> (12, 4); (12, 4) -> (7.2, 10.4); (-8, 4) -> (-8.8, -1.6)
QUAD_A = [8, 8, 40, 8, 40, 36, 8, 36]
QUAD_B = [20, 34, 36, 46, 31, 52, 15, 40]  # rounded


def test_post_processing_reads_the_two_words():
    words = ocr.read_words(two_words(), (64, 64), ocr.PostProcessing(), ocr.Lexicon([]))
    assert [w.text for w in words] == ["HI", "42"]
    assert [w.quad.tolist() for w in words] == [QUAD_A, QUAD_B]
    assert words[0].score == pytest.approx(0.9) and words[1].score == pytest.approx(0.8)
    assert words[0].text_score == pytest.approx(0.99) and words[1].text_score == pytest.approx(0.94)


def test_boxes_scale_to_the_original_size():
    """A 128 x 32 original: x scaled by 2, y by 0.5, then clipped to the image."""
    words = ocr.read_words(two_words(), (128, 32), ocr.PostProcessing(), ocr.Lexicon([]))
    assert words[0].quad.tolist() == [16, 4, 80, 4, 80, 18, 16, 18]


def test_the_label_map_fills_words_in_reverse_and_later_fills_win():
    ids, texts = ocr.word_map(ocr.read_words(two_words(), (64, 64), ocr.PostProcessing(), ocr.Lexicon([])), (64, 64))
    assert ids.shape == (64, 64) and ids.dtype == np.uint8
    assert texts == ["42", "hi"]  # B first: id 0; A: id 1, filled last
    a = np.zeros((64, 64), bool)
    a[8:37, 8:41] = True  # edges included
    assert ((ids == 1) == a).all()
    assert ids[34, 20] == 1  # B's top corner lies in A: overwritten
    assert ids[46, 36] == ids[52, 31] == ids[40, 15] == ids[43, 26] == 0  # B's other corners, its centre
    assert ids[47, 20] == ids[37, 33] == 255  # beside B's edges
    assert set(np.unique(ids)) == {0, 1, 255}


def test_keep_rules_and_lexicon_correction_worked_by_hand():
    def kept(text, score, words=()):
        word = ocr.keep_word(ocr.Word(np.zeros(8, np.float32), 0.9, text, score), ocr.Lexicon(list(words)))
        return None if word is None else word.text

    assert kept("A1", 0.79) is None  # below 0.8
    assert kept("A1", 0.9) == "A1"  # not alphabetic, >= 0.9
    assert kept("AB", 0.98) == "AB"  # >= 0.98
    assert kept("AB", 0.97) is None  # needs the lexicon; there is none
    assert kept("A!", 0.85, ["a!"]) == "A!"  # exact match (any case): the text as read
    assert kept("AB", 0.97, ["AC"]) is None  # length <= 2: distance 0 only
    assert kept("STOP", 0.85, ["step", "shop"]) == "step"  # distance 1, length 4: the first closest
    assert kept("HELLO", 0.85, ["HXLLX"]) is None  # distance 2, length 5: 1 allowed
    assert kept("STREET", 0.85, ["strait", "zz"]) == "strait"  # distance 2, length 6: 2 allowed
    lexicon = ocr.Lexicon(["SITTING", "kitten", "", "SITTEN"])
    assert lexicon.distances("kitten", np.arange(4)).tolist() == [3, 0, 6, 1]


def test_lexicon_file_skips_comment_lines(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# a comment\nStreet \nstop\n")
    assert ocr.Lexicon.from_file(path).words == ["Street", "stop"]
    generator = ocr.Generator(lexicon=path)
    assert generator.lexicon.correct("STRET") == "Street"


def test_at_most_255_words_the_highest_scored():
    words = [ocr.Word(np.array([i, 0, i, 0, i, 0, i, 0], np.float32), 0.9, f"W{i}", 0.99) for i in range(300)]
    ids, texts = ocr.word_map(words, (300, 1))
    assert len(texts) == 255 and texts[-1] == "w0" and texts[0] == "w254"
    assert ids[0, 0] == 254 and ids[0, 254] == 0 and (ids[0, 255:] == 255).all()


# ---- CLIP word features ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    return folder, write_tiny_clip(folder)


def reference_features(folder, vocab, tokens: list[str]) -> torch.Tensor:
    """One word alone, its tokens given by hand: the end-of-text state projected, the official PCA applied."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    ids = [vocab["<|startoftext|>"], *(vocab[t] for t in tokens), vocab["<|endoftext|>"]]
    with torch.no_grad():
        hidden = model.text_model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        e = model.text_projection(hidden)
    pca = load_file(DEFAULT_PATH / SAFETENSORS_NAME)
    return (e - pca["clip_pca.mean"]) @ pca["clip_pca.components"].T


def test_to_label_gives_the_words_with_their_clip_features(generator, tiny_clip, tmp_path):
    folder, vocab = tiny_clip
    assert isinstance(generator.model.charnet, ocr.CharNet) and not generator.model.training
    label = generator.to_label(two_words(), (64, 64))
    assert [label.words[i]["text"] for i in (0, 1)] == ["42", "hi"]
    # CLIP's pre-tokenizer keeps letters together and splits digits one by one
    for i, tokens in ((0, ["4</w>", "2</w>"]), (1, ["h", "i</w>"])):
        got = label.words[i]["features"]
        assert got.shape == (64,) and got.dtype == torch.float32
        assert torch.allclose(got, reference_features(folder, vocab, tokens), atol=1e-5)
    assert not EXPERTS["ocr_detection"].kind.found_nothing(label)
    OCR.write(tmp_path / "a.png", label)  # the kind writes it as it comes
    record = read_ocr_record(tmp_path / "a")
    assert record[1]["text"] == "hi" and torch.allclose(record[1]["features"], label.words[1]["features"])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), label.ids)


def test_word_features_are_batch_independent(tiny_clip):
    """Padding a short word to a long one's length leaves its features as they are alone."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    folder, _ = tiny_clip
    text, tokenizer = CLIPTextModelWithProjection.from_pretrained(folder).eval(), CLIPTokenizer.from_pretrained(folder)
    both = ocr.word_features(["a", "longer-word!"], text, tokenizer)
    alone = ocr.word_features(["a"], text, tokenizer)
    assert torch.allclose(both[0], alone[0], atol=1e-5) and not torch.allclose(both[0], both[1])


def test_an_image_without_text_gives_an_empty_map_and_no_words(generator):
    raw = two_words()
    raw.word_fg_hw[:] = 0.3
    label = generator.to_label(raw, (50, 30))
    assert label.ids.shape == (30, 50) and (label.ids == 255).all() and label.words == {}
    assert EXPERTS["ocr_detection"].kind.found_nothing(label)


def test_predict_gives_probabilities_per_image(generator):
    """The driver's path: preprocess, predict (a batch of two), one raw output per image."""
    images = [Image.new("RGB", (64, 40), c) for c in ("white", "black")]
    x = torch.stack([generator.preprocess(image) for image in images])[..., :64, :96]  # a corner: faster
    with torch.no_grad():
        raws = generator.predict(generator.model, x)
    assert len(raws) == 2 and raws[0].input_hw == (64, 96)
    assert raws[0].word_fg_hw.shape == (16, 24) and raws[0].char_cls_Chw.shape == (68, 16, 24)
    assert np.allclose(raws[1].char_cls_Chw.sum(0), 1, atol=1e-5)
    assert ((raws[0].word_fg_hw >= 0) & (raws[0].word_fg_hw <= 1)).all()


def test_clip_hub_id_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))  # nothing cached
    start = time.monotonic()
    with pytest.raises(DownloadError, match="openai/clip-vit-large-patch14"):
        ocr.Generator().load(tmp_path / "icdar2015_hourglass88.pth")  # the CLIP encoder is looked for first
    assert time.monotonic() - start < 10
    with pytest.raises(FileNotFoundError):
        ocr.load_text_encoder(tmp_path / "no-such-folder")
