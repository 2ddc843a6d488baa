"""How well a set of published photos is protected, and how much of it survives the
attacker's countermeasures: the numbers ``POST /v1/score`` returns.

Protection strength is the base model's diffusion-loss gain: the denoising loss on the
protected photo minus the loss on its clean original (or, without originals, on a
purified copy), at fixed timesteps and fixed noise, so the same upload always gets the
same number. Perturbations that hinder fine-tuning (ASPL, SimAC, CAP) raise this loss.

    strength  = gain / (gain + GAIN_SCALE)           (0 when gain <= 0)
    survival  = clip(worst_gain / gain, 0, 1)         worst over the countermeasures
    overall   = strength * (1 + survival) / 2         in [0, 1)

so the overall score grows with protection and with how much of it survives.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from antipers.attacks.countermeasures import AttackEnv
from antipers.data.identity import IdentitySet
from antipers.models.bundle import DiffusionBundle
from antipers.registry import COUNTERMEASURES
from antipers.spec import ComponentSpec

TIMESTEP_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
NOISE_SEED = 20240601
GAIN_SCALE = 0.05  # a loss gain of 0.05 scores a strength of 0.5
PROMPT = "a photo of sks person"
DEFAULT_COUNTERMEASURES = ({"name": "jpeg", "quality": 75}, "blur", "resize", "purify")


def countermeasure_specs(entries: Sequence[Any]) -> tuple[ComponentSpec, ...]:
    """Validated countermeasures (names or ``{name: ..., **params}``); raises SpecError."""
    return tuple(
        ComponentSpec.parse(e, COUNTERMEASURES, f"countermeasures[{i}]")
        for i, e in enumerate(entries)
    )


MICRO_BATCH = 4  # every forward pass has this shape: a photo's number never depends on
# what it was batched with (kernels are chosen by shape and layout; samples do not mix)


@torch.no_grad()
def diffusion_loss(
    bundle: DiffusionBundle, images: torch.Tensor, micro_batch: int = MICRO_BATCH
) -> np.ndarray:
    """Per-photo denoising loss, averaged over fixed timesteps, with the same noise for
    every photo; computed in padded micro-batches of one fixed shape, so the result is
    bitwise the same whether a photo comes alone, with its set, or batched with other
    requests."""
    out = []
    for start in range(0, len(images), micro_batch):
        chunk = images[start : start + micro_batch]
        pad = micro_batch - len(chunk)
        if pad:
            chunk = torch.cat([chunk, chunk[:1].expand(pad, -1, -1, -1)])
        # one memory layout too: convolution kernels differ by layout (decoded photos
        # arrive channels-last), and so would the last bits of the loss
        chunk = chunk.contiguous(memory_format=torch.contiguous_format)
        out.append(_loss_batch(bundle, chunk)[: micro_batch - pad])
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def _loss_batch(bundle: DiffusionBundle, images: torch.Tensor) -> np.ndarray:
    images = images.to(bundle.device)
    latents = bundle.encode(images)
    embeds = bundle.prompt_embeds([PROMPT] * len(images))
    total = int(bundle.scheduler.config.num_train_timesteps)
    losses = torch.zeros(len(images), device=bundle.device)
    for k, fraction in enumerate(TIMESTEP_FRACTIONS):
        gen = torch.Generator().manual_seed(NOISE_SEED + k)
        noise = torch.randn((1, *latents.shape[1:]), generator=gen).to(latents.device)
        t = torch.full((len(images),), int(fraction * total), device=bundle.device)
        losses += bundle.denoising_loss(
            latents, embeds, noise.expand_as(latents), t, reduction="none"
        )
    return (losses / len(TIMESTEP_FRACTIONS)).float().cpu().numpy()


def overall(gain: np.ndarray, worst: np.ndarray) -> np.ndarray:
    strength = np.where(gain > 0, gain / (gain + GAIN_SCALE), 0.0)
    survival = np.where(gain > 0, np.clip(worst / np.where(gain > 0, gain, 1.0), 0, 1), 0.0)
    return strength * (1 + survival) / 2


def _apply(spec: ComponentSpec, images: torch.Tensor, env: AttackEnv) -> torch.Tensor:
    return spec.build(COUNTERMEASURES).apply(images, env)


@dataclass
class Upload:
    """The photos of one request, in the image contract, at one resolution."""

    protected: torch.Tensor
    clean: torch.Tensor | None = None  # originals of ``protected``, same order
    references: torch.Tensor | None = None  # other clean photos of the person

    def __post_init__(self) -> None:
        if self.clean is not None and self.clean.shape != self.protected.shape:
            raise ValueError(
                f"clean: {len(self.clean)} originals for {len(self.protected)} protected "
                "photos; they must pair up in order"
            )


@dataclass
class _Plan:
    """One upload's photos that need a diffusion loss, gathered before any is computed,
    so a batch of uploads shares padded micro-batches."""

    upload: Upload
    reference_kind: str
    labels: list[str]  # countermeasure labels, in order
    batches: list[torch.Tensor]  # protected, reference, then (after, reference_after) per label


def _plan(
    bundle: DiffusionBundle,
    upload: Upload,
    countermeasures: Sequence[ComponentSpec] | None,
    seed: int,
) -> _Plan:
    if countermeasures is None:
        countermeasures = countermeasure_specs(DEFAULT_COUNTERMEASURES)
    protected = upload.protected.to(bundle.device)
    identity = IdentitySet(
        "upload",
        "upload",
        set_A=upload.references if upload.references is not None else upload.protected,
        set_B=upload.protected,
        set_C=upload.clean if upload.clean is not None else upload.protected,
    )

    def env() -> AttackEnv:  # a fresh, seeded stream per use: answers are repeatable
        return AttackEnv(bundle, identity, torch.Generator().manual_seed(seed))

    if upload.clean is not None:
        reference, reference_kind = upload.clean.to(bundle.device), "clean originals"
    else:
        purify = countermeasure_specs(["purify"])[0]
        reference, reference_kind = _apply(purify, protected, env()), "purified copies"
    batches = [protected, reference]
    names = [spec.name for spec in countermeasures]
    labels = []
    for spec in countermeasures:
        batches += [_apply(spec, protected, env()), _apply(spec, reference, env())]
        labels.append(
            spec.name if names.count(spec.name) == 1 else f"{spec.name}{spec.params_json()}"
        )
    return _Plan(upload, reference_kind, labels, [b.detach().cpu() for b in batches])


def score_uploads(
    bundle: DiffusionBundle,
    jobs: Sequence[tuple[Upload, Sequence[ComponentSpec] | None]],
    faces: Any = None,
    seed: int = 0,
    micro_batch: int = MICRO_BATCH,
) -> list[dict[str, Any] | Exception]:
    """The response bodies of several ``/v1/score`` requests, their losses computed in
    shared micro-batches (fewer padded passes; each number as if scored alone). A job
    whose countermeasures fail gets its exception in its place; the others are scored."""
    plans: list[_Plan | Exception] = []
    for upload, countermeasures in jobs:
        try:
            plans.append(_plan(bundle, upload, countermeasures, seed))
        except (ValueError, RuntimeError) as exc:
            plans.append(exc)
    pending = [b for plan in plans if isinstance(plan, _Plan) for b in plan.batches]
    losses: Iterator[np.ndarray] = iter(())
    if pending:
        pooled = diffusion_loss(bundle, torch.cat(pending), micro_batch)
        losses = iter(np.split(pooled, np.cumsum([len(b) for b in pending])[:-1]))
    return [
        plan
        if isinstance(plan, Exception)
        else _body(plan, [next(losses) for _ in plan.batches], faces)
        for plan in plans
    ]


def score_upload(
    bundle: DiffusionBundle,
    upload: Upload,
    countermeasures: Sequence[ComponentSpec] | None = None,
    faces: Any = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The response body of ``/v1/score`` (without request metadata)."""
    (body,) = score_uploads(bundle, [(upload, countermeasures)], faces, seed)
    if isinstance(body, Exception):
        raise body
    return body


def _body(plan: _Plan, losses: list[np.ndarray], faces: Any) -> dict[str, Any]:
    upload = plan.upload
    gain = losses[0] - losses[1]
    survives = {label: losses[2 + 2 * k] - losses[3 + 2 * k] for k, label in enumerate(plan.labels)}
    worst = np.min(np.stack(list(survives.values())), axis=0) if survives else gain
    scores = overall(gain, worst)
    photos: list[dict[str, Any]] = [
        {
            "index": i,
            "loss_gain": float(gain[i]),
            "survives": {k: float(v[i]) for k, v in survives.items()},
            "worst_gain": float(worst[i]),
            "score": float(scores[i]),
        }
        for i in range(len(upload.protected))
    ]
    if upload.clean is not None:
        from antipers.metrics.budget import linf_255, psnr, ssim

        protected, clean = upload.protected, upload.clean
        budgets = zip(
            linf_255(protected, clean), psnr(protected, clean), ssim(protected, clean), strict=True
        )
        for photo, (li, ps, ss) in zip(photos, budgets, strict=True):
            photo["budget"] = {"linf_255": float(li), "psnr_db": _finite(ps), "ssim": float(ss)}
    if faces is not None:
        _face_fields(photos, faces, upload)
    return {
        "reference": plan.reference_kind,
        "countermeasures": list(survives),
        "photos": photos,
        "set": {
            "loss_gain": float(gain.mean()),
            "worst_gain": float(worst.mean()),
            "score": float(scores.mean()),
        },
    }


def _finite(value: float) -> float | None:
    """JSON has no infinity: an unchanged photo's PSNR is reported as null."""
    value = float(value)
    return value if np.isfinite(value) else None


def _face_fields(photos: list[dict[str, Any]], faces: Any, upload: Upload) -> None:
    """Found or not; cosine similarity to the mean clean face where clean photos exist."""
    boxes = faces.detect(upload.protected)
    clean_sets = [x for x in (upload.clean, upload.references) if x is not None]
    mean = None
    if clean_sets:
        vecs = faces.embed(torch.cat(clean_sets))
        vecs = vecs[~np.isnan(vecs).any(axis=1)]
        if len(vecs):
            mean = vecs.mean(axis=0)
            mean = mean / np.linalg.norm(mean)
    embeddings = faces.embed(upload.protected) if mean is not None else None
    for i, photo in enumerate(photos):
        face: dict[str, Any] = {"found": boxes[i] is not None}
        if embeddings is not None and boxes[i] is not None:
            face["identity_similarity"] = float(embeddings[i] @ mean)
        photo["face"] = face
