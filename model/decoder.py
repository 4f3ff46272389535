"""The text decoder: RoBERTa whose every layer also attends to the encoder
tokens, with an adaptor, and one plain RoBERTa layer before the LM head.

A `PreTrainedModel` + `GenerationMixin`, so Hugging Face `generate` runs it,
with a key/value cache that also holds the encoder tokens' cross-attention
keys and values (computed once per generation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, RobertaConfig
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from model.layers import Adaptor, LayerNorm

LABEL_SMOOTHING = 0.1
# The name under which `generate` hands the key/value cache to the model and reads
# it back: transformers 5.x renamed `past_key_values` to `cache` (a model that only
# knows the old name silently recomputes the whole sequence every step).
CACHE_KEY = "cache" if "cache" in CausalLMOutputWithCrossAttentions.__dataclass_fields__ else "past_key_values"


def position_ids_from_input_ids(input_ids_BL: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """RoBERTa positions: count non-pad tokens from padding_idx + 1; pads get padding_idx."""
    mask_BL = input_ids_BL.ne(padding_idx).long()
    return torch.cumsum(mask_BL, dim=1) * mask_BL + padding_idx


class Embeddings(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.padding_idx = config.pad_token_id
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(
            config.max_position_embeddings, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Persistent only because the official checkpoints carry it.
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)))

    def forward(self, input_ids_BL: torch.Tensor, position_ids_BL: torch.Tensor) -> torch.Tensor:
        x_BLD = self.word_embeddings(input_ids_BL) + self.token_type_embeddings.weight[0]
        x_BLD = x_BLD + self.position_embeddings(position_ids_BL)
        return self.dropout(self.LayerNorm(x_BLD))


class SelfAttention(nn.Module):
    """Multi-head attention over the text (self) or the encoder tokens (cross)."""

    def __init__(self, config: RobertaConfig, kv_width: int):
        super().__init__()
        self.heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def split(self, x_BLD: torch.Tensor) -> torch.Tensor:
        return x_BLD.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x_BQD, k_BHKd, v_BHKd, mask_B1QK=None) -> torch.Tensor:
        q_BHQd = self.split(self.query(x_BQD))
        p = self.dropout.p if self.training else 0.0
        out_BHQd = F.scaled_dot_product_attention(q_BHQd, k_BHKd, v_BHKd, attn_mask=mask_B1QK, dropout_p=p)
        return out_BHQd.transpose(1, 2).flatten(2)


class SelfOutput(nn.Module):
    def __init__(self, config: RobertaConfig, in_width: int):
        super().__init__()
        self.dense = nn.Linear(in_width, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h_BLD: torch.Tensor, residual_BLD: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h_BLD)) + residual_BLD)


class AttentionBlock(nn.Module):
    """`self` + `output`: RoBERTa's attention sub-layer (post-norm)."""

    def __init__(self, config: RobertaConfig, kv_width: int | None = None):
        super().__init__()
        self.self = SelfAttention(config, kv_width or config.hidden_size)
        self.output = SelfOutput(config, config.hidden_size)

    def forward(self, x_BQD, k_BHKd, v_BHKd, mask_B1QK=None) -> torch.Tensor:
        return self.output(self.self(x_BQD, k_BHKd, v_BHKd, mask_B1QK), x_BQD)


class Intermediate(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class TextLayer(nn.Module):
    """RoBERTa's layer, run in two halves (attention, feed-forward)."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.attention = AttentionBlock(config)
        self.intermediate = Intermediate(config)
        self.output = SelfOutput(config, config.intermediate_size)

    def attend(self, x_BQD, mask_B1QK, cache: DynamicCache | None, idx: int) -> torch.Tensor:
        sa = self.attention.self
        k_BHQd, v_BHQd = sa.split(sa.key(x_BQD)), sa.split(sa.value(x_BQD))
        if cache is not None:
            k_BHQd, v_BHQd = cache.update(k_BHQd, v_BHQd, idx)
        return self.attention(x_BQD, k_BHQd, v_BHQd, mask_B1QK)

    def feed_forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(x_BLD), x_BLD)


class CrossAttention(AttentionBlock):
    def attend(self, x_BQD, enc_BND, cache: EncoderDecoderCache | None, idx: int) -> torch.Tensor:
        if cache is not None and cache.is_updated.get(idx):
            layer = cache.cross_attention_cache.layers[idx]
            k_BHNd, v_BHNd = layer.keys, layer.values
        else:
            k_BHNd, v_BHNd = self.self.split(self.self.key(enc_BND)), self.self.split(self.self.value(enc_BND))
            if cache is not None:
                k_BHNd, v_BHNd = cache.cross_attention_cache.update(k_BHNd, v_BHNd, idx)
                cache.is_updated[idx] = True
        return self(x_BQD, k_BHNd, v_BHNd)


class Encoder(nn.Module):
    """Named `encoder` (RoBERTa's name for its layer stack) for the checkpoint layout."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        kv_width = getattr(config, "vision_hidden_size", config.hidden_size)
        # layer[i] = [RoBERTa layer, cross-attention, adaptor]: the official checkpoint layout.
        self.layer = nn.ModuleList(
            nn.ModuleList([TextLayer(config), CrossAttention(config, kv_width), Adaptor(config.hidden_size, True)])
            for _ in range(config.num_hidden_layers)
        )
        self.output_layer = TextLayer(config)

    def forward(self, x_BQD, enc_BND, mask_B1QK, cache: EncoderDecoderCache | None) -> torch.Tensor:
        self_cache = cache.self_attention_cache if cache is not None else None
        for i, (text_layer, cross_attention, adaptor) in enumerate(self.layer):
            x_BQD = text_layer.attend(x_BQD, mask_B1QK, self_cache, i)
            x_BQD = adaptor(cross_attention.attend(x_BQD, enc_BND, cache, i))
            x_BQD = text_layer.feed_forward(x_BQD)
        x_BQD = self.output_layer.attend(x_BQD, mask_B1QK, self_cache, len(self.layer))
        return self.output_layer.feed_forward(x_BQD)


class RobertaBody(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)


class LMHead(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(F.gelu(self.dense(x_BLD))))


def causal_padding_mask(attention_mask_BK: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive (B, 1, Q, K) mask: query i (the last Q of K positions) sees
    keys j <= i that are not padding."""
    K = attention_mask_BK.shape[1]
    i_Q1 = torch.arange(K - q_len, K, device=attention_mask_BK.device)[:, None]
    j_1K = torch.arange(K, device=attention_mask_BK.device)[None, :]
    keep_B1QK = (j_1K <= i_Q1)[None, None] & attention_mask_BK.bool()[:, None, None, :]
    return torch.zeros(keep_B1QK.shape, dtype=dtype, device=keep_B1QK.device).masked_fill(
        ~keep_B1QK, torch.finfo(dtype).min
    )


class PrismerTextDecoder(PreTrainedModel, GenerationMixin):
    config_class = RobertaConfig
    base_model_prefix = "roberta"
    main_input_name = "input_ids"
    # The official model counts (and its checkpoints store) the output
    # embedding apart from the input one: untied, initialised as a copy.
    _tied_weights_keys = {"lm_head.decoder.bias": "lm_head.bias"}

    def __init__(self, config: RobertaConfig):
        config.tie_word_embeddings = False
        super().__init__(config)
        self.roberta = RobertaBody(config)
        self.lm_head = LMHead(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.roberta.embeddings.word_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """RoBERTa's initialisation, for training from scratch."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
                if m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.lm_head.bias)
        self.lm_head.decoder.weight.copy_(self.roberta.embeddings.word_embeddings.weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        return_dict: bool = True,
        **kwargs,
    ) -> CausalLMOutputWithCrossAttentions:
        """`attention_mask`: (B, past + Q) of 1 (token) / 0 (padding), made causal
        here, or an additive (B, 1, Q, past + Q) mask used as given. `loss` is per
        sample (B,): label-smoothed cross-entropy of the next token, summed over
        the sample's tokens (labels -100 are ignored)."""
        if encoder_hidden_states is None:
            raise ValueError("the Prismer decoder needs encoder_hidden_states (the expert encoder's tokens)")
        cache = self._cache(cache if cache is not None else kwargs.get("past_key_values"), use_cache and labels is None)
        past = cache.get_seq_length() if cache is not None else 0
        B, Q = input_ids.shape
        if attention_mask is None:
            attention_mask = input_ids.new_ones(B, past + Q)
        if position_ids is None:
            position_ids = position_ids_from_input_ids(input_ids, self.config.pad_token_id)
            position_ids = torch.where(position_ids > self.config.pad_token_id, position_ids + past, position_ids)
        x_BQD = self.roberta.embeddings(input_ids, position_ids)
        if attention_mask.dim() == 4:
            mask_B1QK = attention_mask.to(x_BQD.dtype)
        else:
            mask_B1QK = causal_padding_mask(attention_mask, Q, x_BQD.dtype)
        x_BQD = self.roberta.encoder(x_BQD, encoder_hidden_states.to(x_BQD.dtype), mask_B1QK, cache)
        logits_BQV = self.lm_head(x_BQD)
        loss_B = None
        if labels is not None:
            loss_B = (
                F.cross_entropy(
                    logits_BQV[:, :-1].flatten(0, 1).float(),
                    labels[:, 1:].flatten(),
                    reduction="none",
                    label_smoothing=LABEL_SMOOTHING,
                )
                .view(B, -1)
                .sum(1)
            )
        return CausalLMOutputWithCrossAttentions(loss=loss_B, logits=logits_BQV, **{CACHE_KEY: cache})

    @staticmethod
    def _cache(cache, use_cache: bool) -> EncoderDecoderCache | None:
        """Our cache holds self-attention keys/values of every layer (plus the
        last plain layer) and the cross-attention ones. `generate` hands a
        fresh DynamicCache sized by the config; it is replaced (the replacement
        returns through the output)."""
        if not use_cache:
            return None
        if isinstance(cache, EncoderDecoderCache):
            return cache
        if cache is not None and cache.get_seq_length() > 0:
            raise TypeError("the Prismer decoder needs an EncoderDecoderCache to continue from a cache")
        return EncoderDecoderCache(DynamicCache(), DynamicCache())

    def _reorder_cache(self, cache: EncoderDecoderCache, beam_idx: torch.Tensor) -> EncoderDecoderCache:
        """Beam search: only the self-attention cache follows the beams. Beams
        only move within one image, whose beams share its cross-attention keys
        and values, so reordering those (every layer's, every step) would copy
        them for nothing."""
        cache.self_attention_cache.reorder_cache(beam_idx)
        return cache

    def prepare_inputs_for_generation(
        self,
        input_ids,
        cache=None,
        attention_mask=None,
        encoder_hidden_states=None,
        use_cache=None,
        **kwargs,
    ) -> dict:
        cache = cache if cache is not None else kwargs.get("past_key_values")
        # Positions from the whole sequence, as the no-cache model computes them.
        position_ids = position_ids_from_input_ids(input_ids, self.config.pad_token_id)
        past = cache.get_seq_length() if cache is not None else 0
        return {
            "input_ids": input_ids[:, past:],
            "position_ids": position_ids[:, past:],
            "attention_mask": attention_mask,
            "encoder_hidden_states": encoder_hidden_states,
            CACHE_KEY: cache,
            "use_cache": use_cache,
        }
