"""Perceiver resampler: compresses all expert tokens into a fixed number of latents."""

from __future__ import annotations

import torch
from torch import nn

from model.layers import MLP, Attention, LayerNorm


class PerceiverAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = Attention(width, heads)
        self.mlp = MLP(width, "squared_relu")
        self.ln_1 = LayerNorm(width)
        self.ln_2 = LayerNorm(width)
        self.ln_ff = LayerNorm(width)

    def forward(self, x_BTD: torch.Tensor, lat_BLD: torch.Tensor) -> torch.Tensor:
        q_BLD = self.ln_1(lat_BLD)
        # Latents attend to themselves and to the expert tokens.
        lat_BLD = lat_BLD + self.attn(q_BLD, torch.cat([q_BLD, self.ln_2(x_BTD)], dim=1))
        return lat_BLD + self.mlp(self.ln_ff(lat_BLD))


class PerceiverResampler(nn.Module):
    def __init__(self, width: int, layers: int = 4, heads: int = 8, num_latents: int = 64):
        super().__init__()
        self.latents = nn.Parameter(width**-0.5 * torch.randn(num_latents, width))
        self.perceiver_blocks = nn.ModuleList(PerceiverAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        lat_BLD = self.latents.to(x_BTD.dtype).expand(x_BTD.shape[0], -1, -1)
        for block in self.perceiver_blocks:
            lat_BLD = block(x_BTD, lat_BLD)
        return lat_BLD
