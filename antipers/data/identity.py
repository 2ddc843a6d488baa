"""One person's photos as image batches, with where each came from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from antipers.errors import UserError

SETS = ("set_A", "set_B", "set_C")


class DatasetError(UserError, ValueError):
    """A dataset folder that cannot be used; lists every problem with its path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class IdentitySet:
    """``set_A``: clean references; ``set_B``: what the person publishes (and protects);
    ``set_C``: extra clean photos (mixed settings). Each ``(N, 3, H, W)`` in ``[0, 1]``."""

    dataset: str
    identity: str
    set_A: torch.Tensor
    set_B: torch.Tensor
    set_C: torch.Tensor
    sources: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in SETS:
            images = getattr(self, name)
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(
                    f"{self.identity}.{name}: expected (N, 3, H, W), got {tuple(images.shape)}"
                )

    @property
    def resolution(self) -> int:
        return int(self.set_B.shape[-1])

    def counts(self) -> dict[str, int]:
        return {name: int(getattr(self, name).shape[0]) for name in SETS}
