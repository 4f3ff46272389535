"""The expert encoder: a CLIP ViT with one stem per modality, a Perceiver
resampler for the expert tokens, and an adaptor after every attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.modalities import EXPERTS
from model.layers import MLP, Adaptor, Attention, LayerNorm, resize_pos_embed
from model.resampler import PerceiverResampler

NUM_INSTANCE_ROWS = 128


class ResidualAttentionBlock(nn.Module):
    """A CLIP block, run in two halves so an adaptor can sit between them."""

    def __init__(self, width: int, heads: int, act: str):
        super().__init__()
        self.attn = Attention(width, heads)
        self.mlp = MLP(width, act)
        self.ln_1 = LayerNorm(width)
        self.ln_2 = LayerNorm(width)

    def attention(self, x_BLD: torch.Tensor) -> torch.Tensor:
        return x_BLD + self.attn(self.ln_1(x_BLD))

    def feed_forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        return x_BLD + self.mlp(self.ln_2(x_BLD))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, act: str):
        super().__init__()
        # resblocks[i] = [CLIP block, adaptor]: the official checkpoint layout.
        self.resblocks = nn.ModuleList(
            nn.ModuleList([ResidualAttentionBlock(width, heads, act), Adaptor(width)]) for _ in range(layers)
        )

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        for block, adaptor in self.resblocks:
            x_BLD = block.feed_forward(adaptor(block.attention(x_BLD)))
        return x_BLD


def expert_stem(in_channels: int, width: int, patch_size: int, upsample: int) -> nn.Sequential:
    """Conv stem for a label map at 224 px: resample so the four convs (x16
    stride for dense maps, x4 for 64-channel maps) land on the RGB token grid."""
    strides = (2, 2, 2, 2) if upsample == 16 else (2, 2, 1, 1)
    chans = [in_channels, width // 8, width // 4, width // 2, width]
    layers: list[nn.Module] = [nn.Upsample(scale_factor=upsample / patch_size, mode="bilinear", align_corners=True)]
    for c_in, c_out, stride in zip(chans[:-1], chans[1:], strides):
        layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    layers.append(nn.Conv2d(width, width, 1, bias=False))
    return nn.Sequential(*layers)


class ExpertEncoder(nn.Module):
    def __init__(
        self,
        experts: list[str],
        image_resolution: int,
        width: int,
        layers: int,
        patch_size: int,
        act: str = "quick_gelu",
    ):
        super().__init__()
        self.experts = list(experts)
        self.patch_size = patch_size
        self.conv1 = nn.ModuleDict({"rgb": nn.Conv2d(3, width, patch_size, patch_size, bias=False)})
        for name in self.experts:
            e = EXPERTS[name]
            if e.stem not in self.conv1:
                self.conv1[e.stem] = expert_stem(e.channels, width, patch_size, e.kind.stem_upsample)
        scale = width**-0.5
        self.positional_embedding = nn.Parameter(scale * torch.randn((image_resolution // patch_size) ** 2, width))
        if any(EXPERTS[name].kind.instances for name in self.experts):
            self.instance_embedding = nn.Parameter(scale * torch.randn(NUM_INSTANCE_ROWS, width))
        self.transformer = Transformer(width, layers, width // 64 if width >= 64 else 1, act)
        if self.experts:
            self.resampler = PerceiverResampler(width, layers=4, heads=8, num_latents=64)
        self.ln_pre = LayerNorm(width)
        self.ln_post = LayerNorm(width)

    def forward(self, experts: dict) -> torch.Tensor:
        """experts: `rgb` (B, 3, H, W) and each expert's map (B, C, 224, 224);
        an instance map (`obj_detection`) is {label: (B, 64, h, w), instance: (B, 1, h, w)
        ids, 255 = none}, as its label kind's `model_input` makes it.
        Returns the tokens (B, rgb tokens + 64 latents, D)."""
        if "rgb" not in experts:
            raise KeyError("expert inputs need an 'rgb' image tensor")
        missing = [n for n in self.experts if n not in experts]
        unknown = [n for n in experts if n != "rgb" and n not in self.experts]
        if missing or unknown:
            raise KeyError(
                f"expert inputs {sorted(experts)} do not match the model's experts {self.experts} "
                f"(missing {missing}, not in the model {unknown})"
            )
        rgb_BND = self.conv1["rgb"](experts["rgb"]).flatten(2).transpose(1, 2)
        pos_ND = self.positional_embedding.to(rgb_BND.dtype)
        x_BLD = rgb_BND + pos_ND
        tokens = []
        for name in self.experts:
            e = EXPERTS[name]
            x_BDhw = self.conv1[e.stem](e.kind.stem_input(experts[name]))
            if e.kind.instances:
                x_BDhw = x_BDhw + self._instance_embedding(experts[name]["instance"], x_BDhw.shape[2:]).to(x_BDhw.dtype)
            x_BND = x_BDhw.flatten(2).transpose(1, 2)
            tokens.append(x_BND + resize_pos_embed(pos_ND, x_BND.shape[1]))
        if tokens:
            x_BLD = torch.cat([x_BLD, self.resampler(torch.cat(tokens, dim=1))], dim=1)
        return self.ln_post(self.transformer(self.ln_pre(x_BLD)))

    def _instance_embedding(self, instance_B1HW: torch.Tensor, size) -> torch.Tensor:
        """Each instance id (8-bit, 255 = none, also embedded as the official
        model does) gets one randomly drawn row, shared across the batch, so
        the model learns instance grouping rather than id identities."""
        ids_BHW = F.interpolate(instance_B1HW.float(), size=size, mode="nearest")[:, 0].long()
        rows = torch.randint(0, NUM_INSTANCE_ROWS, (256,), device=ids_BHW.device)
        emb_BHWD = self.instance_embedding[rows[ids_BHW.clamp(0, 255)]]
        return emb_BHWD.permute(0, 3, 1, 2)
