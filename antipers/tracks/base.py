"""What a track is to the pipeline: how the attacker personalizes, which subjects
besides the protected person it scores, and its own measures.

The stages call these hooks and never a track's name, so a fourth track is one module
and one registry line (``antipers.registry.TRACKS``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from antipers.metrics.base import MetricResult

if TYPE_CHECKING:
    from antipers.data.identity import IdentitySet
    from antipers.models.bundle import DiffusionBundle
    from antipers.pipeline import Handoff
    from antipers.run_context import RunContext
    from antipers.spec import ExperimentSpec


@dataclass
class Subject:
    """Someone (or something) a track scores besides the protected person: the same
    metrics on their generations, the defense's checks, what the attack stage measured.
    ``identity`` empty: not a person (generic images), rows carry the experiment's."""

    kind: str  # the rows' ``subject`` column (``antipers.rows``)
    identity: str
    generated: torch.Tensor | None  # None: nothing generated, only ``measured``
    prompts: list[str] = field(default_factory=list)
    # None: the person's own set_A, loaded where scored (resident there)
    references: torch.Tensor | None = None
    metrics: tuple[str, ...] | None = None  # the spec's metrics that apply (None: all)
    checks: bool = True  # the defense's own measures (a backdoor's) apply
    measured: list[MetricResult] = field(default_factory=list)
    utility: bool = False  # better for the defense where the attack still works

    def portable(self) -> Subject:
        for name in ("generated", "references"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.cpu())
        return self


@dataclass
class AttackRun:
    """What the attack stage hands a track's hooks."""

    spec: ExperimentSpec
    ctx: RunContext
    handoff: Handoff
    model: DiffusionBundle  # the (possibly defended) model the attacker starts from
    images: torch.Tensor  # the photos the attacker trains on, after countermeasures
    attack: Any
    sampler: Any
    say: Callable[[str], None]
    rng: Callable[[str], torch.Generator]  # the stage's seeded stream by stage name


@dataclass(frozen=True)
class Track:
    """The image track's behaviour; the others override what they add."""

    # whether a defense changes the published photos (photo-budget metrics, galleries)
    changes_photos: ClassVar[bool] = False
    # metrics when a spec names none (None: the spec's default)
    default_metrics: ClassVar[tuple[str, ...] | None] = None

    def personalize(self, run: AttackRun) -> DiffusionBundle:
        """The attacker's personalization of ``run.model`` on ``run.images``."""
        if run.handoff.personalizer is not None:
            raise ValueError(
                f"defense {run.spec.defense.name!r} personalizes on its own, which the "
                f"{run.spec.track} track does not use"
            )
        return run.attack.personalize(run.images, run.model, run.rng("personalize"))

    def after_attack(self, run: AttackRun, personalized: DiffusionBundle) -> None:
        """Measure what only the attacked model shows (``run.handoff.measured``) and add
        subjects (``run.handoff.subjects``)."""

    def own_measures(self, identity: IdentitySet) -> list[Any]:
        """Measures of the protected person's generations (``score(base, images)``)."""
        return []
