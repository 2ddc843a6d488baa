"""Tracks are objects the stages call: a fourth one is a class and a registry line, and
what it adds (subjects, own measures, its personalization) reaches the rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

from antipers.metrics.base import MetricResult
from antipers.pipeline import RunContext, run_experiment
from antipers.registry import TRACKS
from antipers.rows import UNPROTECTED
from antipers.spec import ExperimentSpec
from antipers.tracks.base import AttackRun, Subject, Track
from tests.conftest import tiny_spec_dict

CALLS: list[str] = []


@dataclass(frozen=True)
class Brightness:
    """An own measure: the generations' mean pixel value."""

    metric: str = "brightness"
    higher_is_better: bool = False

    def score(self, bundle, images: torch.Tensor) -> MetricResult:
        values = images.flatten(1).mean(1).numpy().astype(np.float64)
        return MetricResult(self.metric, values, float(values.mean()), "test", False, "unit")


@dataclass(frozen=True)
class TwinTrack(Track):
    """The attacker also personalizes on the protected person's set_C (a twin subject)."""

    def personalize(self, run: AttackRun):
        CALLS.append("personalize")
        return super().personalize(run)

    def after_attack(self, run: AttackRun, personalized) -> None:
        twin = run.ctx.identity(run.spec).set_C.to(run.ctx.device)
        theirs = run.attack.personalize(twin, run.model, run.rng("personalize"))
        generated = run.sampler.sample(theirs, run.spec.resolution, run.rng("sample"))
        run.handoff.subjects.append(
            Subject(
                UNPROTECTED,
                "synth-0000",
                generated,
                list(run.sampler.image_prompts()),
                metrics=("fdfr",),
                utility=True,
            )
        )

    def own_measures(self, identity):
        return [Brightness()]


@pytest.fixture
def twin_track():
    TRACKS.register("twin", f"{__name__}:TwinTrack")
    yield
    TRACKS._targets.pop("twin")
    TRACKS._loaded.pop("twin", None)


def test_a_fourth_track_is_one_class_and_a_registry_line(twin_track):
    spec = ExperimentSpec.from_dict(tiny_spec_dict(track="twin", metrics=["fdfr", "ism"]))
    CALLS.clear()
    df = pd.DataFrame(
        run_experiment(spec, RunContext(device=torch.device("cpu")), raise_errors=True)
    )
    assert CALLS == ["personalize"]
    aggregate = df[df["image_index"] == -1]
    mine = aggregate[aggregate["subject"] == "protected"]
    assert {"fdfr", "ism", "brightness"} <= set(mine["metric"])
    twin = aggregate[aggregate["subject"] == UNPROTECTED]
    # only the metrics the subject asked for, its own identity, the direction flipped
    assert list(twin["metric"]) == ["fdfr"]
    assert twin["identity"].iloc[0] == "synth-0000"
    assert bool(twin["higher_is_better"].iloc[0]) != bool(
        mine[mine["metric"] == "fdfr"]["higher_is_better"].iloc[0]
    )


def test_an_unknown_track_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="track: expected one of image, immunization, model"):
        ExperimentSpec.from_dict(tiny_spec_dict(track="video"))


def test_photo_budget_metrics_belong_to_tracks_that_change_photos():
    assert TRACKS.get("image").changes_photos and not TRACKS.get("model").changes_photos
    with pytest.raises(ValueError, match="on the model track no defense changes the published"):
        ExperimentSpec.from_dict(tiny_spec_dict(track="model", metrics=["psnr"]))


def test_attacks_on_one_copied_protection_keep_their_own_subjects():
    """validity.py protects once and copies the handoff for each attack: what one
    attack measured and added (person_loss, the bystander) must not reach another's rows."""
    import dataclasses

    from antipers.pipeline import attack_stage, experiment_rows, protect_stage, score_stage

    ctx = RunContext(device=torch.device("cpu"))
    first = ExperimentSpec.from_dict(tiny_spec_dict(track="model"))
    second = first.override({"attack.steps": 4})
    say = lambda stage: None  # noqa: E731
    protected = protect_stage(first, ctx, say)
    counts = []
    for spec in (first, second):
        handoff = dataclasses.replace(protected, checks=list(protected.checks), workers=[])
        handoff = score_stage(spec, ctx, attack_stage(spec, ctx, handoff, say), say)
        rows = pd.DataFrame(experiment_rows(spec, handoff))
        aggregate = rows[(rows["image_index"] == -1) & (rows["metric"] == "person_loss")]
        counts.append(aggregate.groupby("subject").size().to_dict())
    assert counts == [{"protected": 1, "unprotected": 1}] * 2
