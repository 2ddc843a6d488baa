"""Feature extractors for CAP's style-consistency loss.

``vgg19``: the paper's choice, torchvision's architecture with weights from a local
file (torchvision's ``vgg19-dcbb9e9d.pth`` or any state dict of that model), given by
the ``vgg_weights`` parameter or ``$ANTIPERS_VGG19_WEIGHTS``; never downloaded.
``vae``: the base model's VAE encoder blocks, available wherever the base model is.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from antipers.defenses.objectives import FeatureFn
from antipers.models.bundle import DiffusionBundle

VGG_ENV = "ANTIPERS_VGG19_WEIGHTS"
VGG_STYLE_LAYERS = (1, 6, 11, 20)  # relu1_1, relu2_1, relu3_1, relu4_1
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _outputs_of(
    stages: Iterable[torch.nn.Module], h: torch.Tensor, layers: tuple[int, ...]
) -> list[torch.Tensor]:
    """Run ``stages`` in order; keep the outputs of the ``layers`` indices; stop after the last."""
    out = []
    for i, stage in enumerate(stages):
        h = stage(h)
        if i in layers:
            out.append(h)
        if i >= max(layers):
            break
    return out


def vae_features(bundle: DiffusionBundle, layers: tuple[int, ...]) -> FeatureFn:
    encoder = bundle.vae.encoder
    n = len(encoder.down_blocks)
    if not layers or any(not 0 <= i < n for i in layers):
        raise ValueError(f"cap_layers {layers}: the VAE encoder has down blocks 0..{n - 1}")

    def extract(x: torch.Tensor) -> list[torch.Tensor]:
        h = encoder.conv_in(x.to(bundle.device) * 2.0 - 1.0)
        return _outputs_of(encoder.down_blocks, h, layers)

    return extract


@functools.lru_cache(maxsize=2)
def _vgg19(path: str, device: str) -> torch.nn.Module:
    from torchvision.models import vgg19

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"VGG-19 weights not found at {file}: give a torchvision vgg19 state dict "
            f"(e.g. vgg19-dcbb9e9d.pth) with cap_vgg_weights or ${VGG_ENV}"
        )
    model = vgg19(weights=None)
    state = torch.load(file, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{file}: not a torchvision VGG-19 state dict ({exc})") from None
    return model.features.eval().requires_grad_(False).to(device)


def vgg_features(path: str, layers: tuple[int, ...], device: torch.device) -> FeatureFn:
    path = path or os.environ.get(VGG_ENV, "")
    if not path:
        raise FileNotFoundError(
            f"cap_extractor 'vgg19' needs local weights: set cap_vgg_weights or ${VGG_ENV}"
        )
    layers = layers or VGG_STYLE_LAYERS
    features = _vgg19(path, str(device))
    if any(not 0 <= i < len(features) for i in layers):
        raise ValueError(f"cap_layers {layers}: VGG-19 features has layers 0..{len(features) - 1}")
    mean = torch.tensor(_IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def extract(x: torch.Tensor) -> list[torch.Tensor]:
        return _outputs_of(features, (x.to(device) - mean) / std, layers)

    return extract
