"""Deeper networks: residual blocks at every resolution of the encoder and the decoder (`model=resnet`).

    ResidualBlock(x) = x + conv3x3(elu(conv3x3(elu(x))))          (pre-activation, He et al. 2016)

`model.residual_blocks` = R blocks follow each stride-2 convolution of the encoder and precede each
transposed convolution of the decoder, at that resolution and width; everything else is the lecture's
network (guide.Encoder, model.Decoder), whose `at_resolution` hook these subclasses fill. A block's
second convolution starts at zero, so a new block is the identity and the deeper network starts as the
shallow one it extends. Measured at equal wall time in docs/results.md ("levers_training").
"""
from __future__ import annotations

from torch import Tensor, nn

from guide import Encoder
from model import Decoder
from vae.rules import is_positive_int


class ResidualBlock(nn.Module):
    """x + conv(elu(conv(elu(x)))) of two 3x3 convolutions; keeps the shape (B, channels, H, W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(nn.ELU(), nn.Conv2d(channels, channels, 3, padding=1),
                                      nn.ELU(), nn.Conv2d(channels, channels, 3, padding=1))
        nn.init.zeros_(self.residual[-1].weight)
        nn.init.zeros_(self.residual[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.residual(x)


def check_blocks(residual_blocks: object) -> int:
    if not is_positive_int(residual_blocks):
        raise ValueError(f"model.residual_blocks={residual_blocks!r}: must be a positive number of blocks per "
                         "resolution (model=conv for none)")
    return residual_blocks


class ResidualEncoder(Encoder):
    """guide.Encoder with `residual_blocks` blocks after each convolution."""

    def __init__(self, *args, residual_blocks: int = 1, **kwargs) -> None:
        self.blocks_per_resolution = check_blocks(residual_blocks)  # read by at_resolution while the layers are built
        super().__init__(*args, **kwargs)

    def at_resolution(self, channels: int) -> list[nn.Module]:
        return [ResidualBlock(channels) for _ in range(self.blocks_per_resolution)]


class ResidualDecoder(Decoder):
    """model.Decoder with `residual_blocks` blocks before each transposed convolution."""

    def __init__(self, *args, residual_blocks: int = 1, **kwargs) -> None:
        self.blocks_per_resolution = check_blocks(residual_blocks)
        super().__init__(*args, **kwargs)

    def at_resolution(self, channels: int) -> list[nn.Module]:
        return [ResidualBlock(channels) for _ in range(self.blocks_per_resolution)]
