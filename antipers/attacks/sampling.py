"""Sampling from a (personalized) bundle with classifier-free guidance.

One generation loop for the evaluation images, the class images of prior
preservation and anything else that samples; the noise scheduler is a setting.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from antipers.models.bundle import DiffusionBundle
from antipers.ranges import Checked, Range

PROMPTS = ("a photo of sks person", "a dslr portrait of sks person")
SchedulerName = Literal["ddim", "dpm", "euler", "pndm", "ddpm"]
SCHEDULERS: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "ddpm": "DDPMScheduler",
}


def make_scheduler(name: str, bundle: DiffusionBundle, steps: int) -> object:
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    # PNDM as Stable Diffusion ships it: PLMS only (its Runge-Kutta warm-up needs more
    # steps than a short run has).
    extra = {"skip_prk_steps": True} if name == "pndm" else {}
    scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(bundle.scheduler.config, **extra)
    scheduler.set_timesteps(steps, device=bundle.device)
    return scheduler


def generate(
    bundle: DiffusionBundle,
    prompt: str,
    n: int,
    resolution: int,
    generator: torch.Generator,
    *,
    steps: int,
    guidance: float,
    scheduler: str = "ddim",
    batch_size: int = 8,
) -> torch.Tensor:
    """``n`` images of ``prompt`` at ``resolution``; the same generator state gives the
    same images (initial noise is drawn on the CPU, so on any device)."""
    factor = bundle.latent_factor
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE factor {factor}")
    side = resolution // factor
    out = []
    with torch.no_grad():
        uncond = bundle.prompt_embeds([""])
        cond = bundle.prompt_embeds([prompt])
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            sched = make_scheduler(scheduler, bundle, steps)
            takes_generator = "generator" in inspect.signature(sched.step).parameters
            noise = torch.randn((m, bundle.latent_channels, side, side), generator=generator)
            latents = noise.to(bundle.device) * sched.init_noise_sigma
            embeds = torch.cat([uncond.expand(m, -1, -1), cond.expand(m, -1, -1)])
            for t in sched.timesteps:
                inp = sched.scale_model_input(torch.cat([latents, latents]), t)
                with bundle.autocast():
                    pred = bundle.unet(inp, t, encoder_hidden_states=embeds).sample
                pred_u, pred_c = pred.float().chunk(2)
                guided = pred_u + guidance * (pred_c - pred_u)
                extra = {"generator": generator} if takes_generator else {}
                latents = sched.step(guided, t, latents, **extra).prev_sample
            out.append(bundle.decode(latents).cpu())
    return torch.cat(out)


@dataclass(frozen=True)
class GuidedSampler(Checked):
    """Anti-DreamBooth's evaluation: both prompts, 16 images each, 100 steps, guidance 7.5."""

    prompts: tuple[str, ...] = PROMPTS
    images_per_prompt: Annotated[int, Range(ge=1)] = 16
    steps: Annotated[int, Range(ge=1)] = 100
    guidance: float = 7.5
    scheduler: SchedulerName = "ddim"
    batch_size: Annotated[int, Range(ge=1)] = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prompts:
            raise ValueError("prompts: give at least one prompt")

    def image_prompts(self) -> tuple[str, ...]:
        """The prompt of each image ``sample`` returns, in order."""
        return tuple(p for p in self.prompts for _ in range(self.images_per_prompt))

    def sample(
        self, bundle: DiffusionBundle, resolution: int, generator: torch.Generator
    ) -> torch.Tensor:
        """``len(prompts) * images_per_prompt`` images, prompt by prompt."""
        return torch.cat(
            [
                generate(
                    bundle,
                    prompt,
                    self.images_per_prompt,
                    resolution,
                    generator,
                    steps=self.steps,
                    guidance=self.guidance,
                    scheduler=self.scheduler,
                    batch_size=self.batch_size,
                )
                for prompt in self.prompts
            ]
        )
