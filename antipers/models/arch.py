"""``sd15-arch`` and ``sd21-arch``: the real Stable Diffusion architectures, random weights.

For measuring time and memory of defenses and attacks at true scale without
weights. Configs follow the published diffusers configs of SD 1.5 and SD 2.1-base.
``RandomInitModel`` and ``sd_vae`` also build ``tiny``, a scaled-down SD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from antipers.models.bundle import DiffusionBundle
from antipers.models.random_init import build_random_bundle


def sd_vae(
    widths: tuple[int, ...],
    layers_per_block: int,
    norm_num_groups: int,
    sample_size: int,
    **extra: Any,
) -> dict[str, Any]:
    """Stable Diffusion's VAE layout (RGB, 4 latent channels, one block per width) at
    any size, so the small models are this VAE scaled down rather than copies of it."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": widths,
        "down_block_types": ("DownEncoderBlock2D",) * len(widths),
        "up_block_types": ("UpDecoderBlock2D",) * len(widths),
        "latent_channels": 4,
        "layers_per_block": layers_per_block,
        "norm_num_groups": norm_num_groups,
        "sample_size": sample_size,
        **extra,
    }


_SD_VAE = sd_vae(
    (128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
_SD_UNET_BASE = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
SD15_UNET = {**_SD_UNET_BASE, "cross_attention_dim": 768, "attention_head_dim": 8}
SD21_UNET = {
    **_SD_UNET_BASE,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
}
SD15_TEXT = {  # CLIP ViT-L/14 text tower
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
SD21_TEXT = {  # OpenCLIP ViT-H/14 text tower, penultimate layer (23 of 24)
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 512,
}


@dataclass(frozen=True)
class RandomInitModel:
    """A base model built from its configs with random weights, identical for one seed;
    a subclass gives the configs (the VAE defaults to Stable Diffusion's)."""

    seed: int = 0
    arch: ClassVar[str]
    unet: ClassVar[dict[str, Any]]
    text: ClassVar[dict[str, Any]]
    vae: ClassVar[dict[str, Any]] = _SD_VAE

    def load(self, device: torch.device) -> DiffusionBundle:
        bundle = build_random_bundle(
            self.arch, unet=self.unet, vae=self.vae, text=self.text, seed=self.seed
        )
        return bundle.to(device)


@dataclass(frozen=True)
class SD15Arch(RandomInitModel):
    """Stable Diffusion 1.5 architecture (860M UNet), random weights."""

    arch: ClassVar[str] = "sd15-arch"
    unet: ClassVar[dict[str, Any]] = SD15_UNET
    text: ClassVar[dict[str, Any]] = SD15_TEXT


@dataclass(frozen=True)
class SD21Arch(RandomInitModel):
    """Stable Diffusion 2.1-base architecture (865M UNet, OpenCLIP-H text), random weights."""

    arch: ClassVar[str] = "sd21-arch"
    unet: ClassVar[dict[str, Any]] = SD21_UNET
    text: ClassVar[dict[str, Any]] = SD21_TEXT
