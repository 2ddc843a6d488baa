"""Sampling from a (personalized) bundle: DDIM with classifier-free guidance."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from antipers.models.bundle import DiffusionBundle

PROMPTS = ("a photo of sks person", "a dslr portrait of sks person")


@dataclass(frozen=True)
class DDIMSampler:
    """Anti-DreamBooth's evaluation: both prompts, 16 images each, 100 steps, guidance 7.5."""

    prompts: tuple[str, ...] = PROMPTS
    images_per_prompt: int = 16
    steps: int = 100
    guidance: float = 7.5
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not self.prompts or self.images_per_prompt < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("ddim: needs prompts, and images_per_prompt, steps, batch_size >= 1")

    def sample(
        self, bundle: DiffusionBundle, resolution: int, generator: torch.Generator
    ) -> torch.Tensor:
        """``len(prompts) * images_per_prompt`` images, prompt by prompt."""
        from diffusers import DDIMScheduler

        if resolution % bundle.latent_factor:
            factor = bundle.latent_factor
            raise ValueError(
                f"resolution {resolution} is not a multiple of the VAE factor {factor}"
            )
        side = resolution // bundle.latent_factor
        scheduler = DDIMScheduler.from_config(bundle.scheduler.config)
        scheduler.set_timesteps(self.steps)
        out = []
        with torch.no_grad():
            uncond = bundle.prompt_embeds([""])
            for prompt in self.prompts:
                cond = bundle.prompt_embeds([prompt])
                for start in range(0, self.images_per_prompt, self.batch_size):
                    n = min(self.batch_size, self.images_per_prompt - start)
                    shape = (n, bundle.latent_channels, side, side)
                    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
                    latents = noise.to(bundle.device) * scheduler.init_noise_sigma
                    embeds = torch.cat([uncond.expand(n, -1, -1), cond.expand(n, -1, -1)])
                    for t in scheduler.timesteps:
                        inp = scheduler.scale_model_input(torch.cat([latents, latents]), t)
                        with bundle.autocast():
                            pred = bundle.unet(inp, t, encoder_hidden_states=embeds).sample
                        pred_u, pred_c = pred.float().chunk(2)
                        guided = pred_u + self.guidance * (pred_c - pred_u)
                        latents = scheduler.step(guided, t, latents).prev_sample
                    out.append(bundle.decode(latents).cpu())
        return torch.cat(out)
