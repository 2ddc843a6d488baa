"""Direct Protective Optimization (APDM): Diffusion-DPO's preference loss, with the
protected subject's image as the dispreferred sample and a generic class image as the
preferred one, both under the personalization prompt.

For a pair (w: preferred, l: dispreferred) at shared noise and timestep, with denoising
errors e = ||eps - eps(x_t, c, t)||^2 of the trained model and the frozen reference:

    margin = (e_model(w) - e_ref(w)) - (e_model(l) - e_ref(l))
    loss   = -log sigmoid(-beta * margin)

so lowering the loss means denoising generic images at least as well as the reference
while denoising the subject worse than it: the model stops learning the subject. At
model == reference the margin is 0 and the loss is log 2; the gradient there is
beta/2 * (grad e_model(w) - grad e_model(l)), and nothing flows into the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from antipers.models.bundle import DiffusionBundle


def dpo_loss(
    model_w: torch.Tensor,
    ref_w: torch.Tensor,
    model_l: torch.Tensor,
    ref_l: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Mean over pairs of ``-log sigmoid(-beta * margin)``; the reference errors are
    treated as constants."""
    margin = (model_w - ref_w.detach()) - (model_l - ref_l.detach())
    return -F.logsigmoid(-beta * margin).mean()


def preference_loss(
    model: DiffusionBundle,
    reference: DiffusionBundle,
    preferred: torch.Tensor,
    dispreferred: torch.Tensor,
    embeds: torch.Tensor,
    beta: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """The DPO loss on latent pairs; each pair shares its noise and timestep, and model
    and reference see the same noised inputs (one batched pass each)."""
    n = preferred.shape[0]
    noise = model.noise_like(preferred, generator)
    t = model.sample_timesteps(n, generator)
    latents = torch.cat([preferred, dispreferred])
    noise, t, embeds = torch.cat([noise, noise]), torch.cat([t, t]), torch.cat([embeds, embeds])
    errors = model.denoising_loss(latents, embeds, noise, t, reduction="none")
    with torch.no_grad():
        ref = reference.denoising_loss(latents, embeds, noise, t, reduction="none")
    return dpo_loss(errors[:n], ref[:n], errors[n:], ref[n:], beta)
