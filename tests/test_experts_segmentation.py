"""The segmentation experts (Mask2Former Swin-L, seg_coco and seg_ade) compute what the
official networks compute (tests/fixtures/experts, slimmed by slim_segmentation.py).

The full-size synthetic weights (~215M parameters, ~0.9 GB) are built once for the module
(~4 s); each Swin-L load takes ~3 s and each forward ~5 s: the file takes ~50 CPU-seconds,
peak memory ~4.6 GB."""

import json
import os
import pickle
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common.files import CheckpointError
from common.hub import DownloadError
from experts import segmentation
from experts.segmentation import Generator, Prediction
from tests.conftest import FIXTURES, synthetic_weights

EXPERTS = FIXTURES / "experts"
PARITY = EXPERTS / "parity_segmentation.safetensors"
NUM_CLASSES = {"seg_coco": 133, "seg_ade": 150}
IMAGE_HW, PADDED_HW, OUTPUT_HW = (88, 120), (96, 128), (66, 90)  # the reference case (NOTES section 5)
SURE = 1e-4  # labels are compared where the best class leads the second by more


@pytest.fixture(scope="module")
def ref():
    with safe_open(PARITY, "pt") as f:
        strides = {k.removeprefix("stride."): int(v) for k, v in f.metadata().items() if k.startswith("stride.")}
    return load_file(PARITY), strides


def compare(ref, name: str, ours: torch.Tensor, atol: float):
    """Our tensor against the stored one (stored subsampled as flatten()[::stride] if big)."""
    tensors, strides = ref
    ours = ours.flatten()[:: strides[name]] if name in strides else ours
    want = tensors[name]
    assert ours.shape == want.shape, name
    diff = (ours - want).abs().max().item()
    assert diff <= atol, f"{name}: max |diff| {diff:.2e} > {atol:.0e}"
    return diff


def layout(expert: str) -> dict[str, list[int]]:
    return json.loads((EXPERTS / f"layout_{expert}.json").read_text())


def official_template(expert: str, only=None) -> dict[str, torch.Tensor]:
    """The official state dict's keys and shapes (meta tensors, no memory); the int64
    relative_position_index buffers (recorded as [] in the layout) as real (144, 144)
    tensors, as in the file. Keys not in `only` become int so synthetic_weights skips them."""
    out = {}
    for key, shape in layout(expert).items():
        if key.endswith("relative_position_index") or (only is not None and key not in only):
            out[key] = torch.zeros(144, 144, dtype=torch.int64)
        else:
            out[key] = torch.empty(shape, device="meta")
    return out


@pytest.fixture(scope="module")
def official():
    """Synthetic official weights for both experts: they differ only in the class head
    and criterion.empty_weight, whose draws (same key indices) are all that is made twice."""
    start = time.time()
    coco = synthetic_weights(official_template("seg_coco"))
    coco_layout = layout("seg_coco")
    differ = {k for k, shape in layout("seg_ade").items() if coco_layout[k] != shape}
    assert len(differ) == 3
    ade = coco | {k: v for k, v in synthetic_weights(official_template("seg_ade", only=differ)).items() if k in differ}
    print(f"synthetic weights: {time.time() - start:.1f} s")
    return {"seg_coco": coco, "seg_ade": ade}


def write_pickle(path, state: dict[str, torch.Tensor], protocol: int = 4):
    """The detectron2 model-zoo format: {'model': name -> numpy array, '__author__': ...}."""
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "Mask2Former"}, f, protocol)


def write_official(path, state: dict[str, torch.Tensor]):
    """The official weights as a pickle (.pkl) or a safetensors file with the same keys."""
    if path.suffix == ".pkl":
        write_pickle(path, state)
    else:
        save_file(state, path)


@pytest.fixture(scope="module", params=["seg_coco", "seg_ade"])
def loaded(request, official, tmp_path_factory):
    """(expert, network): seg_coco from the official pickle; seg_ade from a safetensors
    file with the official keys, saved as a Hugging Face directory and loaded from there
    (the same weights; the parity tests check the rest), so both paths are checked."""
    expert, state = request.param, official[request.param]
    tmp = tmp_path_factory.mktemp(expert)
    path = tmp / (segmentation.VARIANTS[expert].official_file if expert == "seg_coco" else "official.safetensors")
    write_official(path, state)
    start = time.time()
    model = Generator(expert).load(path)
    print(f"{expert}: loaded {path.name} in {time.time() - start:.1f} s")
    path.unlink()
    if expert == "seg_ade":
        model.save_pretrained(tmp / "hf")
        reloaded = Generator(expert).load(tmp / "hf")
        mine = model.state_dict()
        assert reloaded.state_dict().keys() == mine.keys()
        assert all(torch.equal(v, mine[k]) for k, v in reloaded.state_dict().items())
        model = reloaded
    return expert, model


# ---- renaming the official keys ------------------------------------------------------------


@pytest.mark.parametrize("expert", ["seg_coco", "seg_ade"])
def test_renaming_consumes_every_official_key_and_sets_every_network_key(expert):
    from transformers import Mask2FormerForUniversalSegmentation

    renamed = segmentation.rename_official(official_template(expert), "layout")
    with torch.device("meta"):
        model = Mask2FormerForUniversalSegmentation(segmentation.mask2former_config(NUM_CLASSES[expert]))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in segmentation.UNSET}
    assert {k: tuple(v.shape) for k, v in renamed.items()} == want
    assert set(segmentation.UNSET) <= set(model.state_dict())
    # 650 official keys: 24 relative_position_index dropped; 24 blocks' qkv and 9 layers' in_proj
    # (weight and bias each) split in three
    assert len(layout(expert)) == 650 and len(renamed) == 650 - 24 + 2 * (2 * 24 + 2 * 9)


def test_attention_projections_split_in_row_thirds_and_cross_attention_stays_whole():
    rows = torch.arange(12.0).view(6, 2)
    renamed = segmentation.rename_official(
        {
            "backbone.layers.2.blocks.17.attn.qkv.weight": rows,
            "sem_seg_head.predictor.transformer_self_attention_layers.8.self_attn.in_proj_bias": torch.arange(6.0),
            "sem_seg_head.predictor.transformer_cross_attention_layers.0.multihead_attn.in_proj_weight": rows,
            "backbone.norm3.bias": torch.zeros(2),
        },
        "hand-made",
    )
    swin = "model.pixel_level_module.encoder.swin.encoder.layers.2.blocks.17.attention."
    assert renamed[swin + "q_proj.weight"].tolist() == [[0, 1], [2, 3]]
    assert renamed[swin + "k_proj.weight"].tolist() == [[4, 5], [6, 7]]
    assert renamed[swin + "v_proj.weight"].tolist() == [[8, 9], [10, 11]]
    self_attn = "model.transformer_module.decoder.layers.8.self_attn."
    assert [renamed[self_attn + f"{p}_proj.bias"].tolist() for p in "qkv"] == [[0, 1], [2, 3], [4, 5]]
    assert torch.equal(renamed["model.transformer_module.decoder.layers.0.cross_attn.in_proj_weight"], rows)
    assert "model.pixel_level_module.encoder.hidden_states_norms.stage4.bias" in renamed


def test_a_key_the_table_does_not_know_is_refused_by_name():
    with pytest.raises(CheckpointError, match=r"weights.pkl: key 'backbone.layers.0.blocks.0.attn.scale'"):
        segmentation.rename_official({"backbone.layers.0.blocks.0.attn.scale": torch.zeros(1)}, "weights.pkl")


# ---- reading the official pickle without running code -------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_the_pickle_reader_returns_the_arrays(tmp_path, protocol):
    state = {"a.weight": torch.randn(3, 4), "b.index": torch.arange(6).view(2, 3), "c.bias": torch.randn(5).double()}
    write_pickle(tmp_path / "w.pkl", state, protocol)
    read = segmentation.read_official_pickle(tmp_path / "w.pkl")
    assert read.keys() == state.keys()
    assert all(torch.equal(read[k], v) for k, v in state.items())


class RunsCode:
    """What a malicious pickle holds: unpickling it would call os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model_final_f07440.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"a": np.zeros(2, np.float32), "b": RunsCode(marker)}, "__author__": "x"}, f, protocol=2)
    with pytest.raises(CheckpointError) as err:
        Generator("seg_coco").load(path)
    message = str(err.value)
    assert str(path) in message and "posix.system" in message and ".safetensors" in message
    assert "\n" not in message
    assert not marker.exists()
    # the check is real: an ordinary unpickler runs the command
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_pickles_that_are_not_detectron2_weight_files_are_refused(tmp_path):
    cases = {
        "blobs.pkl": {"blobs": {"a": np.zeros(2, np.float32)}},
        "objects.pkl": {"model": {"a": np.array([1, "x"], dtype=object)}},
        "truncated.pkl": None,
    }
    for name, obj in cases.items():
        path = tmp_path / name
        data = pickle.dumps(obj if obj is not None else {"model": {"a": np.zeros(100)}}, protocol=4)
        path.write_bytes(data if obj is not None else data[:50])
        with pytest.raises(CheckpointError, match=name):
            segmentation.read_official_pickle(path)


# ---- the network against the official one --------------------------------------------------


@torch.no_grad()
def test_every_stage_matches_the_official_network(loaded, ref):
    expert, model = loaded
    start = time.time()
    out = model(pixel_values=ref[0]["input"], output_hidden_states=True, output_auxiliary_logits=True)
    print(f"{expert}: forward at 96x128 in {time.time() - start:.1f} s")
    diffs = {}
    for i, feature in enumerate(out.encoder_hidden_states):
        diffs[f"res{i + 2}"] = compare(ref, f"backbone.res{i + 2}", feature, 1e-4)
    diffs["mask_features"] = compare(ref, "pixel_decoder.mask_features", out.pixel_decoder_last_hidden_state, 1e-4)
    for i, feature in enumerate(out.pixel_decoder_hidden_states):
        diffs[f"scale{i}"] = compare(ref, f"pixel_decoder.multi_scale_features.{i}", feature, 1e-4)
    diffs["pred_masks"] = compare(ref, "pred_masks", out.masks_queries_logits, 2e-4)
    diffs["pred_logits"] = compare(ref, f"{expert}.pred_logits", out.class_queries_logits, 1e-4)
    assert len(out.auxiliary_logits) == 9  # the initial prediction and layers 1..8
    for i in (0, 4):
        diffs[f"aux{i}"] = compare(
            ref, f"{expert}.aux.{i}.pred_logits", out.auxiliary_logits[i]["class_queries_logits"], 1e-4
        )

    raw = Prediction(out.class_queries_logits[0], out.masks_queries_logits[0], PADDED_HW, IMAGE_HW)
    diffs["sem_seg"] = compare(ref, f"{expert}.sem_seg", segmentation.sem_seg(raw, OUTPUT_HW)[None], 2e-4)
    labels = Generator(expert).to_label(raw, OUTPUT_HW[::-1])
    sure = ref[0][f"{expert}.label_gap"].float() > SURE
    assert sure.float().mean() > 0.99
    assert labels.dtype == np.uint8 and labels.shape == OUTPUT_HW
    assert torch.equal(torch.from_numpy(labels)[sure], ref[0][f"{expert}.label_map"][sure])
    print(expert, {k: f"{v:.1e}" for k, v in diffs.items()})


@pytest.mark.parametrize("expert", ["seg_coco", "seg_ade"])
def test_the_other_file_form_loads_strictly_too(expert, official, tmp_path):
    """seg_coco from safetensors, seg_ade from the pickle (the parity tests load the other forms)."""
    state = official[expert]
    path = tmp_path / (segmentation.VARIANTS[expert].official_file if expert == "seg_ade" else "official.safetensors")
    write_official(path, state)
    loaded = Generator(expert).load(path).state_dict()
    qkv = state["backbone.layers.2.blocks.17.attn.qkv.weight"]
    swin = "model.pixel_level_module.encoder.swin.encoder.layers.2.blocks.17.attention."
    assert torch.equal(loaded[swin + "k_proj.weight"], qkv[768:1536])
    assert torch.equal(loaded["class_predictor.bias"], state["sem_seg_head.predictor.class_embed.bias"])
    assert loaded["class_predictor.bias"].shape == (NUM_CLASSES[expert] + 1,)


# ---- the official post-processing ----------------------------------------------------------


@pytest.mark.parametrize("expert", ["seg_coco", "seg_ade"])
def test_labels_follow_the_official_post_processing(expert, ref):
    """NOTES: 3*randn (seed 11) logits and 4*randn (seed 12) masks, padded 96x128 around 88x120, out 66x90."""
    num_classes = NUM_CLASSES[expert]
    logits = 3 * torch.randn((1, 50, num_classes + 1), generator=torch.Generator().manual_seed(11))
    masks = 4 * torch.randn((1, 50, 24, 32), generator=torch.Generator().manual_seed(12))
    labels = Generator(expert).to_label(Prediction(logits[0], masks[0], PADDED_HW, IMAGE_HW), OUTPUT_HW[::-1])
    want = ref[0][f"{expert}.postproc.label_map"]
    sure = ref[0][f"{expert}.postproc.top2_gap"] > SURE
    assert sure.float().mean() > 0.99 and len(want.unique()) > 10
    assert torch.equal(torch.from_numpy(labels)[sure], want[sure])


def test_the_argmax_in_class_chunks_equals_the_argmax_of_the_whole_stack():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand((7, 9, 13), generator=g)
    scores[4] = scores[3]  # a tie across a chunk border goes to the first class
    scores[6] = scores[5]  # and within a chunk
    out_hw = (31, 17)
    whole = F.interpolate(scores[None], size=out_hw, mode="bilinear", align_corners=False)[0].argmax(0)
    assert (whole == 3).any() and not (whole == 4).any()
    for classes_per_chunk in (1, 2, 3, 7):
        chunked = segmentation.resized_argmax(scores, out_hw, classes_per_chunk * 31 * 17 * 4)
        assert chunked.dtype == torch.uint8
        assert torch.equal(chunked.long(), whole), classes_per_chunk


# ---- preprocessing and the driver's steps --------------------------------------------------


@pytest.mark.parametrize(
    ("size", "want_hw"),
    [((640, 480), (360, 480)), ((101, 67), (318, 480)), ((480, 479), (479, 480)), ((1000, 1001), (479, 479))],
)
def test_images_resize_to_short_side_479_and_long_side_at_most_480(size, want_hw):
    # 640x480: short 479, long int(479*640/480) = 638 > 480, so long 480, short int(480*479/638) = 360
    x = Generator("seg_coco").preprocess(Image.new("RGB", size))
    assert tuple(x.shape) == (3, *want_hw)


def test_input_is_bgr_0_to_255_normalised_with_rgb_statistics_by_channel_index():
    x = Generator("seg_ade").preprocess(Image.new("RGB", (50, 40), (255, 0, 128)))
    want = [(128 - 123.675) / 58.395, (0 - 116.28) / 57.12, (255 - 103.53) / 57.375]  # B, G, R
    assert torch.allclose(x.mean((1, 2)), torch.tensor(want), atol=1e-5)
    assert torch.allclose(x.std((1, 2)), torch.zeros(3), atol=1e-5)


def tiny_model(num_labels: int = 5):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    swin = SwinConfig(
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=swin,
        num_labels=num_labels,
        num_queries=6,
        decoder_layers=4,
        encoder_layers=1,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        num_attention_heads=4,
        encoder_feedforward_dim=32,
        dim_feedforward=32,
    )
    torch.manual_seed(0)
    return Mask2FormerForUniversalSegmentation(config).eval()


@torch.no_grad()
def test_an_odd_sized_image_goes_through_the_driver_steps_to_a_label_at_its_size():
    model, generator = tiny_model(), Generator("seg_coco")
    rgb = np.stack([*np.meshgrid(np.linspace(0, 255, 101), np.linspace(0, 255, 67)), np.full((67, 101), 60.0)], -1)
    x = generator.preprocess(Image.fromarray(rgb.astype(np.uint8)))
    assert x.shape == (3, 318, 480)
    (raw,) = generator.predict(model, x[None])
    assert raw.padded_hw == (320, 480) and raw.valid_hw == (318, 480) and raw.masks_Qhw.shape == (6, 80, 120)
    by_hand = model(pixel_values=torch.cat([x, torch.zeros(3, 2, 480)], 1)[None])  # zeros below
    assert torch.equal(raw.masks_Qhw, by_hand.masks_queries_logits[0])
    labels = generator.to_label(raw, (101, 67))
    assert labels.dtype == np.uint8 and labels.shape == (67, 101) and labels.max() < 5


def test_a_hugging_face_directory_with_other_classes_is_refused(tmp_path):
    tiny_model(num_labels=5).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="has 5 classes, expected 150"):
        Generator("seg_ade").load(tmp_path)


def test_weights_that_are_not_there_fail_fast(monkeypatch, tmp_path):
    for missing in (tmp_path / "model_final_f07440.pkl", "weights/model_final_f07440.pkl"):
        with pytest.raises(FileNotFoundError, match="model_final_f07440.pkl does not exist"):
            Generator("seg_coco").load(missing)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    start = time.time()
    with pytest.raises(DownloadError, match="facebook/mask2former-swin-large-ade-panoptic"):
        Generator("seg_ade").load()  # the default: this expert's Hugging Face conversion
    assert time.time() - start < 10


def test_only_the_two_mask2former_experts_have_this_generator():
    assert {name: Generator(name).variant.num_labels for name in NUM_CLASSES} == NUM_CLASSES
    with pytest.raises(ValueError, match="edge"):
        Generator("edge")
