"""What ``mini-faces`` is trained with: the settings (``MiniTrainConfig``), the
prompts, the pool of generator faces (``training_faces``: a numpy stream of its own,
so no person of any ``synthetic`` dataset), and the VAE and UNet stages on the shared
resumable loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F

from antipers.models.bundle import DiffusionBundle
from antipers.models.training_loop import Loop, adamw_cosine, atomic_save, progress, run_loop
from antipers.models.training_run import cached, to_uint8
from antipers.ranges import Checked, Range

CLASS_PROMPTS = ("a photo of person", "a dslr portrait of person")


@dataclass(frozen=True)
class MiniTrainConfig(Checked):
    """Everything that determines the weights; recorded in the model card."""

    seed: int = 0
    pool: Annotated[int, Range(ge=1)] = 24576  # training faces, one person each
    resolution: Annotated[int, Range(ge=16)] = 64
    vae_steps: Annotated[int, Range(ge=1)] = 1000
    vae_batch: Annotated[int, Range(ge=1)] = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6  # on the KL summed over a latent, against the per-pixel L1
    unet_steps: Annotated[int, Range(ge=1)] = 4800
    unet_batch: Annotated[int, Range(ge=1)] = 32
    unet_lr: float = 4e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    prompt_dropout: Annotated[float, Range(ge=0, lt=1)] = 0.1
    checkpoint_every_s: float = 120.0
    eval_identities: int = 8  # for the model card's numbers
    eval_samples: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resolution % 16:
            raise ValueError(f"resolution: expected a multiple of 16, got {self.resolution}")


def face_pool(work: Path, config: MiniTrainConfig, chunk: int = 512) -> torch.Tensor:
    """``(pool, 3, R, R)`` uint8 training faces, generated once and cached in ``work``."""
    from antipers.data.synthetic import training_faces

    def build() -> torch.Tensor:
        parts = []
        for start in progress(range(0, config.pool, chunk), "faces", unit_scale=chunk):
            n = min(chunk, config.pool - start)
            parts.append(to_uint8(training_faces(start, n, config.resolution)))
        return torch.cat(parts)

    return cached(work / f"pool-{config.pool}-{config.resolution}.pt", build)


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0


def train_vae(
    bundle: DiffusionBundle, pool: torch.Tensor, work: Path, config: MiniTrainConfig
) -> None:
    """L1 reconstruction of posterior samples plus a small KL (SD's recipe without the
    perceptual and adversarial terms, which need weights we do not have)."""
    vae = bundle.vae.requires_grad_(True)
    optimizer, schedule = adamw_cosine(vae, config.vae_lr, config.vae_steps, config.warmup_steps)

    def step(i: int, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(pool), (config.vae_batch,), generator=gen)
        x = _as_float(pool[idx]).to(bundle.device) * 2 - 1
        dist = vae.encode(x).latent_dist
        noise = torch.randn(dist.mean.shape, generator=gen).to(x.device)
        recon = vae.decode(dist.mean + dist.std * noise).sample
        return F.l1_loss(recon, x) + config.kl_weight * dist.kl().mean()

    run_loop(Loop("vae", vae, optimizer, schedule, config.vae_steps), step, work, config)
    vae.requires_grad_(False).eval()


@torch.no_grad()
def pool_latents(
    bundle: DiffusionBundle, pool: torch.Tensor, work: Path, config: MiniTrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and stds of the whole pool (cached), in unscaled VAE units."""
    path = work / "latents.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return saved["mean"], saved["std"]
    means, stds = [], []
    for start in progress(range(0, len(pool), 256), "latents", unit_scale=256):
        x = _as_float(pool[start : start + 256]).to(bundle.device) * 2 - 1
        dist = bundle.vae.encode(x).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    atomic_save({"mean": mean, "std": std}, path)
    return mean, std


def train_unet(
    bundle: DiffusionBundle,
    mean: torch.Tensor,
    std: torch.Tensor,
    work: Path,
    config: MiniTrainConfig,
) -> None:
    """Epsilon prediction on scaled latents with the class prompts, a share of them
    dropped to "" so classifier-free guidance works; the EMA weights are what ship."""
    from diffusers.training_utils import EMAModel

    unet = bundle.unet.requires_grad_(True)
    optimizer, schedule = adamw_cosine(unet, config.unet_lr, config.unet_steps, config.warmup_steps)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=0.75)
    with torch.no_grad():
        prompts = bundle.prompt_embeds(["", *CLASS_PROMPTS])  # (3, 77, D), text encoder frozen
    scale = bundle.scaling_factor

    def step(i: int, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(mean), (config.unet_batch,), generator=gen)
        noise = torch.randn(mean[idx].shape, generator=gen)
        latents = ((mean[idx] + std[idx] * noise) * scale).to(bundle.device)
        which = torch.randint(1, len(prompts), (len(idx),), generator=gen)
        dropped = torch.rand(len(idx), generator=gen) < config.prompt_dropout
        embeds = prompts[torch.where(dropped, 0, which)]
        return bundle.training_loss(latents, embeds, gen)

    loop = Loop("unet", unet, optimizer, schedule, config.unet_steps, ema=ema)
    run_loop(loop, step, work, config)
    ema.copy_to(unet.parameters())
    unet.requires_grad_(False).eval()
