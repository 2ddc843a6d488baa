"""ASPL (Anti-DreamBooth): alternate surrogate DreamBooth steps on the clean set_A, PGD
on set_B against that surrogate, and surrogate steps on the perturbed photos."""

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
class ASPL(SurrogatePGD):
    """Anti-DreamBooth ASPL (protocol: eps 0.05 in [-1,1], 50 iterations of 3+6+3 steps)."""

    iterations: Annotated[int, Range(ge=1)] = 50
    surrogate_steps: Annotated[int, Range(ge=0)] = 3

    def protect(
        self, identity: IdentitySet, bundle: DiffusionBundle, generator: torch.Generator
    ) -> Protected:
        reference = identity.set_A.to(bundle.device)
        clean = identity.set_B.to(bundle.device)
        x = clean.clone()
        state = RunState()
        with self.build_surrogate(bundle, generator, clean.shape[-1]) as surrogate:
            encoded = surrogate.encode(reference)  # set_A never changes: encoded once
            for it in range(self.iterations):
                with surrogate.snapshot() as before:
                    # f_sur: f trained on the clean photos, attacked, then f back
                    surrogate.train(reference, self.surrogate_steps, generator, encoded)
                    x = self.attack_step(
                        surrogate, x, clean, identity, bundle, generator, it, state
                    )
                    surrogate.restore(before)
                surrogate.train(x, self.surrogate_steps, generator)  # f: perturbed photos
                log.info("%s iteration %d/%d", type(self).__name__, it + 1, self.iterations)
        return Protected(images=project_png(x, clean, self.eps).cpu(), bundle=bundle, log=state)
