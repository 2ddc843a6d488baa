"""Activation checkpointing: activations recomputed in backward instead of stored,
trading a second forward for memory where a model is large."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def checkpointed(modules: list[Any], on: bool = True) -> Iterator[None]:
    """Each model's own checkpointing (diffusers and transformers alike, block by
    block), switched off again after."""
    if not on:
        yield
        return
    for module in modules:
        _own_checkpointing(module, True)
    try:
        yield
    finally:
        for module in modules:
            _own_checkpointing(module, False)


def _own_checkpointing(module: Any, on: bool) -> None:
    verb = "enable" if on else "disable"
    # diffusers; transformers (renamed to activation_checkpointing_* in 4.5x)
    names = (f"{verb}_gradient_checkpointing", f"activation_checkpointing_{verb}")
    for name in (*names, f"gradient_checkpointing_{verb}"):
        if hasattr(module, name):
            getattr(module, name)()
            return
    raise TypeError(f"{type(module).__name__} cannot checkpoint its activations")


@contextlib.contextmanager
def encoder_checkpointed(vae: Any, on: bool = True) -> Iterator[None]:
    """The VAE encoder recomputed layer by layer (each resnet, attention, downsampler
    and the middle block), finer than diffusers' block by block: recomputing a whole
    full-resolution block in backward holds all its activations at once (0.67 GiB
    more for one 512 px photo through SD's VAE). A VAE of another layout falls back
    to its own checkpointing. The numbers are the same either way."""
    layers = _encoder_layers(vae) if on else None
    if layers is None:
        with checkpointed([vae], on):
            yield
        return
    with layers_checkpointed(layers):
        yield


def _encoder_layers(vae: Any) -> list[torch.nn.Module] | None:
    encoder = getattr(vae, "encoder", None)
    blocks = getattr(encoder, "down_blocks", None)
    mid = getattr(encoder, "mid_block", None)
    if blocks is None or mid is None:
        return None
    parts = ("resnets", "attentions", "downsamplers")
    layers = [
        layer for block in blocks for part in parts for layer in (getattr(block, part, None) or ())
    ]
    return [*layers, mid] if layers else None


@contextlib.contextmanager
def layers_checkpointed(layers: list[torch.nn.Module]) -> Iterator[None]:
    """Each layer's forward run under ``checkpoint`` while gradients are on; the
    layers' forwards (one a hook installed included) are restored after, each whatever
    happens to another. Forward hooks on the layers' children fire again when backward
    recomputes them."""
    unique = list(dict.fromkeys(layers))
    saved = [(layer, vars(layer).get("forward")) for layer in unique]
    for layer in unique:
        layer.forward = functools.partial(_recomputed, layer.forward)
    try:
        yield
    finally:
        for layer, previous in saved:
            if previous is None:
                vars(layer).pop("forward", None)
            else:
                layer.forward = previous


def _recomputed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)
