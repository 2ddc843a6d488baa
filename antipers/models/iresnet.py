"""A differentiable face embedder for defenses that optimize against face recognition
(IDDM): ArcFace's improved ResNet (iresnet18/34/50/100) in PyTorch, laid out so that
the state dicts InsightFace's PyTorch training code saves (``backbone.pth``) load into
it. Offline and in tests it is the same class with seeded random weights.

Input: images in the project's contract, ``(N, 3, H, W)`` in ``[0, 1]`` (aligned face
crops); resized to 112 x 112 and scaled to ``[-1, 1]`` inside. Output: L2-normalized
512-d embeddings, so cosine similarity is a dot product.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

LAYERS = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    # antipers' own: the same blocks, an eighth of the width, on 64 px inputs; trained
    # on the synthetic generator's people (``train_embedder.py``), not an ArcFace model
    "mini": (1, 1, 1, 1),
}
WIDTHS = {"mini": (16, 32, 64, 128)}  # ArcFace's: 64, 128, 256, 512
SIDES = {"mini": 64}  # ArcFace's: 112 (aligned crops)
WEIGHTS_ENV = "ANTIPERS_ARCFACE_TORCH"
SIDE = 112
EMBEDDING = 512


class _Block(nn.Module):
    """BN, 3x3 conv, BN, PReLU, 3x3 conv (stride on the second), BN; identity or a
    1x1 projection added."""

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                nn.BatchNorm2d(planes, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    def __init__(self, depth: str = "r50") -> None:
        super().__init__()
        if depth not in LAYERS:
            raise ValueError(f"depth: unknown {depth!r}; use {', '.join(LAYERS)}")
        self.depth = depth
        widths = WIDTHS.get(depth, (64, 128, 256, 512))
        self.side = SIDES.get(depth, SIDE)
        inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, inplanes, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.prelu = nn.PReLU(inplanes)
        for index, (width, blocks) in enumerate(zip(widths, LAYERS[depth], strict=True)):
            layer = [_Block(inplanes, width, 2)] + [
                _Block(width, width, 1) for _ in range(blocks - 1)
            ]
            setattr(self, f"layer{index + 1}", nn.Sequential(*layer))
            inplanes = width
        self.bn2 = nn.BatchNorm2d(widths[-1], eps=1e-5)
        self.dropout = nn.Dropout(p=0.0)
        cells = (self.side // 16) ** 2  # four stride-2 stages
        self.fc = nn.Linear(widths[-1] * cells, EMBEDDING)
        self.features = nn.BatchNorm1d(EMBEDDING, eps=1e-5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings of ``images`` in ``[0, 1]``; differentiable with respect to them."""
        side = (self.side, self.side)
        x = F.interpolate(images, size=side, mode="bilinear", align_corners=False)
        x = self.prelu(self.bn1(self.conv1(x * 2.0 - 1.0)))
        for index in range(1, 5):
            x = getattr(self, f"layer{index}")(x)
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return F.normalize(self.features(self.fc(x)), dim=1)


def random_iresnet(depth: str = "r18", seed: int = 0) -> IResNet:
    """The architecture with seeded random weights (offline, tests)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = IResNet(depth)
    return model.eval()


def load_iresnet(path: str | Path | None = None, depth: str = "r50") -> IResNet:
    """ArcFace weights from a ``backbone.pth`` state dict (``path`` or
    ``$ANTIPERS_ARCFACE_TORCH``); errors name the file and what does not match."""
    raw = path or os.environ.get(WEIGHTS_ENV)
    if not raw:
        raise FileNotFoundError(
            f"no ArcFace PyTorch weights configured: give a backbone.pth path or set ${WEIGHTS_ENV}"
        )
    file = Path(raw).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"ArcFace weights: {file} does not exist")
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    model = IResNet(depth)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensors of other shapes: another width
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), "")
        raise ValueError(
            f"ArcFace weights {file} do not fit iresnet {depth}: tensors of other shapes "
            f"({first}); is it another depth?"
        ) from None
    if missing or unexpected:
        shown = ", ".join([*missing[:3], *unexpected[:3]])
        raise ValueError(
            f"ArcFace weights {file} do not fit iresnet {depth}: {len(missing)} missing and "
            f"{len(unexpected)} unexpected tensors ({shown}); is it another depth?"
        )
    return model.eval()
