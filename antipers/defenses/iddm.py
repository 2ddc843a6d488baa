"""IDDM: identity-decoupled personalization (the immunization track). The person
personalizes a model on purpose; the generations they publish should not be linkable
to them by face recognition, yet stay good and on-prompt.

The defense is the personalization itself: the spec's attack (DreamBooth or LoRA, with
its steps and learning rate) runs as usual, so that the undefended personalization of
the same person is the baseline on the same board, and IDDM interleaves rounds of
identity-decoupled optimization of the training photos (``decouple.py``) into it, in
two stages: the first ``learn_fraction`` of the steps learn the subject on the clean
photos; then ``rounds`` decoupling rounds, spread evenly over the remaining steps, each
followed by personalization updates on the decoupled photos. ``privacy`` weighs
unlinkability against the photos' diffusion reconstruction.

The face embedder it optimizes against (ArcFace's iresnet, ``models/iresnet.py``) is
its own parameter, independent of the evaluation's face backend; rows record both.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar

import numpy as np
import torch

from antipers.attacks.personalize import Personalization
from antipers.data.identity import IdentitySet
from antipers.defenses.base import Protected
from antipers.defenses.decouple import decouple
from antipers.defenses.pgd import PGDConfig
from antipers.metrics.base import MetricResult
from antipers.models.bundle import DiffusionBundle
from antipers.models.embedders import (
    SHIPPED,
    describe_embedder,
    embedder_model,
    identity_similarity,
    person_embedding,
    random_seed,
    resolve_embedder,
)
from antipers.models.iresnet import LAYERS
from antipers.ranges import Checked, Range

log = logging.getLogger(__name__)


@dataclass
class IDDMLog:
    """What the schedule did: the tests check it against the parameters."""

    first_stage: int = 0  # personalization updates before the first decoupling round
    updates: int = 0  # personalization updates in all
    rounds_after: list[int] = field(default_factory=list)  # updates done before each round
    pgd_steps: int = 0
    similarity: list[float] = field(default_factory=list)  # photos to the person, per round
    linf: float = 0.0  # the last round's photos against the originals, /255


@dataclass
class DecouplingCheck:
    """ISM of the generations under the embedder IDDM optimized against (the evaluation's
    own ISM uses the campaign's face backend); its notes carry the schedule's counts."""

    embedder: str  # resolved: a weights file or random[:SEED]
    depth: str
    references: torch.Tensor  # the person's real photos (set_A)
    counts: dict[str, float] = field(default_factory=dict)
    metric: str = "decoupled_ism"
    higher_is_better: bool = False

    def score(self, bundle: DiffusionBundle, images: torch.Tensor) -> MetricResult:
        model = embedder_model(self.embedder, self.depth).to(bundle.device)
        with torch.no_grad():
            person = person_embedding(model, self.references.to(bundle.device))
            values = identity_similarity(model, images.to(bundle.device), person)
        values = values.double().cpu().numpy()
        return MetricResult(
            self.metric,
            values,
            float(np.mean(values)),
            describe_embedder(self.embedder, self.depth),
            self.higher_is_better,
            "cosine",
            notes=dict(self.counts),
        )


@contextlib.contextmanager
def frozen(bundle: DiffusionBundle) -> Iterator[None]:
    """A decoupling round inside the training loop: the model in eval mode and its
    weights out of autograd (no activations kept for them), restored after."""
    modules = [bundle.unet, bundle.text_encoder]
    training = [m.training for m in modules]
    trainable = [p for m in modules for p in m.parameters() if p.requires_grad]
    for module in modules:
        module.eval()
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
        for module, mode in zip(modules, training, strict=True):
            module.train(mode)


@dataclass(frozen=True)
class IDDM(Checked):
    """Identity-decoupled personalization with the spec's attack as its personalization."""

    TRACKS: ClassVar[tuple[str, ...]] = ("immunization",)

    # 0: reconstruction only, 1: unlinkability only
    privacy: Annotated[float, Range(ge=0, le=1)] = 0.5
    # stage 1: share of the personalization steps on clean photos
    learn_fraction: Annotated[float, Range(gt=0, lt=1, note="both stages run")] = 0.5
    # stage 2: decoupling rounds over the remaining steps
    rounds: Annotated[int, Range(ge=1)] = 4
    pgd_steps: Annotated[int, Range(ge=1)] = 10  # per round
    # L-inf budget around the originals, /255: the visible content stays
    eps: Annotated[float, Range(gt=0)] = 8.0
    step_size: Annotated[float, Range(gt=0)] = 1.0  # /255
    # backbone.pth path; "" = $ANTIPERS_ARCFACE_TORCH; "random[:SEED]"; "mini-faces"
    # (antipers' embedder for its miniature, with embedder_depth: mini)
    embedder: str = ""
    embedder_depth: str = "r50"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.embedder_depth not in LAYERS:
            raise ValueError(
                f"embedder_depth: expected one of {', '.join(LAYERS)}, got {self.embedder_depth!r}"
            )
        if self.embedder.startswith("random") and random_seed(self.embedder) is None:
            raise ValueError(f"embedder: expected random or random:SEED, got {self.embedder!r}")
        if self.embedder in SHIPPED and self.embedder_depth != SHIPPED[self.embedder][1]:
            raise ValueError(
                f"embedder {self.embedder} is an iresnet {SHIPPED[self.embedder][1]}: "
                f"set embedder_depth: {SHIPPED[self.embedder][1]}"
            )
        weights = self.embedder and random_seed(self.embedder) is None
        weights = weights and self.embedder not in SHIPPED
        if weights and not Path(self.embedder).expanduser().is_file():
            raise ValueError(f"embedder: ArcFace weights {self.embedder} do not exist")

    def check_attack(self, attack: object) -> None:
        """Refuse, when the spec loads, an attack IDDM cannot wrap or too short for it."""
        if not isinstance(attack, Personalization):
            raise ValueError(
                f"IDDM wraps a personalization (dreambooth, lora), not {type(attack).__name__}"
            )
        self.schedule(attack.steps)

    def schedule(self, steps: int) -> tuple[int, list[int]]:
        """(stage-1 updates, the number of updates done before each decoupling round)."""
        first = max(1, round(steps * self.learn_fraction))
        rest = steps - first
        if rest < self.rounds:
            raise ValueError(
                f"rounds: {self.rounds} decoupling rounds need as many personalization steps "
                f"after the first stage; the attack's {steps} steps leave {rest} "
                f"(learn_fraction {self.learn_fraction}): raise attack.steps or lower rounds"
            )
        return first, [first + (i * rest) // self.rounds for i in range(self.rounds)]

    def protect(
        self, identity: IdentitySet, bundle: DiffusionBundle, generator: torch.Generator
    ) -> Protected:
        """Nothing to publish before personalizing: the attack stage runs ``personalize``."""
        return Protected(identity.set_B, bundle, personalizer=self)

    def personalize(
        self,
        images: torch.Tensor,
        bundle: DiffusionBundle,
        attack: Personalization,
        generator: torch.Generator,
        identity: IdentitySet,
    ) -> tuple[DiffusionBundle, list[DecouplingCheck]]:
        """The attack's personalization with decoupling rounds; the checks it adds."""
        embedder = resolve_embedder(self.embedder)
        trained, trace = self.run(images, bundle, attack, generator, embedder)
        counts = {
            "personalization_steps": float(trace.updates),
            "first_stage_steps": float(trace.first_stage),
            "decoupling_rounds": float(len(trace.rounds_after)),
            "pgd_steps": float(trace.pgd_steps),
            "photos_linf": trace.linf,
        }
        references = identity.set_A.cpu()
        return trained, [DecouplingCheck(embedder, self.embedder_depth, references, counts)]

    def run(
        self,
        images: torch.Tensor,
        bundle: DiffusionBundle,
        attack: Personalization,
        generator: torch.Generator,
        embedder: str | None = None,
    ) -> tuple[DiffusionBundle, IDDMLog]:
        first, rounds_after = self.schedule(attack.steps)
        model = embedder_model(embedder or resolve_embedder(self.embedder), self.embedder_depth)
        model = model.to(bundle.device)
        originals = images.to(bundle.device).detach()
        person = person_embedding(model, originals)
        config = PGDConfig(eps=self.eps, step_size=self.step_size, steps=self.pgd_steps)
        trace = IDDMLog(first_stage=first)
        current = originals

        def on_step(step: int, trained: DiffusionBundle) -> torch.Tensor | None:
            nonlocal current
            trace.updates = step + 1
            if trace.updates not in rounds_after:
                return None
            with frozen(trained):
                current = decouple(
                    originals,
                    trained,
                    model,
                    attack.instance_prompt,
                    self.privacy,
                    config,
                    generator,
                    start=current,
                )
            trace.rounds_after.append(trace.updates)
            trace.pgd_steps += config.steps
            with torch.no_grad():
                similarity = float(identity_similarity(model, current, person).mean())
            trace.similarity.append(similarity)
            trace.linf = float((current - originals).abs().max()) * 255.0
            log.info(
                "IDDM round %d/%d after %d updates: similarity %.3f",
                len(trace.rounds_after),
                self.rounds,
                trace.updates,
                similarity,
            )
            return current

        trained = attack.personalize(originals, bundle, generator, on_step=on_step)
        return trained, trace
