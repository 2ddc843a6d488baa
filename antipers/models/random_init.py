"""Bundles with random weights built in-process from configs, deterministic by seed.

``tiny`` makes tests and the demo fast; ``sd15-arch``/``sd21-arch`` are the real
architectures, right for time and memory, wrong for measuring protection.
"""

from __future__ import annotations

from typing import Any

import torch

from antipers.models.bundle import DiffusionBundle
from antipers.models.tokenizer import clip_tokenizer

SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def build_random_bundle(
    name: str,
    *,
    unet: dict[str, Any],
    vae: dict[str, Any],
    text: dict[str, Any],
    seed: int,
    scheduler: dict[str, Any] | None = None,
) -> DiffusionBundle:
    """Instantiate the diffusers/transformers classes of Stable Diffusion from configs.

    Each module is initialised under its own seed (``seed``, ``seed+1``, ...) inside a
    forked RNG, so the weights depend on the seed alone, not on what ran before.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    def seeded(offset: int, make: Any) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + offset)
            return make()

    tokenizer = clip_tokenizer(text.get("max_position_embeddings", 77))
    text_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **text,
    )
    return DiffusionBundle(
        name=name,
        vae=seeded(0, lambda: AutoencoderKL(**vae)),
        unet=seeded(1, lambda: UNet2DConditionModel(**unet)),
        text_encoder=seeded(2, lambda: CLIPTextModel(text_cfg)),
        tokenizer=tokenizer,
        scheduler=DDPMScheduler(**{**SD_SCHEDULER, **(scheduler or {})}),
    ).frozen()
