"""The surface-normal expert: NLL-AngMF (Bae et al., 2021), `NNET` with the 'BN' decoder, as Prismer runs it.

Encoder: timm's `tf_efficientnet_b5`, built without weights. Its 852 state
keys and shapes are those of the gen-efficientnet encoder the official code
loads (the official weight file `scannet.pt` holds them under
`encoder.original_model.`); the decoder is written here with the official key
names, so the file loads strictly. Output: per pixel a unit normal (x, y, z)
and a concentration kappa, at 1/8, 1/4, 1/2 and full resolution; the label is
the full-resolution normal mapped from [-1, 1] to 0..255 RGB (kappa unused).

Memory (peak RSS, resource.getrusage; CPU, float32, 480 x 480, full-size
synthetic weights loaded from a file in the official format; run-to-run
spread ~100 MB): importing torch/timm/torchvision takes 511 MB; loading peaks
at 1.27 GB, 1.03 GB resident after; inference then peaks at 1.36-1.52 GB for
one image and 1.91-1.94 GB for a batch of 4. The official decoder, which
resizes and concatenates whole feature maps and runs each per-pixel refiner
on all pixels of the batch at once, peaks at 1.76-1.97 GB and 3.3-3.7 GB:
its full-resolution refiner alone holds ~240 MB of input and 118 MB per
hidden activation per image, so the official GPU batch of 64 (fp16) needs
over 5 GB for that step. Here the refiners run one image and MLP_CHUNK
pixels at a time, and resized maps are written a few channels at a time
into the concatenated buffer: outputs are bit-identical to the all-at-once
computation (checked once at 480 x 480, batch 2; the tests check chunked
batches against the official outputs).
Speed: 3.1-5 s per 480 x 480 image (0.2-0.3 images/s) on 2 CPU cores shared
with other jobs; a batch of 4 is no faster per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from common.weights import load_checked, read_state_dict
from experts.network import LabelNetwork

RESOLUTION = 480  # the official generation resizes every image to 480 x 480
MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)
MIN_KAPPA = 0.01
MLP_CHUNK = 2**16  # pixels per refiner call: bounds its hidden activations (32 MB a layer), whatever the image size
INTERP_CHUNK = 32  # channels resized at a time before concatenation


class Encoder(nn.Module):
    """EfficientNet-B5 (TF port); returns the features the decoder uses: the outputs of
    blocks 0, 1, 2, 4 (1/2, 1/4, 1/8, 1/16) and the raw conv_head output (1/32), before bn2
    and its activation (so bn2's weights are loaded but unused, as in the official network)."""

    SKIPS = (0, 1, 2, 4)

    def __init__(self):
        super().__init__()
        # num_classes=0: no classifier, as the official code replaces it (and the pooling) by Identity
        self.original_model = timm.create_model("tf_efficientnet_b5", pretrained=False, num_classes=0)

    def forward(self, x_B3HW: torch.Tensor) -> list[torch.Tensor]:
        net = self.original_model
        x = net.bn1(net.conv_stem(x_B3HW))  # timm's bn1 includes the SiLU
        features = []
        for i, stage in enumerate(net.blocks):
            x = stage(x)
            if i in self.SKIPS:
                features.append(x)
        return [*features, net.conv_head(x)]


class UpSampleBN(nn.Module):
    """Bilinear resize (align_corners=True) to the skip's size, concat [up, skip], (3x3 conv, BN, LeakyReLU) x 2."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self._net = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out),
            nn.LeakyReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out),
            nn.LeakyReLU(),
        )

    def forward(self, x_BCHW: torch.Tensor, skip_BCHW: torch.Tensor) -> torch.Tensor:
        return self._net(upsample_concat(x_BCHW, skip_BCHW.shape[2:], skip_BCHW))


def upsample_concat(x_BCHW: torch.Tensor, size: Sequence[int], rest_BCHW: torch.Tensor) -> torch.Tensor:
    """cat([bilinear resize of x to `size` (align_corners=True), rest], dim=1), written into one buffer,
    resized a few channels at a time: the same values without a full-size resized copy beside the result."""
    B, C = x_BCHW.shape[:2]
    out = x_BCHW.new_empty((B, C + rest_BCHW.shape[1], *size))
    for c in range(0, C, INTERP_CHUNK):
        part = x_BCHW[:, c : c + INTERP_CHUNK]
        out[:, c : c + part.shape[1]] = F.interpolate(part, size=tuple(size), mode="bilinear", align_corners=True)
    out[:, C:] = rest_BCHW
    return out


def pixel_mlp(c_in: int) -> nn.Sequential:
    """The per-pixel refiner: 1x1 Conv1d (C+4) -> 128 -> 128 -> 128 -> 4, ReLU between."""
    return nn.Sequential(
        nn.Conv1d(c_in, 128, 1),
        nn.ReLU(),
        nn.Conv1d(128, 128, 1),
        nn.ReLU(),
        nn.Conv1d(128, 128, 1),
        nn.ReLU(),
        nn.Conv1d(128, 4, 1),
    )


def norm_normalize(out_B4X: torch.Tensor) -> torch.Tensor:
    """(x, y, z) divided by their L2 norm (+1e-10); kappa = ELU(k) + 1 + 0.01. Channels on dim 1: (B, 4, ...)."""
    xyz, kappa = out_B4X[:, :3], out_B4X[:, 3:]
    norm = torch.sqrt((xyz**2).sum(1, keepdim=True)) + 1e-10
    return torch.cat([xyz / norm, F.elu(kappa) + 1.0 + MIN_KAPPA], dim=1)


class Decoder(nn.Module):
    """U-Net decoder to 1/2 resolution, a 1/8 prediction, then three x2 refinements (test mode: every pixel)."""

    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(2048, 2048, 1)
        self.up1 = UpSampleBN(2048 + 176, 1024)
        self.up2 = UpSampleBN(1024 + 64, 512)
        self.up3 = UpSampleBN(512 + 40, 256)
        self.up4 = UpSampleBN(256 + 24, 128)
        self.out_conv_res8 = nn.Conv2d(512, 4, 3, padding=1)
        self.out_conv_res4 = pixel_mlp(512 + 4)
        self.out_conv_res2 = pixel_mlp(256 + 4)
        self.out_conv_res1 = pixel_mlp(128 + 4)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """[out_res8, out_res4, out_res2, out_res1], each (B, 4, h, w): unit normal then kappa."""
        x_block0, x_block1, x_block2, x_block3, x_block4 = features
        x_d1 = self.up1(self.conv2(x_block4), x_block3)  # 1/16
        x_d2 = self.up2(x_d1, x_block2)  # 1/8
        x_d3 = self.up3(x_d2, x_block1)  # 1/4
        x_d4 = self.up4(x_d3, x_block0)  # 1/2
        outs = [norm_normalize(self.out_conv_res8(x_d2))]
        for feat_BCHW, mlp in ((x_d2, self.out_conv_res4), (x_d3, self.out_conv_res2), (x_d4, self.out_conv_res1)):
            outs.append(self.refine(feat_BCHW, outs[-1], mlp))
        return outs

    @staticmethod
    def refine(feat_BCHW: torch.Tensor, pred_B4HW: torch.Tensor, mlp: nn.Sequential) -> torch.Tensor:
        """Both inputs upsampled x2 (bilinear, align_corners=True), concatenated, the MLP on every pixel.
        One image and MLP_CHUNK pixels at a time: each pixel's result is the official one."""
        H, W = pred_B4HW.shape[2:]
        out = []
        for feat_1CHW, pred_14HW in zip(feat_BCHW.split(1), pred_B4HW.split(1)):
            pred_14hw = F.interpolate(pred_14HW, scale_factor=2, mode="bilinear", align_corners=True)
            x_1CN = upsample_concat(feat_1CHW, (2 * H, 2 * W), pred_14hw).flatten(2)
            out.append(torch.cat([mlp(chunk) for chunk in x_1CN.split(MLP_CHUNK, dim=2)], dim=2))
        return norm_normalize(torch.cat(out)).view(-1, 4, 2 * H, 2 * W)


class NNET(nn.Module):
    """Keys as the official `NNET` (after stripping `module.`): `encoder.original_model.*`, `decoder.*`."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Decoder()

    def forward(self, x_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Normalised RGB, H and W multiples of 32 -> [out_res8, out_res4, out_res2, out_res1]."""
        return self.decoder(self.encoder(x_B3HW))


def load(path: str | Path) -> NNET:
    """The official `scannet.pt` (`{'model': state_dict}`, keys with or without a leading
    `module.`), read with weights_only and loaded strictly, in eval mode."""
    state = read_state_dict(path)
    with torch.device("meta"):
        model = NNET()  # allocated below without initialisation: the strict load overwrites every tensor
    model = model.to_empty(device="cpu")
    assert {k for k, _ in model.named_buffers()} <= set(model.state_dict()), "a buffer the file would not set"
    load_checked(model, state, str(path))
    return model.eval()


class Generator(LabelNetwork):
    def load(self, weights: str | Path) -> nn.Module:
        return load(weights)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB -> Resize([480, 480]) (bilinear, on the PIL image) -> [0, 1] -> ImageNet mean/std, RGB order."""
        from torchvision.transforms import functional as TF

        x_3HW = TF.to_tensor(TF.resize(image.convert("RGB"), [RESOLUTION, RESOLUTION]))
        return TF.normalize(x_3HW, MEAN_RGB, STD_RGB)

    def predict(self, model: nn.Module, x_BCHW: torch.Tensor) -> list[torch.Tensor]:
        """Per image the full-resolution unit normal (3, H, W); kappa is discarded, as officially."""
        return list(model(x_BCHW)[-1][:, :3])

    def to_label(self, raw: torch.Tensor, size: tuple[int, int]) -> Image.Image:
        """[-1, 1] -> [0, 1] (clipped), resized to (W, H) bilinearly with align_corners=True (not
        re-normalised), x255 truncated to uint8, RGB."""
        n_13HW = ((raw.float().cpu()[None] + 1) * 0.5).clip(0, 1)
        W, H = size
        n_13HW = F.interpolate(n_13HW, size=(H, W), mode="bilinear", align_corners=True)
        return Image.fromarray((n_13HW[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8), "RGB")
