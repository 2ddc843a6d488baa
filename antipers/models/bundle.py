"""The base-model bundle and the operations every stage shares.

Defenses (PGD through the diffusion loss), attacks (fine-tuning), sampling and
model-track training all go through these few methods, so the ``[-1, 1]``
conversion, latent scaling, prompt encoding and the noise-prediction target are
written once.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from antipers.device import autocast

VAE_PIXELS = 512 * 512  # per VAE pass: one photo at 512 px, 16 at 128 px and below


def vae_chunk(pixels_per_image: int) -> int:
    """Images per VAE pass: at most 16, and at most ``VAE_PIXELS`` pixels. At 512 px a
    pass over 4 photos holds gigabytes of full-resolution activations (the encoder's
    and decoder's 128-channel maps), so large photos go one at a time."""
    return max(1, min(16, VAE_PIXELS // max(pixels_per_image, 1)))


@dataclass(frozen=True)
class Posterior:
    """Diagonal Gaussian latents of a batch of images, unscaled as the VAE gives them."""

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float

    def __getitem__(self, idx: torch.Tensor) -> Posterior:
        return Posterior(self.mean[idx], self.std[idx], self.scaling_factor)

    def __len__(self) -> int:
        return self.mean.shape[0]

    def latents(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents: a draw on the CPU generator when given (the same numbers on
        every device), else the mean."""
        if generator is None:
            return self.mean.float() * self.scaling_factor
        return self.sample(torch.randn(self.mean.shape, generator=generator, dtype=torch.float32))

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        """Scaled latents at a given standard-normal draw (``latents`` draws one)."""
        z = self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)
        return z.float() * self.scaling_factor


@dataclass
class DiffusionBundle:
    """VAE, UNet, text encoder, tokenizer and noise scheduler of one base model."""

    name: str
    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    mixed_precision: bool = True
    fingerprint: str = ""  # what the weights are (the base model's spec); "" once trained
    source: str = ""  # where the weights came from (a local folder and its mtime)

    # ---- placement -------------------------------------------------------------------
    def to(self, device: torch.device | str) -> DiffusionBundle:
        device = torch.device(device)
        for module in self.modules():
            module.to(device)
        self.device = device
        return self

    def modules(self) -> list[torch.nn.Module]:
        return [self.vae, self.unet, self.text_encoder]

    def frozen(self) -> DiffusionBundle:
        """Eval mode, no gradients on any weight: the resident, shared state."""
        for module in self.modules():
            module.eval()
            module.requires_grad_(False)
        return self

    def replace(self, **components: Any) -> DiffusionBundle:
        """A bundle sharing every component but the ones given."""
        return dataclasses.replace(self, **components)

    def copy_of(self, *names: str) -> DiffusionBundle:
        """A bundle with deep copies of ``names`` ("unet", "text_encoder"), so training
        them leaves the resident base model untouched."""
        return self.replace(**{n: copy.deepcopy(getattr(self, n)) for n in names})

    def autocast(self) -> Any:
        return autocast(self.device, self.mixed_precision)

    # ---- geometry --------------------------------------------------------------------
    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    # ---- shared operations -----------------------------------------------------------
    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images in ``[0, 1]`` to scaled latents (a sample when ``generator`` is given,
        else the mean). Differentiable, for PGD through the VAE."""
        return self.posterior(images).latents(generator)

    def posterior(self, images: torch.Tensor, chunk: int | None = None) -> Posterior:
        """The VAE's posterior over the latents of ``images`` (in ``[0, 1]``): encode a
        fixed photo once, draw a fresh latent from it at every training step. Encoded
        ``chunk`` images at a time (default: ``vae_chunk``), so hundreds of class images
        fit on a card."""
        chunk = chunk or vae_chunk(images.shape[-2] * images.shape[-1])
        means, stds = [], []
        for start in range(0, max(images.shape[0], 1), chunk):
            x = images[start : start + chunk].to(self.device) * 2.0 - 1.0
            with self.autocast():
                dist = self.vae.encode(x).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
        return Posterior(torch.cat(means), torch.cat(stds), self.scaling_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in ``[0, 1]``, ``vae_chunk`` images per VAE pass."""
        f = self.latent_factor
        chunk = vae_chunk(latents.shape[-2] * f * latents.shape[-1] * f)
        images = []
        for part in latents.split(chunk):
            with self.autocast():
                x = self.vae.decode(part.to(self.device) / self.scaling_factor).sample
            images.append(((x.float() + 1.0) / 2.0).clamp(0.0, 1.0))
        return torch.cat(images)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(self.device)

    def prompt_embeds(self, prompts: list[str], text_encoder: Any = None) -> torch.Tensor:
        encoder = text_encoder if text_encoder is not None else self.text_encoder
        with self.autocast():
            return encoder(self.tokenize(prompts))[0]

    def noise_like(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Gaussian noise drawn on the CPU generator: same numbers on every device."""
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        return noise.to(latents.device)

    def sample_timesteps(
        self, n: int, generator: torch.Generator, t_range: tuple[int, int] | None = None
    ) -> torch.Tensor:
        lo, hi = t_range or (0, int(self.scheduler.config.num_train_timesteps))
        return torch.randint(lo, hi, (n,), generator=generator).to(self.device)

    def training_loss(
        self,
        latents: torch.Tensor,
        embeds: torch.Tensor,
        generator: torch.Generator,
        t_range: tuple[int, int] | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """The denoising loss of DreamBooth and of every PGD defense built on it:
        noise the latents at random timesteps and regress the scheduler's target."""
        noise = self.noise_like(latents, generator)
        t = self.sample_timesteps(latents.shape[0], generator, t_range)
        return self.denoising_loss(latents, embeds, noise, t, reduction)

    def denoising_loss(
        self,
        latents: torch.Tensor,
        embeds: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """The loss at given noise and timesteps (to compare two inputs on equal terms)."""
        noisy = self.scheduler.add_noise(latents, noise, t)
        with self.autocast():
            pred = self.unet(noisy, t, encoder_hidden_states=embeds).sample
        pred_type = self.scheduler.config.prediction_type
        if pred_type == "epsilon":
            target = noise
        elif pred_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, t)
        else:
            raise ValueError(f"{self.name}: unsupported prediction_type {pred_type!r}")
        loss = F.mse_loss(pred.float(), target.float(), reduction="none")
        if reduction == "none":
            return loss.mean(dim=(1, 2, 3))
        return loss.mean()

    # ---- persistence -----------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        """Write a diffusers folder (vae/, unet/, text_encoder/, tokenizer/, scheduler/)."""
        path = Path(path)
        for sub in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
            getattr(self, sub).save_pretrained(path / sub)
        (path / "model_index.json").write_text(_model_index(self))
        return path


def _model_index(bundle: DiffusionBundle) -> str:
    import json

    def entry(obj: Any) -> list[str]:
        module = type(obj).__module__.split(".")[0]
        return [module, type(obj).__name__]

    index = {
        "_class_name": "StableDiffusionPipeline",
        "vae": entry(bundle.vae),
        "unet": entry(bundle.unet),
        "text_encoder": entry(bundle.text_encoder),
        "tokenizer": entry(bundle.tokenizer),
        "scheduler": entry(bundle.scheduler),
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
    }
    return json.dumps(index, indent=2)
