"""Time and peak memory per identity of each defense (image track, and APDM on the
model track), and ASPL's memory against the reference code's deep-copy-per-iteration
scheme, measured in the same run.

Each defense runs in its own child process (its peak memory is its own) on one
synthetic identity (4 photos), with a few iterations; the time per iteration (median)
is extrapolated to the protocol's counts (ASPL family: 50 iterations; FSMG family:
1000 fine-tuning + 100 PGD steps; APDM: 800 iterations of 20 inner steps, on 4 paired
images made with 2 sampler steps). ``aspl-deepcopy`` is ASPL as the reference code
runs it: a fresh deep copy of the UNet and text encoder every iteration.

    python benchmarks/defenses.py                                 # tiny at 64 px
    python benchmarks/defenses.py --models sd21-arch --resolution 512 --iterations 2
    python benchmarks/defenses.py --models tiny sd15-arch --defenses apdm
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import dataclass

import torch
from _harness import emit, in_child, peak_gib, reset_peak

from antipers.data.synthetic import SyntheticDataset
from antipers.defenses.aspl import ASPL
from antipers.defenses.base import Protected
from antipers.defenses.pgd import project_png
from antipers.defenses.surrogate import Surrogate, trainable_parameters
from antipers.defenses.surrogate_pgd import RunState
from antipers.device import pick_device
from antipers.registry import BASE_MODELS, DEFENSES

ITERATIVE = ("aspl", "simac", "cap-aspl", "cap-simac", "aspl-deepcopy")
ONE_SHOT = ("fsmg", "cap-fsmg")
MODEL_TRACK = ("apdm",)
PROTOCOL_ITERATIONS, PROTOCOL_FINETUNE, PROTOCOL_PGD = 50, 1000, 100
PROTOCOL_APDM = 800


@dataclass(frozen=True)
class DeepCopyASPL(ASPL):
    """The reference scheme: f_sur = deepcopy(f) every iteration (for comparison only)."""

    def protect(self, identity, bundle, generator):  # type: ignore[no-untyped-def]
        reference, clean = identity.set_A.to(bundle.device), identity.set_B.to(bundle.device)
        x, state = clean.clone(), RunState()
        f = bundle.copy_of("unet", "text_encoder")
        for part in ("unet", "text_encoder"):
            getattr(f, part).requires_grad_(True)
        f_surrogate = Surrogate(
            f,
            self.build_surrogate_attack(),
            trainable_parameters(f),
            self.instance_prompt,
            offload=False,
        )
        for it in range(self.iterations):
            copy = f.copy_of("unet", "text_encoder")
            sur = Surrogate(
                copy,
                f_surrogate.attack,
                trainable_parameters(copy),
                self.instance_prompt,
                offload=False,
            )
            sur.train(reference, self.surrogate_steps, generator)
            x = self.attack_step(sur, x, clean, identity, bundle, generator, it, state)
            del sur, copy
            f_surrogate.train(x, self.surrogate_steps, generator)
            logging.getLogger("antipers.defenses").info("deepcopy iteration %d", it + 1)
        return Protected(project_png(x, clean, self.eps).cpu(), bundle, log=state)

    def build_surrogate_attack(self):  # type: ignore[no-untyped-def]
        from antipers.attacks.dreambooth import DreamBooth

        return DreamBooth(
            steps=1,
            lr=self.surrogate_lr,
            prior_weight=0.0,
            train_text_encoder=self.train_text_encoder,
        )


class Stamps(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.times: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.times.append((time.perf_counter(), record.getMessage()))


def run_one(model: str, name: str, resolution: int, iterations: int) -> dict:
    device = pick_device()
    bundle = BASE_MODELS.build(model).load(device)
    person = SyntheticDataset(n_identities=1).load("synth-0000", resolution)
    if name == "aspl-deepcopy":
        defense = DeepCopyASPL(iterations=iterations)
    elif name in ONE_SHOT:
        defense = DEFENSES.build(name, {"finetune_steps": iterations, "pgd_steps": iterations})
    elif name == "apdm":  # the protocol's 20 inner steps; few paired images, cheaply made
        settings = {"iterations": iterations, "num_class_images": 4, "class_steps": 2}
        defense = DEFENSES.build(name, settings)
    else:
        defense = DEFENSES.build(name, {"iterations": iterations})
    stamps = Stamps()
    logger = logging.getLogger("antipers.defenses")
    logger.setLevel(logging.INFO)
    logger.addHandler(stamps)
    reset_peak(device)
    t0 = time.perf_counter()
    defense.protect(person, bundle, torch.Generator().manual_seed(0))
    total = time.perf_counter() - t0
    marks = [t0] + [t for t, _ in stamps.times]
    if name in ONE_SHOT:  # one mark: fine-tuning done, then PGD until the end
        finetune, pgd = marks[1] - t0, t0 + total - marks[1]
        per = total / iterations
        protocol = finetune / iterations * PROTOCOL_FINETUNE + pgd / iterations * PROTOCOL_PGD
    else:
        per = statistics.median(b - a for a, b in zip(marks, marks[1:], strict=False))
        protocol = per * (PROTOCOL_APDM if name in MODEL_TRACK else PROTOCOL_ITERATIONS)
    return {
        "device": str(device),
        "total_s": total,
        "per_iter_s": per,
        "protocol_min": protocol / 60,
        "peak_gib": peak_gib(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["tiny"])
    parser.add_argument("--defenses", nargs="+", default=[*ITERATIVE, *ONE_SHOT, *MODEL_TRACK])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "DEFENSE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        emit(run_one(*args.one, args.resolution, args.iterations))
        return
    print(
        f"{args.resolution} px, 4 photos, {args.iterations} iterations measured "
        f"(median per iteration), extrapolated to the protocol's counts"
    )
    print(
        f"{'model':<11}{'defense':<15}{'device':<8}{'s/iter':>9}{'protocol min':>14}"
        f"{'peak GiB':>10}{'mem x deepcopy':>16}"
    )
    for model in args.models:
        results = {
            name: in_child(
                __file__,
                [
                    "--one",
                    model,
                    name,
                    "--resolution",
                    str(args.resolution),
                    "--iterations",
                    str(args.iterations),
                ],
            )
            for name in args.defenses
        }
        naive = results.get("aspl-deepcopy")
        for name, r in results.items():
            if r is None:
                print(f"{model:<11}{name:<15}failed")
                continue
            ratio = r["peak_gib"] / naive["peak_gib"] if naive else float("nan")
            print(
                f"{model:<11}{name:<15}{r['device']:<8}{r['per_iter_s']:>9.3f}"
                f"{r['protocol_min']:>14.2f}{r['peak_gib']:>10.2f}{ratio:>16.2f}"
            )


if __name__ == "__main__":
    main()
