"""Inference for every task head, in one place: caption generation, VQA
answer generation and VQA answer ranking (all through the text decoder;
generation through Hugging Face `generate` with a key/value cache)."""

from __future__ import annotations

import torch


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
    q_ids, q_mask = question_tokens(model.tokenizer, questions, device)
    a_ids_AL, a_mask_AL = answer_tokens(model.tokenizer, answer_list, device)
    k = min(k, len(answer_list))

    logits_BV = model.text_decoder(q_ids, q_mask, image_BND).logits[:, -1].float()
    first_BA = logits_BV.softmax(dim=-1).index_select(1, a_ids_AL[:, 0])
    topk_BK = first_BA.topk(k, dim=1).indices

    ids = torch.cat([q_ids.repeat_interleave(k, 0), a_ids_AL[topk_BK.flatten()]], dim=1)
    mask = torch.cat([q_mask.repeat_interleave(k, 0), a_mask_AL[topk_BK.flatten()]], dim=1)
    labels = ids.masked_fill(ids == model.tokenizer.pad_token_id, -100)
    labels[:, : q_ids.shape[1]] = -100
    loss = model.text_decoder(ids, mask, image_BND.repeat_interleave(k, 0), labels=labels).loss
    score_BK = (-loss / (labels != -100).sum(-1)).view(-1, k)
    return topk_BK.gather(1, score_BK.argmax(dim=1, keepdim=True)).squeeze(1)
