"""Synthetic people from the 64x64 DCGAN face generator that ``gan-face-generate`` ships.

One latent per identity, small nudges of it per photo: with nudge 0.15 a face
recognizer puts photos of one identity close together and different identities
apart (dlib distance ~0.24 within, ~0.70 across). Deterministic by seed, offline.
For tests and demos; these are not real people and say nothing about real faces.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch

from antipers.data.identity import SETS, DatasetError, IdentitySet
from antipers.errors import MissingExtra
from antipers.images import quantize, resize
from antipers.ranges import Checked, Range

LATENT_DIM = 100
PREFIX = "synth-"

# Seed streams. Identity ``i`` of a dataset with seed ``s`` draws its latents from a
# torch generator seeded ``s * IDENTITY_STRIDE + i``. torch's CPU generator keeps only
# the low 32 bits of a seed (``manual_seed(2**61 + k)`` draws what ``manual_seed(k)``
# draws), so no range of torch seeds lies outside every dataset's identities: a stream
# that must be disjoint from them draws from numpy's PCG64 under a SeedSequence of its
# own tag (``stream_latents``), another generator altogether. ``mini-faces``' training
# pool and the embedder's people each have one.
IDENTITY_STRIDE = 1_000_003
MAX_DATASET_SEED = 2**31
TRAINING_STREAM = 0x6D696E69_706F6F6C  # mini-faces' training pool
EMBEDDER_STREAM = 0x6D696E69_656D62  # the mini face embedder's people


@functools.lru_cache(maxsize=1)
def face_generator() -> Any:
    """The pretrained DCGAN generator (CPU, eval mode), loaded once per process."""
    spec = importlib.util.find_spec("gan_face_generate")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtra(
            "the 'synthetic' dataset needs the face generator: pip install 'antipers[synth]'"
        )
    from gan_face_generate.models import Generator

    weights = Path(next(iter(spec.submodule_search_locations))) / "weights.tar"
    net = Generator(ngpu=0, nc=3, nz=LATENT_DIM, ngf=64)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict(state["netG_state_dict"])
    return net.eval().requires_grad_(False)


@dataclass(frozen=True)
class SyntheticDataset(Checked):
    """``identities`` made-up people, ``photos_per_set`` photos in each of set_A/B/C."""

    # identities are torch seeds IDENTITY_STRIDE apart per dataset seed
    n_identities: Annotated[int, Range(ge=1, le=IDENTITY_STRIDE)] = 4
    photos_per_set: Annotated[int, Range(ge=1)] = 4
    nudge: Annotated[float, Range(ge=0, le=2)] = 0.15
    seed: Annotated[int, Range(ge=0, lt=MAX_DATASET_SEED)] = 0

    def identities(self) -> list[str]:
        return [f"{PREFIX}{i:04d}" for i in range(self.n_identities)]

    def index(self, identity: str) -> int:
        if identity not in self.identities():
            raise DatasetError(
                [
                    f"synthetic: no identity {identity!r}; this dataset has "
                    f"{PREFIX}0000 .. {PREFIX}{self.n_identities - 1:04d}"
                ]
            )
        return int(identity.removeprefix(PREFIX))

    def faces(self, index: int, resolution: int) -> torch.Tensor:
        """``3 * photos_per_set`` photos of identity ``index`` at ``resolution``."""
        seed = identity_seed(self.seed, index)
        return person_faces(seed, len(SETS) * self.photos_per_set, self.nudge, resolution)

    def load(self, identity: str, resolution: int) -> IdentitySet:
        faces = self.faces(self.index(identity), resolution)
        k = self.photos_per_set
        sets = {name: faces[i * k : (i + 1) * k].contiguous() for i, name in enumerate(SETS)}
        return IdentitySet(
            dataset="synthetic",
            identity=identity,
            **sets,
            sources={name: (f"synthetic:seed={self.seed}",) * k for name in SETS},
        )


def torch_latents(seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The person of torch ``seed``: a base latent, then ``count`` nudges."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(1, LATENT_DIM, generator=gen)
    return base, torch.randn(count, LATENT_DIM, generator=gen)


def person_faces(seed: int, count: int, nudge: float, resolution: int) -> torch.Tensor:
    """``count`` photos of the person drawn from torch ``seed``: one latent, nudged per photo."""
    base, nudges = torch_latents(seed, count)
    return generate(base + nudge * nudges, resolution)


def stream_latents(stream: int, index: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Person ``index`` of numpy stream ``stream``: a base latent and ``count`` nudges."""
    rng = np.random.default_rng([stream, index])
    base = torch.from_numpy(rng.standard_normal((1, LATENT_DIM), dtype=np.float32))
    return base, torch.from_numpy(rng.standard_normal((count, LATENT_DIM), dtype=np.float32))


def stream_faces(
    stream: int, index: int, count: int, nudge: float, resolution: int
) -> torch.Tensor:
    """``count`` photos of person ``index`` of a stream no torch-seeded identity shares."""
    base, nudges = stream_latents(stream, index, count)
    return generate(base + nudge * nudges, resolution)


def identity_latent(dataset_seed: int, index: int) -> torch.Tensor:
    """The base latent of a ``synthetic`` identity (what its photos are nudged from)."""
    return torch_latents(identity_seed(dataset_seed, index), 0)[0]


def identity_seed(dataset_seed: int, index: int) -> int:
    return dataset_seed * IDENTITY_STRIDE + index


def generate(latents: torch.Tensor, resolution: int) -> torch.Tensor:
    """Generator faces for ``(N, 100)`` latents, on the 8-bit grid like any published
    photo read back from a PNG."""
    with torch.no_grad():
        faces = face_generator()(latents[:, :, None, None])
    return quantize(resize(((faces + 1.0) / 2.0).clamp(0, 1), resolution))


def training_latents(start: int, count: int) -> torch.Tensor:
    """The latents of ``training_faces``: person ``k`` of ``TRAINING_STREAM``, un-nudged."""
    return torch.cat(
        [stream_latents(TRAINING_STREAM, k, 0)[0] for k in range(start, start + count)]
    )


def training_faces(start: int, count: int, resolution: int = 64) -> torch.Tensor:
    """``count`` different people that ``mini-faces`` trains on, none a dataset identity."""
    return generate(training_latents(start, count), resolution)
