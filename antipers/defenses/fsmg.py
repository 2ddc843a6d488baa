"""FSMG (Anti-DreamBooth): PGD against a surrogate fine-tuned on the clean photos."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from antipers.data.identity import IdentitySet
from antipers.defenses.base import Protected
from antipers.defenses.pgd import project_png
from antipers.defenses.surrogate_pgd import RunState, SurrogatePGD, log
from antipers.models.bundle import DiffusionBundle
from antipers.ranges import Range


@dataclass(frozen=True)
class FSMG(SurrogatePGD):
    """Fully-trained surrogate model guidance: DreamBooth on set_A, then 100 PGD steps.
    The reference trains that DreamBooth with ``train_dreambooth.py`` at batch 2 (two
    photos and two class images per step)."""

    pgd_steps: int = 100
    finetune_steps: Annotated[int, Range(ge=0)] = 1000
    surrogate_batch: int = 2

    def protect(
        self, identity: IdentitySet, bundle: DiffusionBundle, generator: torch.Generator
    ) -> Protected:
        clean = identity.set_B.to(bundle.device)
        state = RunState()
        with self.build_surrogate(bundle, generator, clean.shape[-1]) as surrogate:
            surrogate.train(identity.set_A.to(bundle.device), self.finetune_steps, generator)
            log.info("FSMG surrogate trained (%d steps); PGD", self.finetune_steps)
            x = self.attack_step(
                surrogate, clean.clone(), clean, identity, bundle, generator, 0, state
            )
        return Protected(images=project_png(x, clean, self.eps).cpu(), bundle=bundle, log=state)
