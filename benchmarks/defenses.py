"""Time and peak memory per identity of each defense (image track, and APDM on the
model track), and ASPL's memory against the reference code's deep-copy-per-iteration
scheme, measured in the same run.

Each defense runs in its own child process (its peak memory is its own) on one
synthetic identity (4 photos), with a few iterations; the time per iteration (median)
is extrapolated to the protocol's counts (ASPL family: 50 iterations; FSMG family:
1000 fine-tuning + 100 PGD steps; APDM: 800 iterations of 20 inner steps, on 4 paired
images made with 2 sampler steps). ``aspl-deepcopy`` is ASPL as the reference code
runs it (``DeepCopyASPL``: a fresh deep copy of the UNet and text encoder every
iteration, the VAE at every surrogate step, every weight gradient at every PGD step,
torch's AdamW, bf16 weights as the reference casts them; ``aspl-deepcopy-fp32``: the
same in fp32); ``aspl-lora`` (and ``simac-lora``, ``fsmg-lora``, any surrogate
defense's name with ``-lora``) is that defense with the LoRA surrogate. Ratios are
against ``aspl-deepcopy`` in the same run. Rows of the full-weight defenses repeat per
memory plan (``--memory plain lean``: ``ANTIPERS_MEMORY`` in the child; ``--without
moments steps-in-backward`` switches those levers of the plan off, for each one's
share), and a large model's ASPL row prints where its peak's bytes go.

    python benchmarks/defenses.py --defenses aspl aspl-deepcopy aspl-deepcopy-fp32 \\
        --iterations 5 --repeats 3                                  # the time goal, tiny
    python benchmarks/defenses.py --models sd21-arch --resolution 512 --iterations 1 \\
        --short --defenses aspl aspl-lora --memory lean            # memory at SD scale
    python benchmarks/defenses.py --models tiny sd15-arch --defenses apdm
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import time
from dataclasses import dataclass

import psutil
import torch
from _harness import emit, in_child, peak_gib, plain_adamw, reset_peak

from antipers.data.synthetic import SyntheticDataset
from antipers.defenses.aspl import ASPL
from antipers.defenses.base import Protected
from antipers.defenses.objectives import carrying_gradient
from antipers.defenses.pgd import project_png
from antipers.defenses.snapshots import MODES, MemoryPlan, parameter_bytes
from antipers.defenses.surrogate import ClassPrior, Surrogate, trainable_parameters
from antipers.defenses.surrogate_pgd import RunState
from antipers.device import pick_device
from antipers.registry import BASE_MODELS, DEFENSES

ITERATIVE = ("aspl", "simac", "cap-aspl", "cap-simac", "aspl-deepcopy", "aspl-deepcopy-fp32")
FULL_WEIGHT = ("aspl", "simac", "cap-aspl", "cap-simac")  # rows per memory plan
ONE_SHOT = ("fsmg", "cap-fsmg")
MODEL_TRACK = ("apdm",)
SURROGATE = (*FULL_WEIGHT, *ONE_SHOT)  # the defenses with a surrogate a LoRA can replace
PROTOCOL_ITERATIONS, PROTOCOL_FINETUNE, PROTOCOL_PGD = 50, 1000, 100
PROTOCOL_APDM = 800


class EncodedEachStep:
    """The reference's data path: the photos a step draws go through the VAE at that
    step (its ``train_one_epoch`` encodes [instance, class] every step). Indexing gives
    the real posterior, so the draws are the ones a posterior encoded once gives."""

    def __init__(self, bundle, images):  # type: ignore[no-untyped-def]
        self.bundle, self.images = bundle, images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            return self.bundle.posterior(self.images[idx])


@dataclass(frozen=True)
class DeepCopyASPL(ASPL):
    """The reference scheme (for comparison only), doing what Anti-DreamBooth's
    ``attacks/aspl.py`` spends its time on: f loaded as its own copy, then a deep copy
    f_sur = deepcopy(f) every iteration; every surrogate step encodes its instance
    photo and class image through the VAE; every PGD step runs the text encoder; the
    optimizer is torch's default AdamW (``run_one`` swaps it in this child process);
    every PGD step's backward also computes the UNet's and text encoder's weight
    gradients (the reference calls ``loss.backward()``); bf16 weights as the reference
    casts them (``weight_dtype = torch.bfloat16``), or fp32. Its data loading (PIL
    reads of the class images at every step) is left out."""

    dtype: str = "bf16"

    def protect(self, identity, bundle, generator):  # type: ignore[no-untyped-def]
        reference, clean = identity.set_A.to(bundle.device), identity.set_B.to(bundle.device)
        x, state = clean.clone(), RunState()
        class_images = self.generic_images(bundle, clean.shape[-1])
        f = bundle.copy_of("unet", "text_encoder")
        half = self.dtype == "bf16"
        if half:
            for part in ("vae", "unet", "text_encoder"):
                setattr(f, part, getattr(f, part).to(torch.bfloat16))
        for part in ("unet", "text_encoder"):
            getattr(f, part).requires_grad_(True)
        prior = ClassPrior(EncodedEachStep(f, class_images), self.class_prompt, self.prior_weight)

        def surrogate(model):  # type: ignore[no-untyped-def]
            params = trainable_parameters(model)
            attack = self.build_surrogate_attack()
            return Surrogate(model, attack, params, self.instance_prompt, MemoryPlan(), prior)

        cast = torch.autocast(bundle.device.type, torch.bfloat16, enabled=half)
        with cast:
            f_surrogate = surrogate(f)
            for it in range(self.iterations):
                copy = f.copy_of("unet", "text_encoder")
                sur = surrogate(copy)
                sur.train(reference, self.surrogate_steps, generator, self.each_step(f, reference))
                x = self.attack_step(sur, x, clean, identity, f, generator, it, state)
                del sur, copy
                f_surrogate.train(x, self.surrogate_steps, generator, self.each_step(f, x))
                logging.getLogger("antipers.defenses").info("deepcopy iteration %d", it + 1)
        return Protected(project_png(x.float(), clean, self.eps).cpu(), bundle, log=state)

    @staticmethod
    def each_step(model, images):  # type: ignore[no-untyped-def]
        return EncodedEachStep(model, images.detach())

    def objective(self, bundle, clean, generator, state):  # type: ignore[no-untyped-def]
        parts = (bundle.unet, bundle.text_encoder)
        weights = [p for part in parts for p in part.parameters() if p.requires_grad]

        def objective(x, step):  # type: ignore[no-untyped-def]
            embeds = bundle.prompt_embeds([self.instance_prompt] * len(x))  # every step
            latents = bundle.encode(x, generator)
            loss = bundle.training_loss(latents, embeds, generator, state.t_range)
            # loss.backward(), as the reference calls it: every weight's gradient too
            grad = torch.autograd.grad(loss, [x, *weights], allow_unused=True)[0]
            return carrying_gradient(loss, x, grad)

        return objective

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


def run_one(model: str, name: str, args: argparse.Namespace) -> dict:
    device = pick_device()
    bundle = BASE_MODELS.build(model).load(device)
    person = SyntheticDataset(n_identities=1).load("synth-0000", args.resolution)
    iterations = args.iterations
    # class images are made once per class and shared by every identity (the reference
    # reads them from class_data_dir): few, cheaply made, the same for every row. A
    # surrogate step uses one whichever the count, so the per-iteration cost is the same.
    classes = {"num_class_images": 4, "class_steps": 2}
    common = dict(classes)
    if args.short:
        common |= {"surrogate_steps": 1, "pgd_steps": 1}
    # "<defense>-lora": that defense with the LoRA surrogate
    base = name.removesuffix("-lora") if name.removesuffix("-lora") in SURROGATE else name
    lora = {"surrogate": "lora"} if base != name else {}
    if name.startswith("aspl-deepcopy"):
        plain_adamw()  # the reference's optimizer
        dtype = "fp32" if name.endswith("fp32") else "bf16"
        defense = DeepCopyASPL(iterations=iterations, dtype=dtype, **common)
    elif base in ONE_SHOT:
        steps = {"finetune_steps": iterations, "pgd_steps": iterations}
        defense = DEFENSES.build(base, {**steps, **classes, **lora})
    elif name == "apdm":  # the protocol's 20 inner steps
        defense = DEFENSES.build(name, {"iterations": iterations, **classes})
    else:
        defense = DEFENSES.build(base, {"iterations": iterations, **common, **lora})
    stamps = Stamps()
    logger = logging.getLogger("antipers.defenses")
    logger.setLevel(logging.INFO)
    logger.addHandler(stamps)
    reset_peak(device)
    startup = time.time() - psutil.Process().create_time()  # interpreter, imports, load
    t0 = time.perf_counter()
    defense.protect(person, bundle, torch.Generator().manual_seed(0))
    total = time.perf_counter() - t0
    marks = [t for t, msg in stamps.times if "iteration" in msg] or [t for t, _ in stamps.times]
    if base in ONE_SHOT:  # one mark: fine-tuning done, then PGD until the end
        mark = stamps.times[0][0]
        finetune, pgd = mark - t0, t0 + total - mark
        per = setup = total / iterations
        protocol = finetune / iterations * PROTOCOL_FINETUNE + pgd / iterations * PROTOCOL_PGD
    else:
        steps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
        per = statistics.median(steps) if steps else marks[0] - t0
        setup = max(marks[0] - t0 - per, 0.0)  # class images, surrogate, first encodes
        protocol = setup + per * (PROTOCOL_APDM if name in MODEL_TRACK else PROTOCOL_ITERATIONS)
    trains_text = getattr(defense, "train_text_encoder", False)
    parts = ("unet", "text_encoder") if trains_text else ("unet",)
    return {
        "device": str(device),
        "total_s": total,
        "per_iter_s": per,
        "resident_s": protocol,  # per identity with the model resident: no start-up
        "identity_s": startup + protocol,  # per identity in its own process
        "peak_gib": peak_gib(device),
        "weights_gib": gib(bundle, ("vae", "unet", "text_encoder")),
        "trainable_gib": gib(bundle, parts),
        "memory": " ".join(
            [os.environ.get("ANTIPERS_MEMORY", "auto"), *(f"-{lever}" for lever in args.without)]
        ),
        # where a full-weight surrogate of this size keeps its snapshots and moments in
        # this run, and whether its gradients exist all at once
        **plan_fields(MemoryPlan.choose(device, int(gib(bundle, parts) * 2**30))),
        "largest_gib": max(
            p.numel() * p.element_size()
            for part in parts
            for p in getattr(bundle, part).parameters()
        )
        / 2**30,
    }


def plan_fields(plan: MemoryPlan) -> dict[str, object]:
    return {
        "snapshots": plan.snapshots,
        "moments": plan.moments,
        "steps_in_backward": plan.steps_in_backward,
    }


def gib(bundle, parts) -> float:  # type: ignore[no-untyped-def]
    weights = {
        f"{part}.{n}": p for part in parts for n, p in getattr(bundle, part).named_parameters()
    }
    return parameter_bytes(weights) / 2**30


def breakdown(model: str, r: dict) -> str:
    """Where a full-weight surrogate's bytes go: exact sizes of what the algorithm must
    hold, and the measured peak's remainder (activations, the runtime)."""
    w, t = r["weights_gib"], r["trainable_gib"]
    away = {"disk"} if r["device"] == "cpu" else {"disk", "cpu"}  # off what peak counts
    moments = r.get("moments", "device")
    streamed = r.get("steps_in_backward", False)
    held = {
        "weights (VAE, UNet, text encoder)": w,
        f"AdamW moments (2 x trainable, {moments})": 0.0 if moments in away else 2 * t,
        "gradients (one tensor at a time)" if streamed else "gradients (clipping needs all)": (
            r["largest_gib"] if streamed else t
        ),
        f"snapshots (base, iteration, {r['snapshots']})": 0.0 if r["snapshots"] in away else 2 * t,
    }
    rest = r["peak_gib"] - sum(held.values())
    lines = [f"{model} {r['memory']}: where {r['peak_gib']:.2f} GiB go"]
    lines += [f"  {k:<36}{v:>8.2f}" for k, v in held.items()]
    lines.append(f"  {'activations, runtime (the rest)':<36}{rest:>8.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["tiny"])
    parser.add_argument("--defenses", nargs="+", default=[*ITERATIVE, *ONE_SHOT, *MODEL_TRACK])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument(
        "--memory", nargs="+", default=["auto"], choices=MODES, help="ANTIPERS_MEMORY per row"
    )
    parser.add_argument(
        "--short",
        action="store_true",
        help="1 surrogate step and 1 PGD step per phase: peak memory only (it does not "
        "grow with the counts), times not comparable",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per row (median)")
    parser.add_argument(
        "--without",
        nargs="+",
        default=[],
        choices=LEVERS,
        help="switch these levers of the run's memory plan off (each one's share): "
        "'moments' keeps AdamW's moments in memory, 'steps-in-backward' holds every "
        "gradient until the step",
    )
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "DEFENSE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        without_levers(args.without)
        emit(run_one(*args.one, args))
        return
    counts = "1+1+1 steps per iteration (memory only)" if args.short else "3+6+3 steps"
    print(
        f"{args.resolution} px, 4 photos, {args.iterations} iterations of {counts} measured "
        f"(median per iteration, median of {args.repeats} runs), extrapolated to the "
        "protocol's counts; 'identity s' includes the process's start-up, 'resident s' not"
    )
    if args.without:
        print(f"with these levers of the memory plan off: {', '.join(args.without)}")
    print(
        f"{'model':<11}{'defense':<20}{'memory':<7}{'device':<7}{'s/iter':>8}"
        f"{'identity s':>11}{'resident s':>11}{'peak GiB':>10}"
        f"{'time x ref':>11}{'mem x ref':>10}"
    )
    breakdowns = []
    for model in args.models:
        results: dict[tuple[str, str], dict | None] = {}
        for name in args.defenses:
            for memory in args.memory if name in FULL_WEIGHT else args.memory[:1]:
                runs = [
                    in_child(
                        __file__,
                        ["--one", model, name, *child_args(args)],
                        env={"ANTIPERS_MEMORY": memory},
                    )
                    for _ in range(args.repeats)
                ]
                ok = [r for r in runs if r is not None]
                results[(name, memory)] = median_run(ok) if ok else None
        naive = next((r for (n, _), r in results.items() if n == "aspl-deepcopy" and r), None)
        for (name, memory), r in results.items():
            if r is None:
                print(f"{model:<11}{name:<20}{memory:<7}failed")
                continue
            time_ratio = r["identity_s"] / naive["identity_s"] if naive else float("nan")
            mem_ratio = r["peak_gib"] / naive["peak_gib"] if naive else float("nan")
            print(
                f"{model:<11}{name:<20}{memory:<7}{r['device']:<7}{r['per_iter_s']:>8.3f}"
                f"{r['identity_s']:>11.1f}{r['resident_s']:>11.1f}{r['peak_gib']:>10.2f}"
                f"{time_ratio:>11.2f}{mem_ratio:>10.2f}"
            )
            if name == "aspl" and r["trainable_gib"] > 0.5:
                breakdowns.append(breakdown(model, r))
    for text in breakdowns:
        print("\n" + text)


def child_args(args: argparse.Namespace) -> list[str]:
    out = ["--resolution", str(args.resolution), "--iterations", str(args.iterations)]
    out += ["--without", *args.without] if args.without else []
    return out + (["--short"] if args.short else [])


LEVERS = ("moments", "steps-in-backward")


def without_levers(levers: list[str]) -> None:
    """This (child) process's memory plans with ``levers`` off, to measure each share."""
    if not levers:
        return
    choose = MemoryPlan.choose.__func__  # type: ignore[attr-defined]

    def chosen(cls: type[MemoryPlan], *args: object, **kwargs: object) -> MemoryPlan:
        plan = choose(cls, *args, **kwargs)
        if "moments" in levers:
            plan = dataclasses.replace(plan, moments="device")
        if "steps-in-backward" in levers:
            plan = dataclasses.replace(plan, steps_in_backward=False)
        return plan

    MemoryPlan.choose = classmethod(chosen)  # type: ignore[method-assign, assignment]


def median_run(runs: list[dict]) -> dict:
    """The run of median total time (its other numbers with it)."""
    return sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]


if __name__ == "__main__":
    main()
