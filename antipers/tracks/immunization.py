"""The immunization track (IDDM): the person personalizes a model themselves, with the
defense's own personalization, and publishes its generations; the question is whether
face recognition links those back to them, and whether they still look like them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from antipers.tracks.base import AttackRun, Track

if TYPE_CHECKING:
    from antipers.data.identity import IdentitySet
    from antipers.models.bundle import DiffusionBundle


@dataclass(frozen=True)
class ImmunizationTrack(Track):
    """The defense's personalizer in place of the attacker's (``none``: the attacker's)."""

    # do the published generations link back to the person (rank-1 retrieval, ISM),
    # and are they still good images
    default_metrics: ClassVar[tuple[str, ...] | None] = ("linkability", "ism", "brisque")

    def personalize(self, run: AttackRun) -> DiffusionBundle:
        personalizer = run.handoff.personalizer
        if personalizer is None:  # `none`: the attacker's own personalization
            return super().personalize(run)
        identity = run.ctx.identity(run.spec)
        personalized, checks = personalizer.personalize(
            run.images, run.model, run.attack, run.rng("personalize"), identity
        )
        run.handoff.checks += checks
        return personalized

    def own_measures(self, identity: IdentitySet) -> list[Any]:
        """Utility: the avatars still look like the person (the model's own measure)."""
        from antipers.metrics.latent import SubjectLikeness

        return [SubjectLikeness(identity.set_A)]
