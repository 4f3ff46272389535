"""Building blocks shared by the encoder, the resampler and the decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activation dtype (as the
    official model does, for stable fp16/bf16 training)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SquaredReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.square(torch.relu(x))


ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU, "squared_relu": SquaredReLU}


class Adaptor(nn.Module):
    """Residual bottleneck MLP (full width, squared ReLU) inserted into every
    frozen block so that the frozen backbones can be steered cheaply.

    norm_late=False (vision): x + up(act(down(ln(x)))); True (language): ln(x + up(act(down(x)))).
    """

    def __init__(self, width: int, norm_late: bool = False):
        super().__init__()
        self.norm_late = norm_late
        self.adaptor = nn.Sequential()
        self.adaptor.add_module("down_proj", nn.Linear(width, width))
        self.adaptor.add_module("sq_relu", SquaredReLU())
        self.adaptor.add_module("up_proj", nn.Linear(width, width))
        self.adaptor_ln = LayerNorm(width)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        if self.norm_late:
            return self.adaptor_ln(self.adaptor(x_BLD) + x_BLD)
        return self.adaptor(self.adaptor_ln(x_BLD)) + x_BLD


class MLP(nn.Sequential):
    def __init__(self, width: int, act: str):
        super().__init__()
        self.add_module("c_fc", nn.Linear(width, 4 * width))
        self.add_module("gelu" if act != "squared_relu" else "sq_relu", ACTIVATIONS[act]())
        self.add_module("c_proj", nn.Linear(4 * width, width))


class Attention(nn.Module):
    """Batch-first multi-head attention with `nn.MultiheadAttention`'s
    parameter names (in_proj_weight, out_proj), so CLIP and official Prismer
    weights load unchanged, computed with scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, q_BQD: torch.Tensor, kv_BKD: torch.Tensor | None = None) -> torch.Tensor:
        B, Q, D = q_BQD.shape
        w_q, w_kv = self.in_proj_weight.split([D, 2 * D])
        b_q, b_kv = self.in_proj_bias.split([D, 2 * D])
        kv_BKD = q_BQD if kv_BKD is None else kv_BKD
        q = F.linear(q_BQD, w_q, b_q)
        k, v = F.linear(kv_BKD, w_kv, b_kv).chunk(2, dim=-1)
        q_BHQd, k_BHKd, v_BHKd = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out_BHQd = F.scaled_dot_product_attention(q_BHQd, k_BHKd, v_BHKd)
        return self.out_proj(out_BHQd.transpose(1, 2).flatten(2))


def resize_pos_embed(pos_ND: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Bicubically resize a square grid of positional embeddings (N, D) to
    `num_tokens` positions: for expert token grids and for checkpoints trained
    at another resolution (224 pre-training -> 480 fine-tuning)."""
    old, new = round(pos_ND.shape[0] ** 0.5), round(num_tokens**0.5)
    if old * old != pos_ND.shape[0] or new * new != num_tokens:
        raise ValueError(f"positional embedding grids must be square: {pos_ND.shape[0]} -> {num_tokens} tokens")
    if old == new:
        return pos_ND
    grid_1DHW = pos_ND.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid_1DHW = F.interpolate(grid_1DHW.float(), size=(new, new), mode="bicubic", align_corners=False)
    return grid_1DHW.permute(0, 2, 3, 1).flatten(0, 2).to(pos_ND.dtype)
