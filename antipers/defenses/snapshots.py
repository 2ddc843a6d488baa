"""Exact copies of a surrogate's trainable weights, kept where memory is cheapest, and
the memory plan that chooses where.

An in-place surrogate needs its weights back bit for bit: after each ASPL iteration's
f_sur phase, and when the defense ends. At SD 2.1 scale one copy of the UNet and text
encoder is 4.8 GB in float32, and ASPL holds two (the base model's, the iteration's).
``device`` keeps a copy beside the weights; ``cpu`` in host memory (the GPU default);
``disk`` in a scratch file that a restore reads back one tensor at a time, so a copy
costs no memory at all (the CPU default at that scale). Every place restores exactly.

The plan does not change the algorithm, only where numbers live and how work is
split (tested: on ``tiny`` the lean plan's ASPL, SimAC and CAP photos equal the plain
plan's bitwise). Snapshots, checkpointing and the streamed optimizer (AdamW's moments
off the device, each weight stepped inside backward: ``StreamedAdamW``) recompute and
store the same numbers exactly (on a GPU whose backward kernels are not deterministic,
the clip coefficient may differ in the last bits); the steps inside backward cost a
second backward pass per surrogate step, for the global norm that clipping needs. PGD
one photo at a time, and a surrogate step of more than two images (FSMG's) in two
passes, sum the same gradient in another order, equal to float rounding, so on other
kernels (a GPU) a rare pixel may differ by one level, and FSMG's photos in the last
bits. That is why it is a property of the run, not of the spec:
``ANTIPERS_MEMORY=plain|lean|auto`` (auto: lean once the trainable weights pass
``LEAN_FROM`` bytes). Lean also turns on gradient checkpointing in the surrogate's
steps, which recomputes activations instead of storing them; under auto that follows
the size of the model the activations run through, so a LoRA surrogate on SD's UNet
checkpoints too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

import torch

from antipers.scratch import ScratchFile

Place = Literal["device", "cpu", "disk"]
PLACES: tuple[Place, ...] = ("device", "cpu", "disk")
MODES = ("auto", "plain", "lean")
LEAN_FROM = 1 << 30  # bytes of trainable weights: SD's UNet is 3.5 GB, mini-faces' 60 MB


@dataclass(frozen=True)
class MemoryPlan:
    """``pgd_chunk``: photos whose PGD graph is held at once (None: the whole set). At
    SD scale and 512 px the VAE encoder's activations of 4 photos outweigh everything
    else in PGD; one photo at a time takes a quarter, for the same gradient.
    ``step_images``: images one surrogate step's UNet pass holds (None: the whole step).
    Two keeps ASPL's step (a photo and a class image) one pass, as the reference
    batches it, and splits FSMG's (two of each) part by part. ``moments``: where the
    surrogate's AdamW moments live, and ``steps_in_backward``: each weight updated as
    its gradient completes (``StreamedAdamW``): at SD scale the moments are twice the
    weights that train and the gradients once more. On a CPU the moments go to the
    scratch file with the snapshots; on a GPU they stay on the card unless the plan is
    forced lean (a 16 GB card), since host memory costs a copy each way every step."""

    snapshots: Place = "device"
    checkpointing: bool = False
    pgd_chunk: int | None = None
    step_images: int | None = None
    moments: Place = "device"
    steps_in_backward: bool = False

    @classmethod
    def choose(
        cls,
        device: torch.device,
        trainable_bytes: int,
        offload: bool = True,
        model_bytes: int | None = None,
    ) -> MemoryPlan:
        """``ANTIPERS_MEMORY`` (default auto), for ``trainable_bytes`` of weights that
        train on ``device`` inside ``model_bytes`` of model (default: the same; a LoRA
        surrogate's adapters are small, the UNet its activations run through is not).
        Under auto, snapshots go off the device by the trainable bytes and activations
        are checkpointed by the model's. ``offload`` (the defense's
        ``offload_snapshots``) sends a GPU run's snapshots to host memory even under
        the plain plan."""
        mode = os.environ.get("ANTIPERS_MEMORY", "auto").strip().lower() or "auto"
        if mode not in MODES:
            raise ValueError(f"ANTIPERS_MEMORY: expected one of {', '.join(MODES)}, got {mode!r}")
        model_bytes = trainable_bytes if model_bytes is None else model_bytes
        on_gpu = device.type != "cpu"
        streamed = mode == "lean" or (mode == "auto" and trainable_bytes >= LEAN_FROM)
        if streamed:
            snapshots: Place = "cpu" if on_gpu else "disk"
        else:
            snapshots = "cpu" if on_gpu and offload else "device"
        # the model holds the weights that train, so this is on whenever snapshots leave
        checkpointing = mode == "lean" or (mode == "auto" and model_bytes >= LEAN_FROM)
        if not checkpointing:
            return cls(snapshots, checkpointing)
        if not streamed:
            return cls(snapshots, checkpointing, pgd_chunk=1, step_images=2)
        # a GPU's moments go to host memory only when asked: 9 GiB each way every step
        moments: Place = "disk" if not on_gpu else "cpu" if mode == "lean" else "device"
        return cls(snapshots, True, 1, 2, moments=moments, steps_in_backward=True)


def parameter_bytes(params: Mapping[str, torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in params.values())


class Snapshot(Mapping[str, torch.Tensor]):
    """Copies of ``params`` as they are now; ``restore`` writes them back, ``discard``
    frees them (a context manager discards on exit). Reading an entry gives a tensor
    on the CPU or the device (for tests and checks); restoring never needs one."""

    def __init__(self, params: Mapping[str, torch.Tensor], place: Place) -> None:
        if place not in PLACES:
            raise ValueError(f"snapshot place: expected one of {PLACES}, got {place!r}")
        self._layout = {n: (p.dtype, tuple(p.shape)) for n, p in params.items()}
        self._copies: dict[str, torch.Tensor] = {}
        self._file: ScratchFile | None = None
        if place == "disk":
            self._file = ScratchFile.write(params, prefix="antipers-snapshot-")
        else:
            target = torch.device("cpu") if place == "cpu" else None
            for name, p in params.items():
                self._copies[name] = p.detach().to(target or p.device, copy=True)

    def restore(self, params: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            if self._file is not None:
                self._file.read_into(params)
                return
            for name, p in params.items():
                p.copy_(self._copies[name])

    def discard(self) -> None:
        self._copies.clear()
        if self._file is not None:
            self._file.remove()
            self._file = None

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.discard()

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._file is not None:
            dtype, shape = self._layout[name]
            out = torch.empty(shape, dtype=dtype)
            self._file.read_into({name: out})
            return out
        return self._copies[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layout)

    def __len__(self) -> int:
        return len(self._layout)
