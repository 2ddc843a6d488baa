"""The one fine-tuning loop behind every personalization (DreamBooth, LoRA) and the
surrogate training of the PGD defenses: the denoising loss on (image, prompt)
batches, with optional prior preservation on class images."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from antipers.attacks.streamed_adamw import StatePlace, StreamedAdamW, uses_fused
from antipers.models.bundle import DiffusionBundle, Posterior
from antipers.models.recompute import checkpointed

log = logging.getLogger(__name__)

LRSchedule = Literal["constant", "constant_with_warmup", "linear", "cosine"]


@dataclass(frozen=True)
class TrainConfig:
    """``steps`` counts optimizer steps; each takes ``grad_accum`` micro-batches of
    ``batch_size`` instance photos (plus as many class images under prior preservation)."""

    steps: int
    lr: float
    batch_size: int = 1
    grad_accum: int = 1
    lr_schedule: LRSchedule = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    gradient_checkpointing: bool = False
    prior_weight: float = 0.0
    # images one UNet pass holds (None: a step's instance and class images in one pass)
    step_images: int | None = None
    # where AdamW's moments live ("device": torch's optimizer; else ``StreamedAdamW``)
    optimizer_state: StatePlace = "device"
    # each parameter updated inside backward, as its gradient completes (streamed)
    steps_in_backward: bool = False


@dataclass
class TrainData:
    """``posterior`` and ``class_posterior``: the images already encoded, for a caller
    that trains many short runs on the same photos (a surrogate's 3-step phases)."""

    images: torch.Tensor
    prompt: str
    class_images: torch.Tensor | None = None
    class_prompt: str = ""
    class_posterior: Posterior | None = None
    posterior: Posterior | None = None


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one (``uses_fused``)."""
    fused = uses_fused(params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def _optimizer(
    params: list[torch.nn.Parameter], config: TrainConfig, single_pass: bool
) -> tuple[torch.optim.AdamW | StreamedAdamW, Callable[[torch.Tensor], None]]:
    """The optimizer and the backward a step runs. ``single_pass``: a step is one backward
    pass. Steps inside backward need that; with accumulation or a split step the first
    pass's gradients wait for the others, so with the moments on the device torch's
    AdamW does the step."""
    in_backward = config.steps_in_backward and single_pass
    if config.optimizer_state == "device" and not in_backward:
        return adamw(params, config.lr, config.weight_decay), torch.Tensor.backward
    optimizer = StreamedAdamW(
        params,
        config.lr,
        config.weight_decay,
        config.max_grad_norm,
        config.optimizer_state,
        total_steps=config.steps,
    )
    return optimizer, optimizer.backprop if in_backward else torch.Tensor.backward


def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled epochs over ``n`` items, ``batch_size`` at a time."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


@contextlib.contextmanager
def training_mode(
    bundle: DiffusionBundle, text_encoder: bool, checkpointing: bool
) -> Iterator[None]:
    """UNet (and text encoder) in train mode, gradient checkpointing on; restored after."""
    modules = [bundle.unet] + ([bundle.text_encoder] if text_encoder else [])
    for module in modules:
        module.train()
    try:
        with checkpointed(modules, checkpointing):
            yield
    finally:
        for module in modules:
            module.eval()


class _Embeds:
    """Prompt embeddings: recomputed with gradients when the text encoder trains,
    else computed once."""

    def __init__(self, bundle: DiffusionBundle, trainable: bool) -> None:
        self.bundle, self.trainable = bundle, trainable
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompt: str, n: int) -> torch.Tensor:
        if self.trainable:
            return self.bundle.prompt_embeds([prompt] * n)
        if prompt not in self._cache:
            with torch.no_grad():
                self._cache[prompt] = self.bundle.prompt_embeds([prompt])
        return self._cache[prompt].expand(n, -1, -1)

    def batch(self, parts: list[tuple[str, int]]) -> torch.Tensor:
        """Embeddings of ``n`` copies of each prompt, in one text-encoder pass."""
        if self.trainable:
            return self.bundle.prompt_embeds([p for p, n in parts for _ in range(n)])
        return torch.cat([self(p, n) for p, n in parts])


class _Chunk(NamedTuple):
    """One part of a step's batch (the instance photos, or the class images), noised."""

    latents: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    prompt: str


def _draw(
    bundle: DiffusionBundle, posterior: Posterior, prompt: str, generator: torch.Generator
) -> _Chunk:
    """Latents, noise and timesteps in the order ``training_loss`` draws them, so a
    step's random numbers do not depend on how its chunks are batched."""
    latents = posterior.latents(generator)
    noise = bundle.noise_like(latents, generator)
    return _Chunk(latents, noise, bundle.sample_timesteps(len(latents), generator), prompt)


def _chunked_loss(
    bundle: DiffusionBundle, chunks: list[_Chunk], embeds: _Embeds, prior_weight: float
) -> torch.Tensor:
    """Instance loss plus ``prior_weight`` times the class loss, from one UNet (and text
    encoder) pass over both chunks, as DreamBooth's reference scripts batch them: on a
    small model one pass of two is much cheaper than two of one."""
    latents, noise, t = (torch.cat([c[i] for c in chunks]) for i in range(3))
    sizes = [len(c.latents) for c in chunks]
    cond = embeds.batch([(c.prompt, n) for c, n in zip(chunks, sizes, strict=True)])
    per_image = bundle.denoising_loss(latents, cond, noise, t, reduction="none")
    losses = [part.mean() for part in per_image.split(sizes)]
    return losses[0] + prior_weight * losses[1] if len(losses) > 1 else losses[0]


def one_pass(images: int, step_images: int | None) -> bool:
    """Whether a step of ``images`` images runs as one UNet pass and one backward."""
    return step_images is None or images <= step_images


def _backward(
    bundle: DiffusionBundle,
    chunks: list[_Chunk],
    embeds: _Embeds,
    prior_weight: float,
    grad_accum: int,
    step_images: int | None,
    backprop: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> float:
    """Back-propagate one micro-batch's loss (divided by ``grad_accum``); its value.

    Within ``step_images`` images, one pass (``_chunked_loss``). Beyond, each part
    (instance photos, class images) and each piece of a part takes its own pass and
    backward, weighted by its share of the part's mean: the same gradient summed in
    another order (equal up to float rounding), with one piece's activations held at a
    time. The draws are made before, so they do not depend on the split. ``backprop``
    runs the one pass's backward (a streamed optimizer's steps inside it); a split step
    accumulates its gradients with plain backward passes."""
    if one_pass(sum(len(c.latents) for c in chunks), step_images):
        loss = _chunked_loss(bundle, chunks, embeds, prior_weight)
        backprop(loss / grad_accum)
        return float(loss.detach())
    if step_images < 1:
        raise ValueError(f"step_images: at least 1 image per UNet pass, got {step_images}")
    if len(chunks) > 2:  # the weights below are the instance part's and the class part's
        raise ValueError(f"a step has an instance and a class part, got {len(chunks)}")
    value = torch.zeros((), device=bundle.device)  # summed on the device: one sync
    for part, weight in zip(chunks, (1.0, prior_weight), strict=False):
        n = len(part.latents)
        for start in range(0, n, step_images):
            piece = _Chunk(*(x[start : start + step_images] for x in part[:3]), part.prompt)
            share = weight * len(piece.latents) / n
            loss = _chunked_loss(bundle, [piece], embeds, 0.0) * share
            (loss / grad_accum).backward()
            value += loss.detach()
    return float(value)


def finetune(
    bundle: DiffusionBundle,
    data: TrainData,
    params: list[torch.nn.Parameter],
    config: TrainConfig,
    generator: torch.Generator,
    train_text_encoder: bool = False,
    on_step: Callable[[int, float], torch.Tensor | None] | None = None,
) -> list[float]:
    """Train ``params`` (already requiring grad) of ``bundle``; returns per-step losses.

    The VAE stays frozen; latents are sampled from its posterior each step, as
    DreamBooth does (each photo's posterior is encoded once per call). All randomness
    comes from ``generator``: repeatable on the CPU.
    ``on_step(step, loss)`` runs after each optimizer step; images it returns replace
    the instance images from the next step on (IDDM's decoupling rounds).
    """
    from diffusers.optimization import get_scheduler

    if data.images.shape[0] == 0:
        raise ValueError("cannot personalize on an empty image set")
    if not params:
        raise ValueError("no trainable parameters")
    has_class = data.class_images is not None or data.class_posterior is not None
    use_prior = config.prior_weight > 0 and has_class
    images = data.images.to(bundle.device)
    if data.posterior is not None and len(data.posterior) != images.shape[0]:
        raise ValueError(
            f"posterior: {len(data.posterior)} encoded images for {images.shape[0]} photos"
        )
    with torch.no_grad():
        posterior = data.posterior if data.posterior is not None else bundle.posterior(images)
        class_posterior = None
        if use_prior:
            class_posterior = data.class_posterior
            if class_posterior is None:
                class_posterior = bundle.posterior(data.class_images)
    embeds = _Embeds(bundle, train_text_encoder)
    batches = batch_indices(images.shape[0], config.batch_size, generator)
    class_batches = (
        batch_indices(len(class_posterior), config.batch_size, generator)
        if class_posterior is not None
        else None
    )
    every = max(1, config.steps // 10)
    losses: list[float] = []
    step_size = config.batch_size * (2 if use_prior else 1)  # at most, with the class ones
    single = config.grad_accum == 1 and one_pass(step_size, config.step_images)
    optimizer, backprop = _optimizer(params, config, single)
    closing = (
        contextlib.closing(optimizer)  # the moments' scratch file goes, also on error
        if isinstance(optimizer, StreamedAdamW)
        else contextlib.nullcontext()
    )
    with closing, training_mode(bundle, train_text_encoder, config.gradient_checkpointing):
        schedule = get_scheduler(
            config.lr_schedule,
            optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=config.steps,
        )
        for step in range(config.steps):
            total = 0.0
            for _ in range(config.grad_accum):
                chunks = [_draw(bundle, posterior[next(batches)], data.prompt, generator)]
                if class_batches is not None:
                    class_set = class_posterior[next(class_batches)]
                    chunks.append(_draw(bundle, class_set, data.class_prompt, generator))
                value = _backward(
                    bundle,
                    chunks,
                    embeds,
                    config.prior_weight,
                    config.grad_accum,
                    config.step_images,
                    backprop,
                )
                total += value / config.grad_accum
            try:
                if not isinstance(optimizer, StreamedAdamW):  # it clips as it steps
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm, foreach=True)
                optimizer.step()
                schedule.step()
            finally:
                optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            if (step + 1) % every == 0 or step + 1 == config.steps:
                log.info("finetune step %d/%d loss %.4f", step + 1, config.steps, total)
            if on_step is not None:
                replaced = on_step(step, total)
                if replaced is not None:
                    if replaced.shape != images.shape:
                        raise ValueError(
                            f"on_step: replacement images {tuple(replaced.shape)} differ "
                            f"from the training images {tuple(images.shape)}"
                        )
                    images = replaced.detach().to(bundle.device)
                    with torch.no_grad():
                        posterior = bundle.posterior(images)
    return losses
