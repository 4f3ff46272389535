"""Pretrained parts (CLIP, RoBERTa) and official checkpoints load into our layout and compute the same."""

import pickle

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, RobertaConfig, RobertaForMaskedLM

from common.hub import DownloadError
from common.weights import read_state_dict
from model import PrismerCaption
from tests.conftest import random_experts, tiny_size

WIDTH, RES = 64, 64


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_hidden_layers=2,
        num_attention_heads=1,
        image_size=RES,
        patch_size=16,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    clip = CLIPVisionModel(cfg).eval()
    folder = tmp_path_factory.mktemp("clip")
    clip.save_pretrained(folder)
    return folder, clip


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(1)
    cfg = RobertaConfig(
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=66,
        type_vocab_size=1,
    )
    roberta = RobertaForMaskedLM(cfg).eval()
    folder = tmp_path_factory.mktemp("roberta")
    roberta.save_pretrained(folder)
    return folder, roberta


def pretrained_model(clip_dir, roberta_dir, tokenizer, experts=()):
    return PrismerCaption(
        {
            "prismer_model": tiny_size(len(tokenizer), WIDTH),
            "experts": list(experts),
            "image_resolution": RES,
            "clip": str(clip_dir[0]),
            "roberta": str(roberta_dir[0]),
        },
        tokenizer=tokenizer,
    ).eval()


@torch.no_grad()
def test_rgb_encoder_with_identity_adaptors_computes_clip_hidden_states(clip_dir, roberta_dir, tokenizer):
    model = pretrained_model(clip_dir, roberta_dir, tokenizer)
    for _, adaptor in model.expert_encoder.transformer.resblocks:
        adaptor.adaptor.up_proj.weight.zero_()
        adaptor.adaptor.up_proj.bias.zero_()
    clip = clip_dir[1]
    x = torch.randn(2, 3, RES, RES)
    # CLIP's tower without its class token (Prismer drops it), layer for layer.
    patches = clip.embeddings.patch_embedding(x).flatten(2).transpose(1, 2)
    h = clip.pre_layrnorm(patches + clip.embeddings.position_embedding.weight[1:])
    expected = clip.post_layernorm(clip.encoder(inputs_embeds=h).last_hidden_state)
    torch.testing.assert_close(model.expert_encoder({"rgb": x}), expected, rtol=1e-5, atol=1e-5)


def test_openai_and_hf_clip_formats_load_the_same_weights(clip_dir, roberta_dir, tokenizer, tmp_path):
    hf = read_state_dict(clip_dir[0] / "model.safetensors")
    renames = {
        "embeddings.patch_embedding.weight": "conv1.weight",
        "pre_layrnorm": "ln_pre",
        "post_layernorm": "ln_post",
        "embeddings.position_embedding.weight": "positional_embedding",
        "embeddings.class_embedding": "class_embedding",
    }
    openai = {"visual.proj": torch.randn(WIDTH, 32), "logit_scale": torch.tensor(1.0)}
    for k, v in hf.items():
        if "position_ids" in k:
            continue
        for a, b in renames.items():
            k = k.replace(a, b)
        k = (
            k.replace("encoder.layers.", "transformer.resblocks.")
            .replace("self_attn.out_proj", "attn.out_proj")
            .replace("layer_norm1", "ln_1")
            .replace("layer_norm2", "ln_2")
            .replace("mlp.fc1", "mlp.c_fc")
            .replace("mlp.fc2", "mlp.c_proj")
        )
        openai["visual." + k] = v
    for i in range(2):
        for p in ("weight", "bias"):
            parts = [openai.pop(f"visual.transformer.resblocks.{i}.self_attn.{q}_proj.{p}") for q in "qkv"]
            openai[f"visual.transformer.resblocks.{i}.attn.in_proj_{p}"] = torch.cat(parts)
    torch.save(openai, tmp_path / "open_clip_pytorch_model.bin")
    a = pretrained_model(clip_dir, roberta_dir, tokenizer)
    b = pretrained_model((tmp_path / "open_clip_pytorch_model.bin",), roberta_dir, tokenizer)
    for name in (
        "conv1.rgb.weight",
        "positional_embedding",
        "transformer.resblocks.1.0.attn.in_proj_weight",
        "transformer.resblocks.0.0.mlp.c_proj.bias",
        "ln_post.weight",
    ):
        assert torch.equal(a.expert_encoder.state_dict()[name], b.expert_encoder.state_dict()[name]), name


@torch.no_grad()
def test_decoder_roberta_path_computes_roberta_layers(clip_dir, roberta_dir, tokenizer):
    model = pretrained_model(clip_dir, roberta_dir, tokenizer)
    roberta = roberta_dir[1]
    ids = tokenizer(["a red cube on the floor", "two blue spheres"], padding="longest", return_tensors="pt").input_ids
    out = roberta(ids, output_hidden_states=True)
    hidden = out.hidden_states
    ours = model.text_decoder
    from model.decoder import position_ids_from_input_ids

    torch.testing.assert_close(ours.roberta.embeddings(ids, position_ids_from_input_ids(ids, 1)), hidden[0])
    for i, (layer, _cross, _adaptor) in enumerate(ours.roberta.encoder.layer):
        # Bidirectional here (no mask), as RobertaForMaskedLM computes.
        y = layer.feed_forward(layer.attend(hidden[i], None, None, i))
        torch.testing.assert_close(y, hidden[i + 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.lm_head(hidden[-1]), out.logits, rtol=1e-5, atol=1e-5)


def test_pretrained_parts_leave_new_parts_initialised(clip_dir, roberta_dir, tokenizer):
    model = pretrained_model(clip_dir, roberta_dir, tokenizer, experts=["depth", "obj_detection"])
    assert model.expert_encoder.conv1["depth"][1].weight.abs().sum() > 0
    assert model.expert_encoder.resampler.latents.abs().sum() > 0
    assert model.text_decoder.roberta.encoder.layer[0][1].self.key.weight.shape == (WIDTH, WIDTH)


def test_unknown_clip_key_is_named(clip_dir, roberta_dir, tokenizer, tmp_path):
    state = read_state_dict(clip_dir[0] / "model.safetensors")
    state["vision_model.encoder.layers.0.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="encoder.layers.0.extra.weight"):
        pretrained_model((tmp_path,), roberta_dir, tokenizer)


def test_clip_of_another_width_is_a_shape_error(roberta_dir, tokenizer, tmp_path):
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, image_size=RES, patch_size=16
    )
    CLIPVisionModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"wrong shapes: conv1.rgb.weight"):
        pretrained_model((tmp_path,), roberta_dir, tokenizer)


# ------------------------------------------------------------- official checkpoints


def tiny(tokenizer, experts=("depth", "seg_coco", "obj_detection"), resolution=RES, seed=0):
    torch.manual_seed(seed)
    return PrismerCaption(
        {
            "prismer_model": tiny_size(len(tokenizer), WIDTH),
            "experts": list(experts),
            "image_resolution": resolution,
            "pretrained": False,
        },
        tokenizer=tokenizer,
    ).eval()


@torch.no_grad()
def test_official_export_round_trip_gives_identical_outputs(tokenizer, tmp_path):
    a, b = tiny(tokenizer, seed=0), tiny(tokenizer, seed=1)
    path = a.export_official(tmp_path)
    assert path.name == "pytorch_model.bin"
    assert set(torch.load(path, weights_only=True)) == set(a.state_dict())
    b.load_official(path)
    x = random_experts(a.config.experts, 2, RES)
    torch.manual_seed(5)
    ha = a.expert_encoder(x)
    torch.manual_seed(5)
    assert torch.equal(ha, b.expert_encoder(x))


def test_official_checkpoint_with_ddp_prefix_and_missing_buffers_loads(tokenizer, tmp_path):
    a = tiny(tokenizer)
    state = {"module." + k: v for k, v in a.state_dict().items() if not k.endswith("position_ids")}
    torch.save(state, tmp_path / "pytorch_model.bin")
    b = tiny(tokenizer, seed=3)
    b.load_official(tmp_path)
    assert torch.equal(b.text_decoder.lm_head.decoder.weight, a.text_decoder.lm_head.decoder.weight)


def test_positional_embedding_is_resized_to_the_new_resolution(tokenizer, tmp_path):
    from model.layers import resize_pos_embed

    low = tiny(tokenizer, resolution=64)
    low.export_official(tmp_path)
    high = tiny(tokenizer, resolution=128)
    high.load_official(tmp_path / "pytorch_model.bin")
    assert high.expert_encoder.positional_embedding.shape == (64, WIDTH)
    torch.testing.assert_close(
        high.expert_encoder.positional_embedding, resize_pos_embed(low.expert_encoder.positional_embedding.detach(), 64)
    )
    high.expert_encoder(random_experts(high.config.experts, 1, 128))


def test_prismerz_checkpoint_into_prismer_config_lists_both_expert_sets(tokenizer, tmp_path):
    tiny(tokenizer, experts=()).export_official(tmp_path)
    with pytest.raises(ValueError, match=r"trained with experts \['none \(PrismerZ\)'\].*\['depth', 'obj_detection'"):
        tiny(tokenizer).load_official(tmp_path)


def test_missing_key_and_wrong_shape_are_named(tokenizer, tmp_path):
    state = tiny(tokenizer).state_dict()
    del state["text_decoder.roberta.encoder.layer.1.2.adaptor_ln.bias"]
    state["expert_encoder.ln_pre.weight"] = torch.ones(3)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError) as err:
        tiny(tokenizer).load_official(tmp_path)
    assert "layer.1.2.adaptor_ln.bias" in str(err.value)
    assert "expert_encoder.ln_pre.weight: checkpoint (3,) vs model (64,)" in str(err.value)


class NotATensor:
    pass


def test_checkpoint_with_pickled_objects_is_refused(tokenizer, tmp_path):
    path = tmp_path / "pytorch_model.bin"
    with open(path, "wb") as f:
        pickle.dump({"weights": NotATensor()}, f)
    with pytest.raises(ValueError, match="not a weights-only torch checkpoint"):
        tiny(tokenizer).load_official(path)


def test_from_official_derives_config_and_resolution(tokenizer, tmp_path):
    src = tiny(tokenizer, experts=(), resolution=96)
    src.export_official(tmp_path)
    model = PrismerCaption.from_official(
        "caption_prismerz_base", path=tmp_path, tokenizer=tokenizer, prismer_model=tiny_size(len(tokenizer), WIDTH)
    )
    assert model.config.image_resolution == 96 and model.config.experts == []
    assert torch.equal(model.expert_encoder.positional_embedding, src.expert_encoder.positional_embedding)


def test_own_checkpoint_loads_without_yaml(tokenizer, tmp_path):
    a = tiny(tokenizer)
    a.save_pretrained(tmp_path / "ckpt")
    b = PrismerCaption.from_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)
    assert b.config.experts == a.config.experts
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    # Tied LM-head bias stays tied after loading.
    assert b.text_decoder.lm_head.decoder.bias is b.text_decoder.lm_head.bias


def test_download_offline_fails_fast_with_instructions(tokenizer, monkeypatch):
    import time

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as err:
        tiny(tokenizer).load_official("caption_prismer_base")
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert "caption_prismer_base/pytorch_model.bin" in msg and "shikunl/prismer" in msg and "local path" in msg


def test_hf_clipmodel_format_of_the_hub_ids_loads(roberta_dir, tokenizer, tmp_path):
    """openai/clip-vit-* on the hub are whole CLIPModels: vision_model.* beside text_model.*."""
    from transformers import CLIPConfig, CLIPModel

    vision = {
        "hidden_size": WIDTH,
        "intermediate_size": 4 * WIDTH,
        "num_hidden_layers": 2,
        "num_attention_heads": 1,
        "image_size": RES,
        "patch_size": 16,
    }
    text = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 100,
        "max_position_embeddings": 16,
    }
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    clip.save_pretrained(tmp_path)
    model = pretrained_model((tmp_path,), roberta_dir, tokenizer)
    assert torch.equal(model.expert_encoder.conv1["rgb"].weight, clip.vision_model.embeddings.patch_embedding.weight)
    assert torch.equal(model.expert_encoder.ln_post.bias, clip.vision_model.post_layernorm.bias)


# ------------------------------------------------- Prismer-Large's 480 px grid


def large_shaped(tokenizer, resolution, experts=("depth", "obj_detection"), seed=0):
    """A tiny model with Large's 14 px patches."""
    size = tiny_size(len(tokenizer), WIDTH)
    size["vision"]["patch_size"] = 14
    torch.manual_seed(seed)
    return PrismerCaption(
        {"prismer_model": size, "experts": list(experts), "image_resolution": resolution, "pretrained": False},
        tokenizer=tokenizer,
    ).eval()


@torch.no_grad()
def test_480_px_on_14_px_patches_drops_the_last_4_px_as_the_official_conv_does(tokenizer):
    model = large_shaped(tokenizer, 480)
    assert model.expert_encoder.positional_embedding.shape == (34 * 34, WIDTH)  # floor(480 / 14) = 34 per side
    x = random_experts(model.config.experts, 2, 480)

    def encode(m, rgb):
        torch.manual_seed(7)  # the instance-embedding rows are drawn per forward pass
        return m.expert_encoder(x | {"rgb": rgb})

    out = encode(model, x["rgb"])
    assert out.shape[1] == 34 * 34 + 64
    edge = x["rgb"].clone()
    edge[:, :, 476:, :] = 5.0  # the last 4 rows and columns, 34 * 14 = 476 onwards
    edge[:, :, :, 476:] = -5.0
    assert torch.equal(encode(model, edge), out)
    inside = x["rgb"].clone()
    inside[:, :, 475, 475] += 1.0  # the last pixel the 34th patch covers
    assert not torch.equal(encode(model, inside), out)
    # the same weights at 476 px fed the 476 px crop: what the stride-14 conv sees
    cropped = large_shaped(tokenizer, 476)
    cropped.load_state_dict(model.state_dict())
    assert torch.equal(encode(cropped, x["rgb"][:, :, :476, :476]), out)


def test_official_large_checkpoint_loads_at_the_recipes_480_px(tokenizer, tmp_path):
    size = tiny_size(len(tokenizer), WIDTH)
    size["vision"]["patch_size"] = 14
    for exported_at in (480, 476):  # a 34 x 34 grid either way
        src = large_shaped(tokenizer, exported_at, experts=())
        src.export_official(tmp_path / str(exported_at))
        model = PrismerCaption.from_official(
            "caption_prismerz_large", path=tmp_path / str(exported_at), tokenizer=tokenizer, prismer_model=size
        )
        assert model.config.image_resolution == 480  # the official fine-tuning recipe's, not 34 * 14
        for k, v in src.state_dict().items():
            assert torch.equal(v, model.state_dict()[k]), k  # the grid is loaded as is, not resized
    pretrain = large_shaped(tokenizer, 224, experts=())
    pretrain.export_official(tmp_path / "224")
    model = PrismerCaption.from_official(
        "pretrain_prismerz_large", path=tmp_path / "224", tokenizer=tokenizer, prismer_model=size
    )
    assert model.config.image_resolution == 224 and model.expert_encoder.positional_embedding.shape[0] == 16 * 16
