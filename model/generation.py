"""Inference for every task head, in one place: caption generation, VQA
answer generation and VQA answer ranking (all through the text decoder;
generation through Hugging Face `generate` with a key/value cache)."""

from __future__ import annotations

import torch

from model.decoder import CACHE_KEY, LABEL_SMOOTHING


def _generate(model, input_ids, attention_mask, image_BND, use_cache: bool, **kwargs) -> torch.Tensor:
    tok = model.tokenizer
    return model.text_decoder.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        encoder_hidden_states=image_BND,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        **kwargs,
    )


@torch.no_grad()
def generate_captions(
    model,
    experts: dict,
    prefix: str = "",
    num_beams: int = 3,
    max_length: int = 20,
    min_length: int = 8,
    use_cache: bool = True,
    **generate_kwargs,
) -> list[str]:
    """Beam search from the prompt `<s> prefix`; returns the text after the prefix."""
    image_BND = model.encode(experts)
    tok = model.tokenizer([prefix] * image_BND.shape[0], return_tensors="pt")
    ids_BP = tok.input_ids[:, :-1].to(image_BND.device)  # drop </s>
    mask_BP = tok.attention_mask[:, :-1].to(image_BND.device)
    out_BL = _generate(
        model,
        ids_BP,
        mask_BP,
        image_BND,
        use_cache,
        num_beams=num_beams,
        max_length=max_length,
        min_length=min_length,
        **generate_kwargs,
    )
    return [model.tokenizer.decode(row[ids_BP.shape[1] :], skip_special_tokens=True).strip() for row in out_BL]


def question_tokens(tokenizer, questions: list[str], device):
    """`<s>Question?`, right-padded: answers follow the padding, in training
    and in inference alike (as the official model was trained)."""
    q = tokenizer(
        ["<s>" + q.capitalize() for q in questions],
        padding="longest",
        truncation=True,
        max_length=35,
        add_special_tokens=False,
        return_tensors="pt",
    )
    return q.input_ids.to(device), q.attention_mask.to(device)


def answer_tokens(tokenizer, answers: list[str], device):
    a = tokenizer(
        [" " + a.capitalize() + "</s>" for a in answers],
        padding="longest",
        add_special_tokens=False,
        return_tensors="pt",
    )
    return a.input_ids.to(device), a.attention_mask.to(device)


def question_answer_tokens(tokenizer, questions, answers, device):
    """Decoder inputs and labels for question + answer; only answer tokens are targets."""
    q_ids, q_mask = question_tokens(tokenizer, questions, device)
    a_ids, a_mask = answer_tokens(tokenizer, answers, device)
    input_ids = torch.cat([q_ids, a_ids], dim=1)
    labels = input_ids.masked_fill(input_ids == tokenizer.pad_token_id, -100)
    labels[:, : q_ids.shape[1]] = -100
    return input_ids, torch.cat([q_mask, a_mask], dim=1), labels


@torch.no_grad()
def generate_answers(
    model, experts: dict, questions: list[str], num_beams: int = 3, use_cache: bool = True, **generate_kwargs
) -> list[str]:
    image_BND = model.encode(experts)
    q_ids, q_mask = question_tokens(model.tokenizer, questions, image_BND.device)
    q_len = q_ids.shape[1]
    out_BL = _generate(
        model,
        q_ids,
        q_mask,
        image_BND,
        use_cache,
        num_beams=num_beams,
        max_length=q_len + 10,
        min_length=q_len + 2,
        **generate_kwargs,
        length_penalty=-1.0,
    )
    return [model.tokenizer.decode(row[q_len:], skip_special_tokens=True).lower().strip() for row in out_BL]


@torch.no_grad()
def rank_answers(model, experts: dict, questions: list[str], answer_list: list[str], k: int = 128) -> torch.Tensor:
    """Index into `answer_list` of each question's answer: keep the k answers
    whose first token is likeliest, then pick the one with the best mean
    token log-likelihood (label-smoothed, as the official model scores)."""
    image_BND = model.encode(experts)
    device = image_BND.device
    q_ids_BP, q_mask_BP = question_tokens(model.tokenizer, questions, device)
    a_ids_AL, a_mask_AL = answer_tokens(model.tokenizer, answer_list, device)
    k = min(k, len(answer_list))
    prefix = model.text_decoder(q_ids_BP, q_mask_BP, image_BND, use_cache=True)
    first_BA = prefix.logits[:, -1].float().softmax(dim=-1).index_select(1, a_ids_AL[:, 0])
    topk_BK = first_BA.topk(k, dim=1).indices
    score_BK = answer_scores(model.text_decoder, prefix, q_mask_BP, image_BND, a_ids_AL[topk_BK], a_mask_AL[topk_BK])
    return topk_BK.gather(1, score_BK.argmax(dim=1, keepdim=True)).squeeze(1)


def answer_scores(decoder, prefix, q_mask_BP, image_BND, a_ids_BKA, a_mask_BKA) -> torch.Tensor:
    """Mean label-smoothed log-likelihood (B, K) of K candidate answers after
    each question, in one decoder pass: the question's keys/values come from
    its cached pass (`prefix`, used up here), the encoder tokens are not
    repeated, and the K answers' tokens (padding dropped) run packed side by
    side as one sequence whose mask lets each token see the question and its
    own answer's earlier tokens. Equal to scoring each `question + answer` alone."""
    B, K, A = a_ids_BKA.shape
    P = q_mask_BP.shape[1]
    pad = decoder.config.pad_token_id
    tokens_BKA = a_mask_BKA.bool() & (a_ids_BKA != pad)
    # Pack: a stable sort puts each row's answer tokens first, in candidate order.
    order_BX = (~tokens_BKA).flatten(1).int().argsort(dim=1, stable=True)
    total_B = tokens_BKA.flatten(1).sum(1)
    T = int(total_B.max())
    order_BT = order_BX[:, :T]
    ids_BT = a_ids_BKA.flatten(1).gather(1, order_BT)
    cand_BT, j_BT = order_BT // A, order_BT % A
    # Slots past a row's own total hold padding of some candidate, after its last
    # token: no real token sees them, and they are left out of the scores.
    valid_BT = torch.arange(T, device=ids_BT.device) < total_B[:, None]
    # RoBERTa positions: after the question's own tokens (its padding has none), the answer's.
    pos_BT = q_mask_BP.sum(1, keepdim=True) + j_BT + 1 + pad
    keep_BTT = (cand_BT[:, :, None] == cand_BT[:, None, :]) & (j_BT[:, None, :] <= j_BT[:, :, None])
    keep_B1TK = torch.cat([q_mask_BP.bool()[:, None, :].expand(B, T, P), keep_BTT], dim=2)[:, None]
    mask_B1TK = torch.zeros(keep_B1TK.shape, device=keep_B1TK.device).masked_fill(~keep_B1TK, torch.finfo().min)
    out = decoder(ids_BT, mask_B1TK, image_BND, position_ids=pos_BT, cache=prefix[CACHE_KEY], use_cache=True)
    # Token j > 0 is predicted at its answer's token j - 1 (the previous packed
    # position), token 0 at the question's last position.
    first = j_BT == 0
    logits_BTV, q_BV = out.logits.float(), prefix.logits[:, -1].float()
    V = logits_BTV.shape[-1]
    prev_T = (torch.arange(T, device=ids_BT.device) - 1).clamp(min=0)
    lse_BT = torch.where(first, q_BV.logsumexp(-1)[:, None], logits_BTV.logsumexp(-1)[:, prev_T])
    mean_BT = torch.where(first, q_BV.mean(-1)[:, None], logits_BTV.mean(-1)[:, prev_T])
    target_BT = torch.where(first, q_BV.gather(1, ids_BT), logits_BTV.flatten(1).gather(1, prev_T * V + ids_BT))
    # Label-smoothed cross-entropy, as F.cross_entropy(label_smoothing=eps) computes it.
    nll_BT = lse_BT - (1 - LABEL_SMOOTHING) * target_BT - LABEL_SMOOTHING * mean_BT
    sums_BK = torch.zeros(B, K, device=ids_BT.device).scatter_add_(1, cand_BT, nll_BT * valid_BT)
    return -sums_BK / tokens_BKA.sum(-1)
