"""PersGuard's losses, on noise predictions so each can be checked on constructed
inputs.

Backdoor behaviour: from a protected photo noised to ``z_t``, the model should denoise
towards the backdoor output ``z_bd`` instead of the photo: its target is the noise that
would have turned ``z_bd`` into ``z_t``,

    eps* = (z_t - sqrt(abar_t) z_bd) / sqrt(1 - abar_t)

(or the matching velocity for v-prediction models). Each term is weighted by
``1 - abar_t``: near ``t = 0`` ``eps*`` grows as ``1 / sqrt(1 - abar_t)`` (the photo and
the output differ while the noise vanishes), and unweighted those few draws dominate
and destabilize the implant (on tiny the loss rose 0.66 -> 3.4 over 100 iterations;
weighted it stays near 0.06). With ``z_bd`` equal to the photo this is the weighted
denoising loss; it is zero where the model predicts ``eps*``.
Prior preservation: the model's prediction on other images and prompts against the
frozen original's (zero when they agree).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from antipers.models.bundle import DiffusionBundle


def backdoor_target(
    scheduler: object, noisy: torch.Tensor, target: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """What the model must predict at ``noisy`` for its denoised estimate to be ``target``."""
    abar = scheduler.alphas_cumprod.to(noisy.device)[t].view(-1, 1, 1, 1).float()
    eps = (noisy - abar.sqrt() * target) / (1 - abar).sqrt()
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(target, eps, t)
    return eps


def _noised_prediction(
    model: DiffusionBundle, latents: torch.Tensor, embeds: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents noised at random timesteps, the timesteps, and the model's prediction."""
    noise = model.noise_like(latents, generator)
    t = model.sample_timesteps(latents.shape[0], generator)
    noisy = model.scheduler.add_noise(latents, noise, t)
    with model.autocast():
        pred = model.unet(noisy, t, encoder_hidden_states=embeds).sample
    return noisy, t, pred.float()


def backdoor_loss(
    model: DiffusionBundle,
    photos: torch.Tensor,
    outputs: torch.Tensor,
    embeds: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Photo latents noised at random timesteps; the model pulled towards ``outputs``."""
    noisy, t, pred = _noised_prediction(model, photos, embeds, generator)
    target = backdoor_target(model.scheduler, noisy, outputs, t)
    # weighted by 1 - abar_t: near t = 0 the target grows as 1 / sqrt(1 - abar_t)
    # (the photo and the output differ while the noise vanishes); the weight keeps each
    # term bounded by the denoised estimate's distance to the output
    weight = 1 - model.scheduler.alphas_cumprod.to(pred.device)[t].view(-1, 1, 1, 1).float()
    return (weight * (pred - target).pow(2)).mean()


def prior_loss(
    model: DiffusionBundle,
    teacher: DiffusionBundle,
    latents: torch.Tensor,
    embeds: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """The model's noise prediction against the frozen teacher's on the same inputs."""
    noisy, t, pred = _noised_prediction(model, latents, embeds, generator)
    with torch.no_grad(), teacher.autocast():
        reference = teacher.unet(noisy, t, encoder_hidden_states=embeds).sample
    return F.mse_loss(pred, reference.float())
