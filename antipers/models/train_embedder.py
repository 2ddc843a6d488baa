"""The ``mini`` face embedder: an iresnet of an eighth of ArcFace's width, trained with
a CosFace margin on the synthetic generator's people, so that IDDM on ``mini-faces``
optimizes against a model that tells these faces apart (ArcFace's own weights cannot be
had offline, and random weights know no faces).

Its people come from a numpy stream of their own (``EMBEDDER_STREAM``), so none is a
``synthetic`` identity (those are torch-seeded) or a ``mini-faces`` training face. It
shares train-mini's resumable loop (``training_loop``: checkpoints, loss log,
progress bar);
``antipers models train-embedder`` reproduces the shipped weights.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from antipers.models.iresnet import EMBEDDING, IResNet
from antipers.models.training_loop import Loop, adamw_cosine, progress, read_losses, run_loop
from antipers.models.training_run import (
    cached,
    check_same_run,
    git_commit,
    machine,
    read_json,
    staged_export,
    timed_stage,
    to_uint8,
)
from antipers.ranges import Checked, Range

DEPTH = "mini"
WEIGHTS = "backbone.pth"


@dataclass(frozen=True)
class EmbedderTrainConfig(Checked):
    """Everything that determines the weights; recorded in the card."""

    seed: int = 0
    people: Annotated[int, Range(ge=2)] = 2048
    photos_per_person: Annotated[int, Range(ge=1)] = 8
    # the synthetic dataset's per-photo variation
    nudge: Annotated[float, Range(ge=0, le=2)] = 0.15
    resolution: Annotated[int, Range(ge=32)] = 64
    steps: Annotated[int, Range(ge=1)] = 2000
    batch: Annotated[int, Range(ge=2, note="BatchNorm")] = 64
    lr: Annotated[float, Range(gt=0)] = 2e-3
    warmup_steps: Annotated[int, Range(ge=0)] = 50
    # CosFace: the target logit's cosine minus this
    margin: Annotated[float, Range(ge=0, lt=1)] = 0.35
    scale: Annotated[float, Range(gt=0)] = 30.0
    checkpoint_every_s: float = 120.0
    eval_identities: Annotated[int, Range(ge=2)] = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resolution % 16:
            raise ValueError(f"resolution: expected a multiple of 16, got {self.resolution}")


class _CosFace(nn.Module):
    """Backbone and class centres trained together; only the backbone ships."""

    def __init__(self, people: int, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.backbone = IResNet(DEPTH)
            self.centres = nn.Parameter(torch.randn(people, EMBEDDING) * 0.01)

    def cosines(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images) @ F.normalize(self.centres, dim=1).T


def faces(work: Path, config: EmbedderTrainConfig, chunk: int = 64) -> torch.Tensor:
    """``(people, photos, 3, R, R)`` uint8, generated once and cached in ``work``."""
    from antipers.data.synthetic import EMBEDDER_STREAM, stream_faces

    def build() -> torch.Tensor:
        out = []
        for start in progress(range(0, config.people, chunk), "faces", unit_scale=chunk):
            for k in range(start, min(start + chunk, config.people)):
                photos = stream_faces(
                    EMBEDDER_STREAM,
                    k,
                    config.photos_per_person,
                    config.nudge,
                    config.resolution,
                )
                out.append(to_uint8(photos))
        return torch.stack(out)

    name = f"faces-{config.people}x{config.photos_per_person}-{config.resolution}.pt"
    return cached(work / name, build)


def train_embedder(
    out: Path,
    config: EmbedderTrainConfig = EmbedderTrainConfig(),
    device: torch.device | None = None,
) -> Path:
    """Train (or resume) into ``out/work-embedder``; export ``out/mini-faces-embedder``."""
    device = device or torch.device("cpu")
    work = out / "work-embedder"
    work.mkdir(parents=True, exist_ok=True)
    check_same_run(work / "config.json", config, "train-embedder")
    (work / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
    timings: dict[str, float] = read_json(work / "timings.json")
    data = timed_stage(work, timings, "faces", lambda: faces(work, config))
    model = _CosFace(config.people, config.seed).to(device)
    optimizer, schedule = adamw_cosine(model, config.lr, config.steps, config.warmup_steps)
    n, k = data.shape[:2]

    def step(i: int, gen: torch.Generator) -> torch.Tensor:
        person = torch.randint(0, n, (config.batch,), generator=gen)
        photo = torch.randint(0, k, (config.batch,), generator=gen)
        x = data[person, photo].float().div(255.0)
        flip = torch.rand(config.batch, generator=gen) < 0.5
        x[flip] = x[flip].flip(-1)
        cos = model.cosines(x.to(device))
        target = F.one_hot(person.to(device), n).to(cos.dtype)
        return F.cross_entropy(config.scale * (cos - config.margin * target), person.to(device))

    loop = Loop("embedder", model, optimizer, schedule, config.steps)
    timed_stage(work, timings, "embedder", lambda: run_loop(loop, step, work, config))
    backbone = model.backbone.cpu().eval()
    report = evaluate(backbone, config.eval_identities, config.resolution)
    seconds = sum(timings.values())
    return export(backbone, out / "mini-faces-embedder", config, seconds, report, work)


def evaluate(backbone: IResNet, identities: int = 16, resolution: int = 64) -> dict[str, Any]:
    """On evaluation people it never saw (the ``synthetic`` dataset, seed 0): each
    set_B/set_C photo's cosine to its own person's set_A mean and to everyone else's,
    and rank-1 identification, against the same architecture at random weights."""
    from antipers.data.synthetic import SyntheticDataset
    from antipers.models.iresnet import random_iresnet

    dataset = SyntheticDataset(n_identities=identities)
    people = [dataset.load(name, resolution) for name in dataset.identities()]
    report = {}
    for name, model in (("trained", backbone), ("random", random_iresnet(DEPTH, 0))):
        report[name] = identification(model, people)
    return report


@torch.no_grad()
def identification(model: nn.Module, people: list[Any]) -> dict[str, float]:
    means = F.normalize(torch.stack([model(p.set_A).mean(0) for p in people]), dim=1)
    same, other, hits, total = [], [], 0, 0
    for i, person in enumerate(people):
        cos = model(torch.cat([person.set_B, person.set_C])) @ means.T
        same.extend(cos[:, i].tolist())
        other.extend(np.delete(cos.numpy(), i, axis=1).ravel().tolist())
        hits += int((cos.argmax(1) == i).sum())
        total += len(cos)
    return {
        "same_person_cosine": float(np.mean(same)),
        "different_person_cosine": float(np.mean(other)),
        "different_person_q95": float(np.quantile(other, 0.95)),
        "rank1": hits / total,
        "people": len(people),
    }


def export(
    backbone: IResNet,
    folder: Path,
    config: EmbedderTrainConfig,
    seconds: float,
    report: dict[str, Any],
    work: Path,
) -> Path:
    """``backbone.pth`` (loads with ``load_iresnet(path, "mini")``), the card, the loss
    log, renamed into place."""
    record = {
        "config": dataclasses.asdict(config),
        "training_s": round(seconds, 1),
        "machine": machine(),
        "commit": git_commit(),
        "evaluation": report,
    }

    def write(staging: Path) -> None:
        torch.save(backbone.state_dict(), staging / WEIGHTS)
        (staging / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        shutil.copy(work / "losses.csv", staging / "losses.csv")
        (staging / "README.md").write_text(card(record, read_losses(work / "losses.csv")))

    return staged_export(folder, write)


def card(record: dict[str, Any], losses: list[dict[str, Any]]) -> str:
    cfg, ev = record["config"], record["evaluation"]
    values = [float(r["loss"]) for r in losses if r["stage"] == "embedder"]
    head = np.mean(values[:50]) if values else float("nan")
    tail = np.mean(values[-50:]) if values else float("nan")
    rows = "\n".join(
        f"| {name} | {e['same_person_cosine']:.3f} | {e['different_person_cosine']:.3f} | "
        f"{e['different_person_q95']:.3f} | {e['rank1']:.3f} |"
        for name, e in ev.items()
    )
    return f"""# mini-faces-embedder

A face embedder for `mini-faces`, antipers' offline miniature: iresnet `mini` (ArcFace's
improved ResNet blocks, one per stage, widths 16/32/64/128, 64 px input, 512-d output),
trained with a CosFace margin ({cfg["margin"]}, scale {cfg["scale"]}) to tell apart
{cfg["people"]} synthetic people ({cfg["photos_per_person"]} photos each, latent nudge
{cfg["nudge"]}) drawn from the DCGAN generator on a numpy stream of their own, so that
none is a `synthetic` identity (torch-seeded) or a `mini-faces` training face. It is
what IDDM optimizes against on the miniature (`embedder: mini-faces`, `embedder_depth:
mini`); it is not ArcFace and says nothing about real faces.

Reproduce: `antipers models train-embedder --out DIR` ({cfg["steps"]} steps of batch
{cfg["batch"]}, AdamW lr {cfg["lr"]}, cosine schedule, horizontal flips; seed
{cfg["seed"]}). Trained in {record["training_s"] / 60:.1f} min on {record["machine"]};
code at commit {record["commit"]}. Loss (CosFace cross-entropy) {head:.2f} over the
first 50 steps, {tail:.2f} over the last 50 (`losses.csv`).

On {ev["trained"]["people"]} evaluation people it never saw (`synthetic`, seed 0, 64 px;
each set_B/set_C photo against each person's set_A mean; rank-1 over so few people
saturates even at random weights, the margin between the two cosines is the measure):

| weights | same-person cosine | different-person cosine | different q95 | rank-1 |
|---|---|---|---|---|
{rows}
"""
