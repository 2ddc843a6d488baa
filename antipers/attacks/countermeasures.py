"""What an attacker does to the photos before personalizing on them.

Each countermeasure maps the image contract to itself; a spec chains them
(``countermeasure: [{name: jpeg, quality: 75}, {name: resize, factor: 2}]``).
``check`` runs before any work starts, so a setting the identity cannot satisfy
(``mix`` with more photos than the set has) fails at once.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F

from antipers.data.identity import IdentitySet
from antipers.images import from_uint8, to_uint8
from antipers.models.bundle import DiffusionBundle
from antipers.ranges import Checked, Range

NOISE_SIGMA = Range(ge=0, le=255, note="pixel units")  # Noise's, and Upscale's first step


@dataclass
class AttackEnv:
    """What a countermeasure may use besides the photos."""

    bundle: DiffusionBundle
    identity: IdentitySet
    generator: torch.Generator


@dataclass(frozen=True)
class NoCountermeasure:
    """Train on the published photos as they are."""

    def apply(self, images: torch.Tensor, env: AttackEnv) -> torch.Tensor:
        return images


@dataclass(frozen=True)
class JPEG(Checked):
    """JPEG compression at ``quality`` (the literature uses 50-90)."""

    quality: Annotated[int, Range(ge=1, le=100)] = 75

    def apply(self, images: torch.Tensor, env: AttackEnv) -> torch.Tensor:
        from PIL import Image

        out = []
        for arr in to_uint8(images):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=self.quality)
            buf.seek(0)
            out.append(np.asarray(Image.open(buf).convert("RGB")))
        return from_uint8(np.stack(out)).to(images.device)


@dataclass(frozen=True)
class Resize(Checked):
    """Down by ``factor`` and back up (x2, x4 in the literature): removes high frequencies."""

    factor: Annotated[float, Range(ge=1)] = 2.0
    mode: Literal["bilinear", "bicubic", "area", "nearest"] = "bicubic"

    def apply(self, images: torch.Tensor, env: AttackEnv) -> torch.Tensor:
        h, w = images.shape[-2:]
        small = (max(1, round(h / self.factor)), max(1, round(w / self.factor)))
        kw = {"antialias": True} if self.mode in ("bilinear", "bicubic") else {}
        down = F.interpolate(images, size=small, mode=self.mode, **kw)
        return F.interpolate(down, size=(h, w), mode=self.mode, **kw).clamp(0, 1)


@dataclass(frozen=True)
class Blur(Checked):
    """Gaussian blur (kernel 5-7 in the literature)."""

    kernel: Annotated[int, Range(ge=1)] = 5
    sigma: Annotated[float, Range(gt=0)] = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel: expected an odd size >= 1, got {self.kernel}")

    def apply(self, images: torch.Tensor, env: AttackEnv) -> torch.Tensor:
        from torchvision.transforms.functional import gaussian_blur

        return gaussian_blur(images, [self.kernel, self.kernel], [self.sigma, self.sigma])


@dataclass(frozen=True)
class Flip(Checked):
    """Horizontal flip of each photo with probability ``p`` (1: every photo)."""

    p: Annotated[float, Range(ge=0, le=1)] = 1.0

    def apply(self, images: torch.Tensor, env: AttackEnv) -> torch.Tensor:
        chosen = torch.rand(images.shape[0], generator=env.generator) < self.p
        out = images.clone()
        out[chosen.to(images.device)] = images[chosen.to(images.device)].flip(-1)
        return out


@dataclass(frozen=True)
class Noise(Checked):
    """Gaussian noise of standard deviation ``sigma`` in pixel units over 255 (12.75:
    0.05 of the range), clipped to the image range: the simplest robust-mimicry
    countermeasure (Hönig et al., ICLR 2025, "Gaussian noising"). ``sigma=0`` is the
    identity."""

    sigma: Annotated[float, NOISE_SIGMA] = 12.75

    def apply(self, images: torch.Tensor, env: AttackEnv) -> torch.Tensor:
        if self.sigma == 0:
            return images
        noise = torch.randn(images.shape, generator=env.generator, dtype=torch.float32)
        return (images + noise.to(images.device) * (self.sigma / 255.0)).clamp(0, 1)


@dataclass(frozen=True)
class Purify(Checked):
    """DiffPure-style purification with the base model: noise each photo to timestep
    ``t`` and denoise it back with ``steps`` DDIM steps (unconditional). ``t=0`` is
    the identity."""

    t: Annotated[int, Range(ge=0)] = 100
    steps: Annotated[int, Range(ge=1)] = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.t and self.steps > self.t:
            raise ValueError(f"steps ({self.steps}) cannot exceed the timestep t ({self.t})")

    def apply(self, images: torch.Tensor, env: AttackEnv) -> torch.Tensor:
        if self.t == 0:
            return images
        from diffusers import DDIMScheduler

        bundle = env.bundle
        train_steps = int(bundle.scheduler.config.num_train_timesteps)
        if self.t >= train_steps:
            raise ValueError(f"purify.t: expected < {train_steps}, got {self.t}")
        sched = DDIMScheduler.from_config(bundle.scheduler.config)
        spacing = self.t // self.steps  # the DDIM grid whose points below t are `steps` many
        sched.set_timesteps(train_steps // spacing, device=bundle.device)
        timesteps = [t for t in sched.timesteps if t <= self.t][: self.steps]
        with torch.no_grad():
            latents = bundle.encode(images, env.generator)
            # noise exactly to the first timestep the denoiser starts from
            start = torch.full((latents.shape[0],), int(timesteps[0]), device=bundle.device)
            noisy = bundle.scheduler.add_noise(
                latents, bundle.noise_like(latents, env.generator), start
            )
            embeds = bundle.prompt_embeds([""]).expand(latents.shape[0], -1, -1)
            for t in timesteps:
                with bundle.autocast():
                    eps = bundle.unet(noisy, t, encoder_hidden_states=embeds).sample
                noisy = sched.step(eps.float(), t, noisy).prev_sample
            return bundle.decode(noisy).to(images.device)


@dataclass(frozen=True)
class Mix(Checked):
    """Replace ``k`` of the protected photos by clean ones from ``set_C``: the "one
    clean photo slipped in" setting of the literature (APDM's ablation)."""

    k: Annotated[int, Range(ge=0)] = 1

    def check(self, identity: IdentitySet, n_protected: int | None = None) -> None:
        n_clean = identity.set_C.shape[0]
        n_pub = identity.set_B.shape[0] if n_protected is None else n_protected
        if self.k > min(n_clean, n_pub):
            raise ValueError(
                f"mix.k={self.k}: identity {identity.identity!r} has {n_pub} published and "
                f"{n_clean} clean (set_C) photos; k must be at most {min(n_clean, n_pub)}"
            )

    def apply(self, images: torch.Tensor, env: AttackEnv) -> torch.Tensor:
        self.check(env.identity, images.shape[0])
        out = images.clone()
        slots = torch.randperm(images.shape[0], generator=env.generator)[: self.k]
        clean = torch.randperm(env.identity.set_C.shape[0], generator=env.generator)[: self.k]
        out[slots] = env.identity.set_C[clean].to(images.device, images.dtype)
        return out
