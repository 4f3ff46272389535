"""The edge expert: DexiNed (Soria et al., 2020), as Prismer runs it.

Keys and shapes match the official weight file (`10_model.pth`, a flat
state_dict), so it loads with `strict=True`. `side_5` and `block_cat.bn` are
in that file but unused by the forward pass (as in the original network).
Pre- and post-processing follow the official label generation exactly:
BGR x 255 input with the ImageNet mean removed, and edges written dark (0)
on a white (255) background.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from common.weights import load_checked, read_state_dict
from experts.network import LabelNetwork

RESOLUTION = 480  # the official generation resizes every image to 480 x 480
MEAN_RGB = (0.485, 0.456, 0.406)  # subtracted with std 1, before the x255 and the BGR flip


class SingleConv(nn.Module):
    """1x1 conv (+ BN, whose weights exist even where it is not applied)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, use_bn: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, stride=stride)
        self.bn = nn.BatchNorm2d(c_out)
        self.use_bn = use_bn

    def forward(self, x):
        x = self.conv(x)
        return self.bn(x) if self.use_bn else x


class DoubleConv(nn.Module):
    def __init__(self, c_in: int, c_mid: int, c_out: int | None = None, stride: int = 1, act: bool = True):
        super().__init__()
        c_out = c_out or c_mid
        self.conv1 = nn.Conv2d(c_in, c_mid, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(c_mid)
        self.conv2 = nn.Conv2d(c_mid, c_out, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = act

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return F.relu(x) if self.act else x


class DenseLayer(nn.Module):
    """relu -> conv3x3 (pad 2) -> BN -> relu -> conv3x3 (pad 0) -> BN, averaged with the side input."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=2)
        self.norm1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3)
        self.norm2 = nn.BatchNorm2d(c_out)

    def forward(self, x, side):
        x = self.norm1(self.conv1(F.relu(x)))
        x = self.norm2(self.conv2(F.relu(x)))
        return 0.5 * (x + side)


class DenseBlock(nn.Module):
    def __init__(self, layers: int, c_in: int, c_out: int):
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(c_in if i == 0 else c_out, c_out))

    def forward(self, x, side):
        for layer in self.children():
            x = layer(x, side)  # the side input passes every layer unchanged
        return x


class UpConv(nn.Module):
    """`up_scale` stages of (1x1 conv, relu, x2 transposed conv); 16 channels, 1 at the last stage."""

    PADS = (0, 0, 1, 3, 7)  # by up_scale: the transposed conv exactly doubles the size

    def __init__(self, c_in: int, up_scale: int):
        super().__init__()
        layers, k = [], 2**up_scale
        for i in range(up_scale):
            c_out = 1 if i == up_scale - 1 else 16
            layers += [
                nn.Conv2d(c_in, c_out, 1),
                nn.ReLU(),
                nn.ConvTranspose2d(c_out, c_out, k, 2, self.PADS[up_scale]),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        return self.features(x)


class DexiNed(nn.Module):
    def __init__(self):
        super().__init__()
        self.block_1 = DoubleConv(3, 32, 64, stride=2)
        self.block_2 = DoubleConv(64, 128, act=False)
        self.dblock_3 = DenseBlock(2, 128, 256)
        self.dblock_4 = DenseBlock(3, 256, 512)
        self.dblock_5 = DenseBlock(3, 512, 512)
        self.dblock_6 = DenseBlock(3, 512, 256)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.side_1 = SingleConv(64, 128, 2)
        self.side_2 = SingleConv(128, 256, 2)
        self.side_3 = SingleConv(256, 512, 2)
        self.side_4 = SingleConv(512, 512, 1)
        self.side_5 = SingleConv(512, 256, 1)  # unused, kept for the official key set
        self.pre_dense_2 = SingleConv(128, 256, 2)
        self.pre_dense_3 = SingleConv(128, 256, 1)
        self.pre_dense_4 = SingleConv(256, 512, 1)
        self.pre_dense_5 = SingleConv(512, 512, 1)
        self.pre_dense_6 = SingleConv(512, 256, 1)
        self.up_block_1 = UpConv(64, 1)
        self.up_block_2 = UpConv(128, 1)
        self.up_block_3 = UpConv(256, 2)
        self.up_block_4 = UpConv(512, 3)
        self.up_block_5 = UpConv(512, 4)
        self.up_block_6 = UpConv(256, 4)
        self.block_cat = SingleConv(6, 1, use_bn=False)

    def forward(self, x_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Seven edge logit maps (B1HW): one per scale, then the fused one. H, W: multiples of 16."""
        b1 = self.block_1(x_B3HW)  # 1/2
        b2 = self.block_2(b1)
        b2_down = self.maxpool(b2)  # 1/4
        b2_add = b2_down + self.side_1(b1)
        b3 = self.dblock_3(b2_add, self.pre_dense_3(b2_down))
        b3_down = self.maxpool(b3)  # 1/8
        b3_add = b3_down + self.side_2(b2_add)
        b4 = self.dblock_4(b3_add, self.pre_dense_4(b3_down + self.pre_dense_2(b2_down)))
        b4_down = self.maxpool(b4)  # 1/16
        b4_add = b4_down + self.side_3(b3_add)
        b5 = self.dblock_5(b4_add, self.pre_dense_5(b4_down))
        b5_add = b5 + self.side_4(b4_add)
        b6 = self.dblock_6(b5_add, self.pre_dense_6(b5))
        outs = [up(b) for up, b in zip(self.ups(), (b1, b2, b3, b4, b5, b6))]
        return [*outs, self.block_cat(torch.cat(outs, dim=1))]

    def ups(self) -> list[UpConv]:
        return [getattr(self, f"up_block_{i}") for i in range(1, 7)]


class Generator(LabelNetwork):
    """Edge labels as the official pipeline makes them (the protocol in experts/network.py)."""

    def load(self, weights: str | Path) -> DexiNed:
        """The official `10_model.pth` (read with weights_only), in eval mode."""
        model = DexiNed()
        load_checked(model, read_state_dict(weights), str(weights))
        return model.eval()

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> the network's 3 x 480 x 480 input: mean removed (std 1), x255, channels BGR."""
        from torchvision.transforms import functional as TF

        x_3HW = TF.to_tensor(TF.resize(image.convert("RGB"), [RESOLUTION, RESOLUTION]))
        x_3HW = x_3HW - torch.tensor(MEAN_RGB).view(3, 1, 1)
        return x_3HW.flip(0) * 255

    def predict(self, model: DexiNed, x_B3HW: torch.Tensor) -> torch.Tensor:
        """The fused edge logits (B, 1, H, W); the six side outputs are not used."""
        return model(x_B3HW)[-1]

    def to_label(self, fused_1HW: torch.Tensor, size: tuple[int, int]) -> Image.Image:
        """The label file's image: sigmoid, min-max to 0..255 per image (truncated to
        uint8), inverted (edges dark), resized bilinearly to the original (W, H)."""
        p_HW = torch.sigmoid(fused_1HW.float())[0].cpu().numpy()
        scaled_HW = (p_HW - p_HW.min()) * 255 / ((p_HW.max() - p_HW.min()) + 1e-12)
        return Image.fromarray(255 - scaled_HW.astype(np.uint8), "L").resize(size, Image.BILINEAR)
