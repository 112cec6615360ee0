"""The layers both networks share: the check that an image size fits the strided convolutions, and
the residual block of `model.residual_blocks` (guide.Encoder, model.Decoder)."""
from __future__ import annotations

from torch import Tensor, nn


def check_image_shape(image_shape: tuple[int, int, int], channels: list[int]) -> None:
    """Each conv layer halves height and width, so both must divide by 2**len(channels)."""
    _, height, width = image_shape
    factor = 2 ** len(channels)
    if height % factor or width % factor:
        raise ValueError(
            f"image shape {tuple(image_shape)} cannot be taken by a network with "
            f"{len(channels)} stride-2 layers (channels={list(channels)}): height and width "
            f"must be divisible by {factor}"
        )


class ResidualBlock(nn.Module):
    """x + conv(elu(conv(elu(x)))): a pre-activation residual block (He et al. 2016) of two 3x3
    convolutions that keeps the shape (B, channels, H, W). The second convolution starts at zero,
    so a new block is the identity and a deeper network starts as the shallow one it extends."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(nn.ELU(), nn.Conv2d(channels, channels, 3, padding=1),
                                      nn.ELU(), nn.Conv2d(channels, channels, 3, padding=1))
        nn.init.zeros_(self.residual[-1].weight)
        nn.init.zeros_(self.residual[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.residual(x)
