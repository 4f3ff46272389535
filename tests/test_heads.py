"""Task heads: caption/VQA losses, generation (cached == uncached), answer ranking, freezing."""

import pytest
import torch

from model import PrismerCaption, PrismerVQA
from model.generation import answer_scores, answer_tokens, question_answer_tokens, question_tokens
from tests.conftest import random_experts, tiny_size

EXPERTS = ["depth", "normal", "seg_coco", "edge", "obj_detection", "ocr_detection"]
RES = 64


def build(cls, tokenizer, experts=EXPERTS, freeze="none", seed=0):
    torch.manual_seed(seed)
    model = cls(
        {
            "prismer_model": tiny_size(len(tokenizer)),
            "experts": experts,
            "image_resolution": RES,
            "freeze": freeze,
            "pretrained": False,
        },
        tokenizer=tokenizer,
    )
    if "obj_detection" in experts:
        with torch.no_grad():
            rows = model.expert_encoder.instance_embedding
            rows.copy_(rows[:1].expand_as(rows))
    return model


@pytest.fixture
def inputs():
    return random_experts(EXPERTS, 3, RES)


def deterministic_instances(x):
    """One instance id everywhere; with all instance rows equal (see build) the
    random row drawn per instance cannot change results between calls."""
    x["obj_detection"]["instance"].fill_(255)
    return x


@pytest.mark.parametrize("prefix", ["", "A picture of"])
@torch.no_grad()
def test_cached_and_uncached_caption_generation_agree(tokenizer, inputs, prefix):
    model = build(PrismerCaption, tokenizer).eval()
    model.text_decoder.lm_head.bias[tokenizer.eos_token_id] = -1e4  # long captions exercise the cache
    inputs = deterministic_instances(inputs)
    torch.manual_seed(0)
    cached = model.generate(inputs, prefix=prefix, use_cache=True)
    torch.manual_seed(0)
    plain = model.generate(inputs, prefix=prefix, use_cache=False)
    assert cached == plain
    assert all(isinstance(c, str) and c for c in cached)
    assert not any(c.startswith(prefix) and prefix for c in cached)


@pytest.mark.parametrize("use_cache", [True, False])
@torch.no_grad()
def test_cached_generation_feeds_one_new_token_per_step(tokenizer, inputs, use_cache):
    """With the cache, every step after the prompt runs the decoder on one token
    (a cache `generate` cannot hand over means the whole sequence every step)."""
    model = build(PrismerCaption, tokenizer).eval()
    model.text_decoder.lm_head.bias[tokenizer.eos_token_id] = -1e4
    lengths = []
    hook = model.text_decoder.register_forward_pre_hook(
        lambda _m, args, kwargs: lengths.append((args[0] if args else kwargs["input_ids"]).shape[1]), with_kwargs=True
    )
    model.generate(
        deterministic_instances(inputs), prefix="A picture of", max_length=12, min_length=12, use_cache=use_cache
    )
    hook.remove()
    prompt = len(tokenizer("A picture of").input_ids) - 1
    assert len(lengths) == 12 - prompt
    assert lengths == ([prompt] + [1] * (len(lengths) - 1) if use_cache else list(range(prompt, 12)))


@torch.no_grad()
def test_generation_respects_min_and_max_length(tokenizer, inputs):
    model = build(PrismerCaption, tokenizer).eval()
    image = model.encode(deterministic_instances(inputs))
    prompt = torch.zeros(3, 1, dtype=torch.long)
    model.text_decoder.lm_head.bias[tokenizer.eos_token_id] = 1e4  # eos wants out at once
    out = model.text_decoder.generate(
        input_ids=prompt,
        encoder_hidden_states=image,
        num_beams=3,
        max_length=20,
        min_length=8,
        pad_token_id=1,
        eos_token_id=2,
    )
    assert out.shape[1] == 9  # eos forbidden until 8 tokens exist, then taken as the 9th
    model.text_decoder.lm_head.bias[tokenizer.eos_token_id] = -1e4
    out = model.text_decoder.generate(
        input_ids=prompt,
        encoder_hidden_states=image,
        num_beams=3,
        max_length=20,
        min_length=8,
        pad_token_id=1,
        eos_token_id=2,
    )
    assert out.shape[1] == 20


@torch.no_grad()
def test_caption_loss_ignores_prefix_and_padding(tokenizer):
    """The loss worked out from the logits: each caption's tokens after the prefix
    (</s> included, padding not), cross-entropy with label smoothing 0.1 written
    out, summed per caption, averaged over the batch."""
    model = build(PrismerCaption, tokenizer).eval()
    x = deterministic_instances(random_experts(EXPERTS, 2, RES))
    targets = [" a red cube on the floor", " two blue spheres"]
    captions = ["a picture of" + t for t in targets]
    tok = tokenizer(captions, padding="longest", return_tensors="pt")
    logp = model.text_decoder(tok.input_ids, tok.attention_mask, model.encode(x)).logits.log_softmax(-1)
    want = []
    for b, target in enumerate(targets):
        ids = tokenizer(target).input_ids[1:]  # without <s>
        end = int(tok.attention_mask[b].sum())
        assert tok.input_ids[b, end - len(ids) : end].tolist() == ids
        rows = logp[b, end - len(ids) - 1 : end - 1]  # each token is predicted at the position before it
        want.append(-(0.9 * rows[range(len(ids)), ids] + 0.1 * rows.mean(-1)).sum())
    assert torch.allclose(model(x, captions, prefix="A picture of"), torch.stack(want).mean())
    assert model(x, captions, prefix="A picture of") < model(x, captions, prefix="")


def test_vqa_loss_with_several_answers_reuses_image_tokens(tokenizer):
    model = build(PrismerVQA, tokenizer).eval()
    x = deterministic_instances(random_experts(EXPERTS, 2, RES))
    questions = ["what colour is the cube", "how many spheres are there"]
    answers, weights, n = ["red", "blue", "three"], torch.tensor([0.7, 0.3, 1.0]), torch.tensor([2, 1])
    with torch.no_grad():
        grouped = model(x, questions, answers, weights, answers_per_question=n)
        flat_x = {
            k: ({kk: vv[[0, 0, 1]] for kk, vv in v.items()} if isinstance(v, dict) else v[[0, 0, 1]])
            for k, v in x.items()
        }
        flat = model(flat_x, [questions[0], questions[0], questions[1]], answers, weights)
    torch.testing.assert_close(grouped, flat)


def test_vqa_targets_are_the_answer_tokens_only(tokenizer):
    ids, mask, labels = question_answer_tokens(tokenizer, ["what colour is the cube", "how many"], ["red", "no"], "cpu")
    assert ids[0, 0] == tokenizer.bos_token_id
    targets = [tokenizer.decode(row[row != -100]) for row in labels]
    assert targets == [" Red</s>", " No</s>"]
    assert mask.shape == ids.shape


@torch.no_grad()
def test_rank_answers_picks_the_best_scored_candidate(tokenizer):
    model = build(PrismerVQA, tokenizer).eval()
    x = deterministic_instances(random_experts(EXPERTS, 2, RES))
    questions = ["what colour is the cube", "is the cone closer than the sphere"]
    answer_list = ["red", "blue", "yes", "no", "three", "a small yellow cylinder"]
    ranked = model.rank_answers(x, questions, answer_list, k=len(answer_list))
    # Brute force: score every answer for every question.
    image = model.encode(x)
    scores = torch.zeros(2, len(answer_list))
    for j, ans in enumerate(answer_list):
        ids, mask, labels = question_answer_tokens(tokenizer, questions, [ans] * 2, "cpu")
        loss = model.text_decoder(ids, mask, image, labels=labels).loss
        scores[:, j] = -loss / (labels != -100).sum(-1)
    assert ranked.tolist() == scores.argmax(1).tolist()
    # The one-pass scores (cached question, answers side by side) are the brute-force scores.
    q_ids, q_mask = question_tokens(tokenizer, questions, "cpu")
    a_ids, a_mask = answer_tokens(tokenizer, answer_list, "cpu")
    every_BK = torch.arange(len(answer_list)).expand(2, -1)
    prefix = model.text_decoder(q_ids, q_mask, image, use_cache=True)
    fast = answer_scores(model.text_decoder, prefix, q_mask, image, a_ids[every_BK], a_mask[every_BK])
    torch.testing.assert_close(fast, scores, rtol=1e-5, atol=1e-5)
    # Rows whose candidates differ in number of tokens (the packed rows' padding).
    some_BK = torch.tensor([[5, 0, 1], [2, 3, 4]])
    prefix = model.text_decoder(q_ids, q_mask, image, use_cache=True)
    fast = answer_scores(model.text_decoder, prefix, q_mask, image, a_ids[some_BK], a_mask[some_BK])
    torch.testing.assert_close(fast, scores.gather(1, some_BK), rtol=1e-5, atol=1e-5)
    top1 = model.rank_answers(x, questions, answer_list, k=1)
    assert top1.shape == (2,) and all(0 <= i < len(answer_list) for i in top1.tolist())


@torch.no_grad()
def test_vqa_generate_returns_lowercase_answers_cached_equals_uncached(tokenizer):
    model = build(PrismerVQA, tokenizer).eval()
    x = deterministic_instances(random_experts(EXPERTS, 2, RES))
    qs = ["what colour is the cube", "how many spheres are there"]
    a = model.generate(x, qs, use_cache=True)
    assert a == model.generate(x, qs, use_cache=False)
    assert all(s == s.lower() for s in a)


@pytest.mark.parametrize("freeze", ["none", "freeze_vision", "freeze_lang", "freeze_lang_vision"])
def test_every_trainable_parameter_gets_a_gradient_and_frozen_ones_none(tokenizer, freeze):
    model = build(PrismerCaption, tokenizer, freeze=freeze).train()
    x = random_experts(EXPERTS, 2, RES)
    model(x, ["a red cube on the floor", "two blue spheres"], prefix="a").backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    blocks = model.expert_encoder.transformer.resblocks
    layers = model.text_decoder.roberta.encoder.layer
    assert blocks[0][0].attn.in_proj_weight.requires_grad == (freeze in ("none", "freeze_lang"))
    assert blocks[0][1].adaptor.up_proj.weight.requires_grad
    assert layers[1][0].intermediate.dense.weight.requires_grad == (freeze in ("none", "freeze_vision"))
    assert layers[1][1].self.query.weight.requires_grad and layers[1][2].adaptor_ln.weight.requires_grad
    assert model.text_decoder.roberta.encoder.output_layer.output.dense.weight.requires_grad


def test_inputs_must_match_the_models_experts(tokenizer):
    model = build(PrismerCaption, tokenizer, experts=["depth"])
    with pytest.raises(KeyError, match=r"missing \['depth'\]"):
        model.encode({"rgb": torch.zeros(1, 3, RES, RES)})
    with pytest.raises(KeyError, match=r"not in the model \['edge'\]"):
        model.encode(random_experts(["depth", "edge"], 1, RES))
