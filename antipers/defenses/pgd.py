"""The one PGD engine of the image defenses.

Budgets are L-inf, in pixel units over 255 (``eps=8`` is 8/255). The last projection
puts every pixel on the 8-bit grid *and* within the budget of its clean original, so
the budget holds on the PNG that is finally published, not only on the float tensor.
Optional expectation over transformation (EOT): each step the objective sees the
images through one countermeasure drawn at random; non-differentiable ones (JPEG,
purification) pass the gradient straight through.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from antipers.images import eps_to_unit

Objective = Callable[[torch.Tensor, int], torch.Tensor]  # (images, step) -> loss to maximize


@dataclass(frozen=True)
class PGDConfig:
    eps: float
    step_size: float
    steps: int
    random_start: bool = False


def project(x: torch.Tensor, clean: torch.Tensor, eps: float) -> torch.Tensor:
    """Onto the L-inf ball of radius ``eps``/255 around ``clean``, within ``[0, 1]``."""
    e = eps_to_unit(eps)
    return torch.max(torch.min(x, clean + e), clean - e).clamp(0.0, 1.0)


def project_png(x: torch.Tensor, clean: torch.Tensor, eps: float) -> torch.Tensor:
    """The nearest 8-bit image within the budget: round to the grid, then clip each
    pixel to the grid points that lie within ``eps``/255 of its clean value."""
    levels = torch.round(x.clamp(0, 1) * 255.0)
    c = clean * 255.0
    lo = torch.ceil(c - eps - 1e-4).clamp(0, 255)
    hi = torch.floor(c + eps + 1e-4).clamp(0, 255)
    return torch.max(torch.min(levels, hi), lo) / 255.0


def _through(transform: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    out = transform(x)
    if out.requires_grad:
        return out
    return x + (out.to(x.dtype) - x).detach()  # straight-through for non-differentiable ones


def pgd(
    x: torch.Tensor,
    clean: torch.Tensor,
    objective: Objective,
    config: PGDConfig,
    generator: torch.Generator,
    eot: Sequence[Callable[[torch.Tensor], torch.Tensor]] = (),
    on_step: Callable[[int, float], None] | None = None,
) -> torch.Tensor:
    """Signed-gradient ascent on ``objective`` from ``x``, projected after every step."""
    step = eps_to_unit(config.step_size)
    if config.random_start:
        e = eps_to_unit(config.eps)
        noise = (torch.rand(x.shape, generator=generator) * 2 - 1) * e
        x = project(x + noise.to(x.device), clean, config.eps)
    x = x.detach()
    for i in range(config.steps):
        x.requires_grad_(True)
        seen = x
        if eot:
            pick = int(torch.randint(len(eot), (1,), generator=generator))
            seen = _through(eot[pick], x)
        loss = objective(seen, i)
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x = project(x + step * grad.sign(), clean, config.eps)
        if on_step is not None:
            on_step(i, float(loss.detach()))
    return x.detach()


def uniform_noise_like(clean: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    """Random sign-uniform noise of the same budget (the "is PGD better than noise" check)."""
    e = eps_to_unit(eps)
    noise = (torch.rand(clean.shape, generator=generator) * 2 - 1) * e
    return project_png(clean + noise.to(clean.device), clean, eps)


def eot_entry(entry: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """An EOT entry, ``"blur"`` or ``{name: jpeg, quality: 50}``, as (name, parameters)."""
    if isinstance(entry, str):
        return entry, {}
    params = dict(entry)
    name = params.pop("name", None)
    if not isinstance(name, str):
        raise ValueError(f"eot: an entry with parameters needs a 'name', got {dict(entry)!r}")
    return name, params


def eot_transforms(
    entries: Sequence[str | Mapping[str, Any]], env: Any
) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Countermeasures (by name, or name and parameters) as functions of the images."""
    from antipers.registry import COUNTERMEASURES

    transforms = []
    for entry in entries:
        name, params = eot_entry(entry)
        cm = COUNTERMEASURES.build(name, params)
        transforms.append(lambda x, cm=cm: cm.apply(x, env))
    return transforms
