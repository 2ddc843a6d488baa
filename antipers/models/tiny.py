"""``tiny``: a few-hundred-thousand-parameter Stable Diffusion for tests and the demo.

The VAE downsamples 4x, so 32-64 px images give 8-16 latent pixels per side.
Its numbers say nothing about privacy; it exercises every code path in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from antipers.models.arch import RandomInitModel, sd_vae

TINY_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
}
TINY_VAE = sd_vae((16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64)
TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "max_position_embeddings": 77,
}


@dataclass(frozen=True)
class TinyModel(RandomInitModel):
    """Random-init tiny Stable Diffusion; identical weights for one seed."""

    arch: ClassVar[str] = "tiny"
    unet: ClassVar[dict[str, Any]] = TINY_UNET
    vae: ClassVar[dict[str, Any]] = TINY_VAE
    text: ClassVar[dict[str, Any]] = TINY_TEXT
