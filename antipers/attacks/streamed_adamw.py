"""AdamW that steps one parameter at a time, its moments kept where memory is cheapest,
so a full-weight surrogate at SD scale need not hold its gradients and moments at once.

At SD 2.1 scale the weights that train (UNet and text encoder) are 4.5 GiB in fp32;
AdamW adds 9 GiB of moments, and a step 4.5 GiB of gradients. Here the moments can live
in a scratch file (a CPU run) or host memory (a GPU run forced lean), brought to the
device for one parameter's update and written back after it. Where a step is one backward pass,
``backprop`` updates each parameter as soon as its gradient is complete and frees it,
so no full set of gradients ever exists. Clipping by the global norm needs every
gradient before the first update, so that backward runs twice over one graph: the
first pass only measures each gradient's norm, the second clips and steps.

The arithmetic is torch's own, parameter by parameter: the per-tensor norms and total
of ``clip_grad_norm_``, its clip coefficient, the fused (or single-tensor) AdamW
kernel with per-parameter step counts. On the CPU the weights come out as the plain
optimizer's bit for bit (tested); on a GPU whose backward kernels are not
deterministic, the second pass's gradients may differ from the first's in the last
bits, so the clip coefficient can too.

Stepping inside backward assumes that no later part of the backward pass reads a
weight whose gradient is complete (true of a module's own weights, tied ones included,
and of checkpointed blocks). Each update bumps the weight's version counter, so a graph
that does read it (a weight saved through ``.detach()``) raises autograd's in-place
error instead of using the new value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import torch
from torch.optim.adamw import adamw as adamw_kernel

from antipers.scratch import ScratchFile

StatePlace = Literal["device", "cpu", "disk"]
STATE_PLACES: tuple[StatePlace, ...] = ("device", "cpu", "disk")


def uses_fused(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch has a fused AdamW kernel for ``params`` (CPU, CUDA): on the CPU
    the default loops over the tensors in Python, a fifth of a small UNet's step."""
    devices = {p.device.type for p in params}
    return devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


class _Moments:
    """Each parameter's two AdamW moments, where ``place`` keeps them. ``load`` gives
    them on the parameter's device (zeros before its first step); ``save`` puts them
    back."""

    def __init__(self, params: list[torch.nn.Parameter], place: StatePlace) -> None:
        if place not in STATE_PLACES:
            raise ValueError(
                f"optimizer state place: expected one of {STATE_PLACES}, got {place!r}"
            )
        self.place = place
        self._kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # device, cpu
        self._file: ScratchFile | None = None
        if place == "disk":
            sizes = {}
            for i, p in enumerate(params):
                size = p.numel() * p.element_size()
                sizes[f"{i}.m"] = sizes[f"{i}.v"] = size
            self._file = ScratchFile.allocate(sizes, prefix="antipers-moments-")

    def load(self, i: int, p: torch.nn.Parameter, first: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if first:
            return (
                torch.zeros_like(p, memory_format=torch.preserve_format),
                torch.zeros_like(p, memory_format=torch.preserve_format),
            )
        if self._file is None:
            m, v = self._kept[i]
            return m.to(p.device), v.to(p.device)
        # the parameter's layout: the fused kernel pairs elements in storage order
        m = torch.empty_like(p, device="cpu")
        v = torch.empty_like(p, device="cpu")
        self._file.read_into({f"{i}.m": m, f"{i}.v": v})
        return m.to(p.device), v.to(p.device)

    def save(self, i: int, m: torch.Tensor, v: torch.Tensor) -> None:
        if self._file is not None:
            self._file.write_entry(f"{i}.m", m)
            self._file.write_entry(f"{i}.v", v)
        elif self.place == "cpu" and m.device.type != "cpu":
            if i not in self._kept:  # host buffers made once (pinned ones round up to 2^k)
                host = (torch.empty_like(t, device="cpu") for t in (m, v))
                self._kept[i] = tuple(host)  # type: ignore[assignment]
            for kept, t in zip(self._kept[i], (m, v), strict=True):
                kept.copy_(t)
        else:
            self._kept[i] = (m, v)

    def close(self) -> None:
        self._kept.clear()
        if self._file is not None:
            self._file.remove()
            self._file = None


class StreamedAdamW(torch.optim.Optimizer):
    """``max_grad_norm``: clip by the global norm as ``clip_grad_norm_`` does (None: no
    clipping, and ``backprop`` is one pass). ``total_steps``: the moments of the last
    step are never read again, so they are not written back. ``close`` (or the context
    manager) removes the moments' scratch file."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        weight_decay: float,
        max_grad_norm: float | None,
        place: StatePlace,
        total_steps: int | None = None,
    ) -> None:
        self.params = list(params)
        defaults = {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": weight_decay}
        super().__init__(self.params, defaults)
        self.max_grad_norm = max_grad_norm
        self.total_steps = total_steps
        self._moments = _Moments(self.params, place)
        # each tensor's step count, as torch keeps it (a tensor without a gradient skips)
        self._counts: dict[int, torch.Tensor] = {}
        self._steps = 0
        self._fused = uses_fused(self.params)
        self._stepped = False  # this step's updates already ran inside backward

    def state_dict(self) -> dict:
        raise NotImplementedError("StreamedAdamW: its moments live outside the optimizer")

    def load_state_dict(self, state_dict: dict) -> None:
        raise NotImplementedError("StreamedAdamW: its moments live outside the optimizer")

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "_moments"):  # torch's __init__ adds the one group
            raise NotImplementedError("StreamedAdamW: one parameter group, given when built")
        super().add_param_group(param_group)

    def backprop(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` that also takes the step, parameter by parameter, as the
        gradients complete; ``step`` then only counts it."""
        self._check_planned()
        total = None
        if self.max_grad_norm is not None:
            norms: dict[int, torch.Tensor] = {}

            def measure(i: int, p: torch.nn.Parameter) -> None:
                # the norm of one tensor's norm is itself: clip_grad_norm_'s per-tensor value
                norms[i] = torch.nn.utils.get_total_norm([p.grad], 2.0, foreach=True)
                p.grad = None

            with self._hooks(measure):
                loss.backward(retain_graph=True)
            # clip_grad_norm_'s order: by device and dtype, in order of first appearance
            groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for i in sorted(norms):
                groups.setdefault((self.params[i].device, self.params[i].dtype), []).append(
                    norms[i]
                )
            ordered = [n for group in groups.values() for n in group]
            total = torch.nn.utils.get_total_norm(ordered, 2.0, foreach=True)
        with self._hooks(lambda i, p: self._update(i, p, total)):
            loss.backward()
        self._stepped = True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:
        """After a plain backward: clip as ``clip_grad_norm_``, then update and free one
        parameter's gradient at a time."""
        if closure is not None:
            raise ValueError("StreamedAdamW takes no closure")
        if not self._stepped:
            self._check_planned()
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
            for i, p in enumerate(self.params):
                if p.grad is not None:
                    self._update(i, p, None)
        self._stepped = False
        self._steps += 1

    @torch.no_grad()
    def _update(self, i: int, p: torch.nn.Parameter, total: torch.Tensor | None) -> None:
        if total is not None:
            torch.nn.utils.clip_grads_with_norm_([p], self.max_grad_norm, total, foreach=True)
        grad, p.grad = p.grad, None
        group = self.param_groups[0]
        m, v = self._moments.load(i, p, first=i not in self._counts)
        if i not in self._counts:  # on the device for the fused kernel, as torch keeps it
            where = p.device if self._fused else torch.device("cpu")
            self._counts[i] = torch.zeros((), dtype=torch.float32, device=where)
        beta1, beta2 = group["betas"]
        adamw_kernel(
            [p],
            [grad],
            [m],
            [v],
            [],
            [self._counts[i]],
            foreach=False,
            fused=self._fused or None,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
        torch.autograd.graph.increment_version(p)  # the fused kernel does not
        if self.total_steps is None or self._steps + 1 < self.total_steps:
            self._moments.save(i, m, v)

    def _check_planned(self) -> None:
        if self.total_steps is not None and self._steps >= self.total_steps:
            raise RuntimeError(
                f"StreamedAdamW: {self.total_steps} steps were planned (total_steps), and the "
                "last step's moments were not kept"
            )

    @contextlib.contextmanager
    def _hooks(self, fn: Callable[[int, torch.nn.Parameter], None]) -> Iterator[None]:
        handles = [
            p.register_post_accumulate_grad_hook(lambda p, i=i: fn(i, p))
            for i, p in enumerate(self.params)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def close(self) -> None:
        self._moments.close()

    def __enter__(self) -> StreamedAdamW:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
