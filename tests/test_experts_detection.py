"""The detection expert (UniDet Cascade R-CNN, ResNeSt-200) computes what the official
network computes (tests/fixtures/experts, slimmed by slim_detection.py), and its labels
are the official get_mask_labels'.

The full-size synthetic weights (~121M parameters, ~0.5 GB) are built once for the module
(~4 s) and loaded from an official-style file (~3 s); the backbone at 128x160 (~5 s) and the
three cascade stages on 370 proposals (~6 s) dominate: the file takes 40-50 CPU-seconds
(45-55 s wall on the shared 2-core machine), peak memory 2.1 GB."""

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchvision.ops import batched_nms, box_iou

from common.files import CheckpointError
from common.labels.instance import InstanceMap
from experts import detection
from experts.detection import Detections, Generator, Sizes
from tests.conftest import FIXTURES, synthetic_weights

EXPERTS = FIXTURES / "experts"
PARITY = EXPERTS / "parity_detection.safetensors"
IMAGE_HW, TRUE_SIZE = (120, 150), (188, 150)  # the reference case (NOTES section 6); TRUE_SIZE is (W, H)
THRESHOLDS = {"default": 0.5, "high": 0.65}
MARGIN = 1e-5  # detections this close to the threshold or the top-300 cut are not compared
MEAN, STD = (123.68, 116.779, 103.939), (58.393, 57.12, 57.375)


@pytest.fixture(scope="module")
def ref():
    with safe_open(PARITY, "pt") as f:
        meta = f.metadata()
    return load_file(PARITY), meta


def compare(ref, name: str, ours: torch.Tensor, atol: float) -> float:
    """Our tensor against the stored one (stored subsampled as flatten()[::stride] if big)."""
    tensors, meta = ref
    if f"stride.{name}" in meta:
        ours = ours.flatten()[:: int(meta[f"stride.{name}"])]
    want = tensors[name]
    assert ours.shape == want.shape, name
    diff = (ours - want).abs().max().item()
    assert diff <= atol, f"{name}: max |diff| {diff:.2e} > {atol:.0e}"
    return diff


def seeded_input() -> torch.Tensor:
    """The reference input, regenerated (NOTES: x = rand((1,3,120,150), seed 7) stands for
    the RGB image in [0, 1]; Prismer feeds BGR x 255, normalised, zero-padded to 128x160)."""
    x = torch.rand((1, 3, *IMAGE_HW), generator=torch.Generator().manual_seed(7))
    image = x.flip(1) * 255
    normalised = (image - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    return F.pad(normalised, (0, 10, 0, 8))


def seeded_depth() -> torch.Tensor:
    """NOTES' parity depth label: floor(255 * (0.7 x / (W-1) + 0.3 y / (H-1))) / 255."""
    y, x = torch.meshgrid(torch.arange(120).float(), torch.arange(150).float(), indexing="ij")
    return torch.floor(255 * (0.7 * x / 149 + 0.3 * y / 119)) / 255


def layout() -> dict[str, list[int]]:
    return json.loads((EXPERTS / "layout_obj_detection.json").read_text())


def official_template(sizes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Keys and shapes (meta tensors, no memory); the int64 counters as real zeros."""
    return {
        k: torch.zeros((), dtype=torch.long) if k.endswith("num_batches_tracked") else torch.empty(s, device="meta")
        for k, s in sizes.items()
    }


@pytest.fixture(scope="module")
def official() -> dict[str, torch.Tensor]:
    return synthetic_weights(official_template(layout()))


COUNTERS = 16  # FrozenBN num_batches_tracked: stem 3, res2 13


@pytest.fixture(scope="module")
def model(official, tmp_path_factory):
    """Loaded through Generator.load from an official-style file: under 'model' beside a
    training entry, every key with `module.`, without the 16 FrozenBN counters."""
    counters = set(detection.frozen_counters(official))
    assert len(counters) == COUNTERS
    path = tmp_path_factory.mktemp("weights") / detection.OFFICIAL_FILE
    model_dict = {f"module.{k}": v for k, v in official.items() if k not in counters}
    torch.save({"model": model_dict, "iteration": 539999}, path)
    loaded = Generator("obj_detection").load(path)
    path.unlink()
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in official.items() if k not in counters)
    assert all(state[k].item() == 0 for k in counters)
    return loaded


@pytest.fixture(scope="module")
def features(model):
    with torch.no_grad():
        x = seeded_input()
        res = model.backbone.bottom_up(x)
        return res, model.backbone.pyramid(res)


# ---- the official weight file --------------------------------------------------------------


def test_the_network_has_exactly_the_official_keys_and_shapes():
    with torch.device("meta"):
        net = detection.UniDet()
    mine = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert mine == layout() and len(mine) == 1960
    assert sum(v.numel() for k, v in net.state_dict().items() if v.is_floating_point()) == 120_709_842
    assert len(detection.frozen_counters(mine)) == COUNTERS


@pytest.mark.parametrize(
    "form", ["top level, with the counters", "top level, without the counters", "module. prefix", "under 'model'"]
)
def test_every_form_of_the_file_gives_the_same_strict_state(form, official):
    """What the loader takes from each form detectron2 accepts: the state dict, whole."""
    counters = set(detection.frozen_counters(official))
    obj = {
        "top level, with the counters": official,
        "top level, without the counters": {k: v for k, v in official.items() if k not in counters},
        "module. prefix": {f"module.{k}": v for k, v in official.items()},
        "under 'model'": {"model": official, "iteration": torch.tensor(7)},
    }[form]
    state = detection.official_state(obj, "w.pth")
    want = set(official) - (counters if "without" in form else set())
    assert set(state) == want and all(state[k] is official[k] for k in want)


def test_the_full_state_with_the_counters_loads_strictly(official):
    net = detection.build(official, "w.pth")
    loaded = net.state_dict()
    assert loaded.keys() == official.keys() and not net.training
    key = "backbone.bottom_up.res4.23.conv2.fc1.weight"
    assert torch.equal(loaded[key], official[key])


def test_missing_and_unexpected_keys_are_named_in_one_line_with_the_file(official):
    state = {k: v for k, v in official.items() if k != "roi_heads.box_predictor.2.cls_score.bias"}
    state["roi_heads.box_predictor.3.cls_score.bias"] = torch.zeros(723)
    with pytest.raises(CheckpointError) as err:
        detection.build(state, "weights/Unified_learned_OCIM_RS200_6x+2x.pth")
    message = str(err.value)
    assert "\n" not in message and "weights/Unified_learned_OCIM_RS200_6x+2x.pth" in message
    assert "1 missing keys: roi_heads.box_predictor.2.cls_score.bias" in message
    assert "1 unexpected keys: roi_heads.box_predictor.3.cls_score.bias" in message


def test_a_prefix_on_only_some_keys_is_not_stripped(official):
    state = dict(official)
    state["module.proposal_generator.rpn_head.conv.bias"] = state.pop("proposal_generator.rpn_head.conv.bias")
    with pytest.raises(CheckpointError, match="unexpected keys: module.proposal_generator.rpn_head.conv.bias"):
        detection.build(detection.official_state(state, "w.pth"), "w.pth")


class RunsCode:
    def __reduce__(self):
        return print, ("unpickled",)


def test_a_file_with_code_or_without_a_state_dict_is_refused_by_name(tmp_path):
    with open(tmp_path / "code.pth", "wb") as f:
        pickle.dump({"model": {"a": RunsCode()}}, f, protocol=2)
    torch.save({"model": ["not", "a", "dict"]}, tmp_path / "list.pth")
    save_file({"a": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="code.pth: not a weights-only torch checkpoint"):
        detection.read_official(tmp_path / "code.pth")
    with pytest.raises(CheckpointError, match="list.pth: holds no state dict"):
        detection.read_official(tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="other.safetensors does not fit the model: 1944 missing keys"):
        Generator("obj_detection").load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="Unified_learned_OCIM_RS200_6x"):
        Generator("obj_detection").load(tmp_path / "absent.pth")


# ---- the network against the official one --------------------------------------------------


def test_backbone_and_fpn_match(features, ref):
    res, pyramid = features
    diffs = {k: compare(ref, f"backbone.{k}", res[k], 1e-4) for k in ("res3", "res4", "res5")}
    diffs |= {k: compare(ref, f"fpn.{k}", pyramid[k], 1e-4) for k in ("p3", "p4", "p5", "p6", "p7")}
    assert [tuple(pyramid[f"p{i}"].shape[-2:]) for i in range(3, 8)] == [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
    print({k: f"{v:.1e}" for k, v in diffs.items()})


def test_rpn_outputs_anchors_and_proposals_match(model, features, ref):
    _, pyramid = features
    levels = [pyramid[f"p{i}"] for i in detection.LEVELS]
    with torch.no_grad():
        heads = model.proposal_generator.rpn_head(levels)
    anchors = [detection.grid_anchors(i, x.shape[-2:]) for i, x in zip(detection.LEVELS, levels)]
    for i, (logits, deltas), a in zip(detection.LEVELS, heads, anchors):
        compare(ref, f"rpn.objectness_logits.p{i}", logits, 1e-4)
        compare(ref, f"rpn.anchor_deltas.p{i}", deltas, 1e-4)
        compare(ref, f"rpn.anchors.p{i}", a, 1e-4)
    assert sum(len(a) for a in anchors) == 3852
    (ours,) = detection.find_top_proposals(heads, anchors, IMAGE_HW)
    want_boxes, want_logits = ref[0]["proposals.boxes"], ref[0]["proposals.objectness_logits"]
    # as sets of (box, logit): an IoU at 0.7 +- 4e-5 may keep or drop one proposal under
    # harmless changes; a box clipped to the whole image can come from several levels
    same = torch.cdist(want_boxes, ours.boxes_N4, p=float("inf")) < 1e-3
    same &= (want_logits[:, None] - ours.logits_N[None]).abs() < 1e-4
    assert (~same.any(1)).sum() <= 1 and (~same.any(0)).sum() <= 1
    assert abs(len(ours.boxes_N4) - 370) <= 1 and torch.all(ours.logits_N[:-1] >= ours.logits_N[1:])  # best first


def test_cascade_stages_on_the_stored_proposals_match(model, features, ref):
    _, pyramid = features
    tensors, meta = ref
    assert int(meta["roi_row_stride"]) == 6  # every 6th of the 370 stored proposals
    for k, weights in enumerate(detection.CASCADE_WEIGHTS):
        boxes = tensors[f"roi.stage{k}.proposal_boxes"]
        with torch.no_grad():
            logits, deltas = model.roi_heads.stage(pyramid, [boxes], k)
        compare(ref, f"roi.stage{k}.class_logits", logits, 1e-4)
        compare(ref, f"roi.stage{k}.box_deltas", deltas, 1e-4)
        compare(ref, f"roi.stage{k}.pred_boxes", detection.apply_deltas(deltas, boxes, weights), 1e-2)


def test_boxes_pool_from_the_level_of_their_size():
    """Level floor(4 + log2(sqrt(area) / 224)) clamped to 3..5: constant maps (p3 = 3, p4 = 4,
    p5 = 5 for image 0, +10 for image 1) show which level and image each box was pooled
    from (the parity image has only p3 boxes)."""
    features = {f"p{i}": torch.full((2, 1, 2048 >> i, 2048 >> i), float(i)) for i in (3, 4, 5)}
    for x in features.values():
        x[1] += 10
    sides = [(8, 8), (223, 224), (224, 224), (447, 448), (448, 448), (2000, 2000)]
    boxes = torch.tensor([[10, 20, 10 + w, 20 + h] for w, h in sides], dtype=torch.float32)
    pooled = detection.CascadeROIHeads.pool(features, [boxes[:2], boxes[2:]])
    assert pooled.shape == (6, 1, 7, 7)
    assert pooled.amax((1, 2, 3)).tolist() == pooled.amin((1, 2, 3)).tolist() == [3, 3, 14, 14, 15, 15]


def assert_same_detections(ours: Detections, tensors, case: str):
    """Matched by class and IoU > 0.99, scores within 1e-5, in both directions, except
    where a score is within MARGIN of the threshold or of the top-300 cut."""
    boxes, scores, classes = (tensors[f"det.{case}.{k}"] for k in ("boxes", "scores", "classes"))
    floor = THRESHOLDS[case] if len(scores) < 300 else scores[-1].item()
    iou = box_iou(boxes, ours.boxes_N4)
    same = (iou > 0.99) & (classes[:, None] == ours.classes_N[None]) & ((scores[:, None] - ours.scores_N).abs() < 1e-5)
    assert same[scores > floor + MARGIN].any(1).all()
    assert same[:, ours.scores_N > floor + MARGIN].any(0).all()


@pytest.fixture(scope="module")
def cascade(model, features):
    """Our own proposals through the three stages: per image (boxes, scores)."""
    _, pyramid = features
    with torch.no_grad():
        proposals = model.proposal_generator(pyramid, IMAGE_HW)
        return model.roi_heads.boxes_and_scores(pyramid, proposals, IMAGE_HW)


@pytest.mark.parametrize("case", ["default", "high"])
def test_final_detections_and_their_labels_match(case, cascade, ref):
    tensors, meta = ref
    ((boxes, scores),) = cascade
    ours = detection.fast_rcnn_inference(boxes, scores, IMAGE_HW, THRESHOLDS[case])
    assert len(ours.boxes_N4) == len(tensors[f"det.{case}.boxes"]) == {"default": 300, "high": 96}[case]
    assert_same_detections(ours, tensors, case)
    assert torch.all(ours.scores_N[:-1] >= ours.scores_N[1:])
    # the detection lists match: the label maps must match exactly
    assert torch.equal(ours.classes_N, tensors[f"det.{case}.classes"])
    assert (ours.boxes_N4 - tensors[f"det.{case}.boxes"]).abs().max() < 1e-3
    final, classes = detection.get_mask_labels(seeded_depth(), ours.boxes_N4, ours.classes_N)
    label = detection.instance_label(final, classes, TRUE_SIZE)
    assert np.array_equal(label.ids, tensors[f"label.{case}.instance_map_true_size"].numpy())
    assert json.loads(meta[f"instance_json.{case}"]) == {str(k): v for k, v in label.classes.items()}


def test_nms_per_class_is_torchvisions_batched_nms():
    g = torch.Generator().manual_seed(3)
    xy = torch.rand((3000, 2), generator=g) * 100
    boxes = torch.cat([xy, xy + 5 + 30 * torch.rand((3000, 2), generator=g)], 1)
    scores, classes = torch.rand(3000, generator=g), torch.randint(0, 40, (3000,), generator=g)
    want = batched_nms(boxes, scores, classes, 0.5)
    assert 300 < len(want) < 2900
    assert torch.equal(detection.nms_per_class(boxes, scores, classes, 0.5), want)


# ---- labels: the official get_mask_labels --------------------------------------------------


@pytest.mark.parametrize("case", ["default", "high"])
def test_labels_of_the_stored_detections_are_the_official_ones(case, ref, tmp_path):
    tensors, meta = ref
    boxes, classes = tensors[f"det.{case}.boxes"], tensors[f"det.{case}.classes"]
    final, kept = detection.get_mask_labels(seeded_depth(), boxes, classes)
    before_resize = np.asarray(Image.fromarray(final.numpy()).convert("L"))
    assert np.array_equal(before_resize, tensors[f"label.{case}.instance_map"].numpy())
    label = detection.instance_label(final, kept, TRUE_SIZE)
    want = tensors[f"label.{case}.instance_map_true_size"].numpy()
    assert label.ids.dtype == np.uint8 and np.array_equal(label.ids, want)
    # NOTES: default 187 instances, 31 visible; high 94 instances, 48 visible
    visible = {"default": 31, "high": 48}[case]
    assert len(kept) == {"default": 187, "high": 94}[case] and len(np.unique(want[want != 255])) == visible
    InstanceMap().write(tmp_path / "label.png", label)
    assert json.loads((tmp_path / "label.json").read_text()) == json.loads(meta[f"instance_json.{case}"])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "label.png")), want)


def test_a_hand_worked_case_containment_depth_order_and_a_duplicate():
    """6x10 depth: columns 0-4 near (0.6), 5-9 far (0.1). In score order:
    P (1,1)-(3,3) class 5 -> rows 1-2, cols 1-2, inside Q;
    Q (0,0)-(4.9,5) class 7 -> rows 0-4, cols 0-3 (int(4.9) = 4);
    D (0.2,0.7)-(4.5,5.9) class 9 -> the same rectangle as Q: dropped, whatever its class;
    R (2,2)-(8,4) class 11 -> rows 2-3, cols 2-7, mean depth 0.35, behind P and Q (0.6).
    P stays in front of the later Q that contains it; R, though painted last, loses the
    pixels it shares with P and Q."""
    depth = torch.full((6, 10), 0.6)
    depth[:, 5:] = 0.1
    boxes = torch.tensor([[1, 1, 3, 3], [0, 0, 4.9, 5], [0.2, 0.7, 4.5, 5.9], [2, 2, 8, 4]])
    final, classes = detection.get_mask_labels(depth, boxes, torch.tensor([5, 7, 9, 11]))
    N = 255
    want = [
        [1, 1, 1, 1, N, N, N, N, N, N],
        [1, 0, 0, 1, N, N, N, N, N, N],
        [1, 0, 0, 1, 2, 2, 2, 2, N, N],
        [1, 1, 1, 1, 2, 2, 2, 2, N, N],
        [1, 1, 1, 1, N, N, N, N, N, N],
        [N] * 10,
    ]
    assert final.tolist() == want and classes == {0: 5, 1: 7, 2: 11}
    label = detection.instance_label(final, classes, (20, 12))  # NEAREST x2
    assert np.array_equal(label.ids, np.repeat(np.repeat(np.array(want, np.uint8), 2, 0), 2, 1))


def test_only_a_rectangle_iou_above_095_is_a_duplicate():
    """On a 1x40 map: B covers 39 of A's 40 pixels (IoU 0.975): dropped; C covers 38
    (IoU exactly 0.95): kept, and in front of A, which contains it."""
    boxes = torch.tensor([[0, 0, 40, 1], [0, 0, 39, 1], [0, 0, 38.9, 1.5]])
    final, classes = detection.get_mask_labels(torch.zeros(1, 40), boxes, torch.tensor([1, 2, 3]))
    assert classes == {0: 1, 1: 3} and final[0].tolist() == [1] * 38 + [0, 0]


def test_ids_from_255_on_vanish_from_the_map_but_keep_their_class():
    boxes = torch.tensor([[i, 0, i + 1, 1] for i in range(300)], dtype=torch.float32)
    final, classes = detection.get_mask_labels(torch.zeros(1, 300), boxes, torch.arange(300) % 7)
    label = detection.instance_label(final, classes, (300, 1))
    assert label.ids[0, :255].tolist() == list(range(255)) and set(label.ids[0, 255:].tolist()) == {255}
    assert len(classes) == 300 and classes[299] == 299 % 7


def test_no_detections_give_an_empty_label(tmp_path):
    Image.new("L", (101, 67), 128).save(tmp_path / "depth.png")
    none = Detections(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.long), (318, 480))
    label = Generator("obj_detection").to_label(none, (101, 67), depth=tmp_path / "depth.png")
    assert label.classes == {} and label.ids.shape == (67, 101) and (label.ids == 255).all()
    empty = detection.fast_rcnn_inference(torch.zeros((5, 4)), torch.full((5, 723), 0.4), (318, 480))
    assert len(empty.boxes_N4) == len(empty.classes_N) == 0


# ---- preprocessing and the driver's steps --------------------------------------------------


@pytest.mark.parametrize(
    ("size", "want_hw"),
    [((640, 480), (360, 480)), ((101, 67), (318, 480)), ((480, 479), (479, 480)), ((1000, 1001), (479, 479))],
)
def test_images_resize_to_short_side_479_and_long_side_at_most_480(size, want_hw):
    x = Generator("obj_detection").preprocess(Image.new("RGB", size))
    assert tuple(x.shape) == (3, *want_hw)


def test_input_is_bgr_0_to_255_normalised_with_rgb_statistics_by_channel_index():
    x = Generator("obj_detection").preprocess(Image.new("RGB", (50, 40), (255, 0, 128)))
    want = [(128 - 123.68) / 58.393, (0 - 116.779) / 57.12, (255 - 103.939) / 57.375]  # B, G, R
    assert torch.allclose(x.mean((1, 2)), torch.tensor(want), atol=1e-5)
    assert torch.allclose(x.std((1, 2)), torch.zeros(3), atol=1e-5)


TINY = Sizes(blocks=(1, 1, 1, 1), stem_width=8, width=8, channels=16, fc_dim=32)


def test_an_odd_sized_image_with_its_depth_label_goes_through_the_driver_steps(tmp_path):
    with torch.device("meta"):
        template = detection.UniDet(TINY).state_dict()
    template = {k: torch.zeros((), dtype=torch.long) if "num_batches" in k else v for k, v in template.items()}
    weights = synthetic_weights(template)
    for k in range(3):  # three classes score above 0.5 (random logits hug the bias), as real images give few
        bias = weights[f"roi_heads.box_predictor.{k}.cls_score.bias"]
        bias.fill_(-1)[[3, 160, 700]] = 0.5
    model, generator = detection.build(weights, "tiny", TINY), Generator("obj_detection")
    assert generator.uses_labels == ("depth",)
    rgb = np.stack([*np.meshgrid(np.linspace(0, 255, 101), np.linspace(0, 255, 67)), np.full((67, 101), 60.0)], -1)
    Image.fromarray(rgb.astype(np.uint8)).save(tmp_path / "photo.jpg")
    depth = (np.linspace(0, 255, 101)[None] * np.ones((67, 1))).astype(np.uint8)  # nearer to the right
    Image.fromarray(depth).save(tmp_path / "photo.png")
    with Image.open(tmp_path / "photo.jpg") as img:
        x = generator.preprocess(img.convert("RGB"))
    assert x.shape == (3, 318, 480)
    with torch.no_grad():
        (raw,) = generator.predict(model, x[None])
        (by_hand,) = model(torch.cat([x, torch.zeros(3, 2, 480)], 1)[None], (318, 480))  # zeros below
    assert raw.image_hw == (318, 480) and len(raw.boxes_N4) > 10 and set(raw.classes_N.tolist()) <= {3, 160, 700}
    assert torch.equal(raw.boxes_N4, by_hand.boxes_N4) and torch.equal(raw.classes_N, by_hand.classes_N)
    assert raw.boxes_N4[:, 2].max() <= 480 and raw.boxes_N4[:, 3].max() <= 318 and raw.scores_N.min() > 0.5
    label = generator.to_label(raw, (101, 67), depth=tmp_path / "photo.png")
    assert label.ids.dtype == np.uint8 and label.ids.shape == (67, 101)
    assert len(np.unique(label.ids)) > 2
    # the depth label, resized as the image was (PIL bilinear to 480x318), orders the boxes
    resized = Image.open(tmp_path / "photo.png").resize((480, 318), Image.Resampling.BILINEAR)
    final, classes = detection.get_mask_labels(
        torch.tensor(np.array(resized)).float() / 255, raw.boxes_N4, raw.classes_N
    )
    assert np.array_equal(
        label.ids, np.asarray(Image.fromarray(final.numpy()).convert("L").resize((101, 67), Image.Resampling.NEAREST))
    )
    assert label.classes == classes
    InstanceMap().write(tmp_path / "out" / "photo.png", label)
    assert (tmp_path / "out" / "photo.json").is_file()
