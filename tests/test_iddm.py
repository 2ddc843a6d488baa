"""IDDM on the immunization track: the two-stage schedule, the embedders recorded in
the rows, the undefended baseline on the same board, and bad settings refused."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from antipers.attacks.lora import LoRADreamBooth
from antipers.defenses.iddm import IDDM
from antipers.models.embedders import embedder_model, identity_similarity, person_embedding
from antipers.registry import DATASETS, SpecError
from antipers.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict

FAST = {"embedder": "random", "embedder_depth": "r18", "pgd_steps": 2, "eps": 16.0}


@pytest.fixture(scope="module")
def person():
    return DATASETS.build("synthetic", {"n_identities": 2}).load("synth-0001", 64)


@pytest.mark.parametrize(
    "steps, learn_fraction, rounds, first, rounds_after",
    [(8, 0.5, 3, 4, [4, 5, 6]), (12, 0.25, 3, 3, [3, 6, 9]), (5, 0.6, 2, 3, [3, 4])],
)
def test_schedule_places_the_rounds_after_the_first_stage(
    steps, learn_fraction, rounds, first, rounds_after
):
    assert IDDM(learn_fraction=learn_fraction, rounds=rounds).schedule(steps) == (
        first,
        rounds_after,
    )


def test_two_stage_schedule_does_what_its_parameters_say(tiny_bundle, person, monkeypatch):
    import sys

    from antipers.models.bundle import DiffusionBundle, Posterior

    attack = LoRADreamBooth(steps=8, lr=1e-3, prior_weight=0.0, batch_size=len(person.set_B))
    iddm = IDDM(**FAST, learn_fraction=0.5, rounds=3)
    # the training loop encodes its photos once (again when a round replaces them) and
    # draws latents from that posterior at every step; the decoupling's PGD uses means
    posterior, latents = DiffusionBundle.posterior, Posterior.latents
    encoded = []  # the photos of each posterior the training loop made
    trained_on = []  # per personalization step: the photos its latents came from

    def spy_posterior(self, images, chunk=16):
        if sys._getframe(1).f_code.co_name == "finetune":
            encoded.append(images.detach().clone())
        return posterior(self, images, chunk)

    def spy_latents(self, generator=None):
        if generator is not None:
            trained_on.append(encoded[-1])
        return latents(self, generator)

    monkeypatch.setattr(DiffusionBundle, "posterior", spy_posterior)
    monkeypatch.setattr(Posterior, "latents", spy_latents)
    photos = person.set_B.clone()
    trained, trace = iddm.run(photos, tiny_bundle, attack, torch.Generator().manual_seed(0))
    monkeypatch.undo()
    assert trace.first_stage == 4 and trace.rounds_after == [4, 5, 6]
    assert trace.updates == len(trained_on) == attack.steps  # no step added to the attack's
    assert trace.pgd_steps == 3 * iddm.pgd_steps

    def clean(batch):
        return [any(torch.equal(img, p) for p in photos) for img in batch]

    # stage 1 trains on the clean photos, every later step on decoupled ones
    assert all(all(clean(batch)) for batch in trained_on[:4])
    assert not any(any(clean(batch)) for batch in trained_on[4:])
    assert torch.equal(photos, person.set_B)  # the caller's photos are not changed
    assert 0 < trace.linf <= iddm.eps + 1e-3
    embedder = embedder_model("random", "r18")
    before = float(identity_similarity(embedder, photos, person_embedding(embedder, photos)).mean())
    assert len(trace.similarity) == 3 and max(trace.similarity) < before
    assert trained.unet is not tiny_bundle.unet


def test_the_knob_orders_how_far_the_photos_move_from_the_person(tiny_bundle, person):
    attack = LoRADreamBooth(steps=6, lr=1e-3, prior_weight=0.0)
    final = {}
    for privacy in (0.0, 0.5, 1.0):
        _, trace = IDDM(**FAST, privacy=privacy, rounds=2).run(
            person.set_B, tiny_bundle, attack, torch.Generator().manual_seed(0)
        )
        final[privacy] = trace.similarity[-1]
    assert final[1.0] < final[0.5] < final[0.0]


@pytest.fixture(scope="module")
def immunization_store(tmp_path_factory):
    """The undefended personalization and IDDM under two optimization embedders."""
    from antipers.pipeline import RunContext, run_and_store
    from antipers.results import ResultStore

    store = ResultStore(str(tmp_path_factory.mktemp("immunization")))
    ctx = RunContext(device=torch.device("cpu"))
    attack = {"name": "lora", "steps": 4, "prior_weight": 0.0}
    for defense in (
        "none",
        {"name": "iddm", **FAST, "rounds": 2},
        {"name": "iddm", **FAST, "rounds": 2, "embedder": "random:1"},
    ):
        spec = ExperimentSpec.from_dict(
            tiny_spec_dict(track="immunization", defense=defense, attack=attack, metrics=["ism"])
        )
        rows, _ = run_and_store(spec, store, ctx)
        assert all(r["status"] != "error" for r in rows), rows[0]["error"]
    return store


def test_rows_record_the_optimization_and_the_evaluation_embedders(immunization_store):
    rows = immunization_store.load()
    agg = rows[(rows["image_index"] == -1) & (rows["defense"] == "iddm")]
    by_metric = agg.groupby("metric")["backend"].agg(set)
    evaluation = by_metric["ism"]
    optimization = by_metric["decoupled_ism"]
    assert evaluation == {"offline-retinaface-dlib"}
    assert optimization == {"iresnet-r18:random-seed0", "iresnet-r18:random-seed1"}
    assert not evaluation & optimization
    counts = agg[agg["metric"].str.startswith("decoupled_ism:")].set_index("metric")["value"]
    assert counts["decoupled_ism:personalization_steps"].tolist() == [4.0, 4.0]
    assert counts["decoupled_ism:decoupling_rounds"].tolist() == [2.0, 2.0]
    assert counts["decoupled_ism:pgd_steps"].tolist() == [4.0, 4.0]
    # every configuration, the baseline too, gets the utility row
    likeness = rows[(rows["metric"] == "subject_latent_distance") & (rows["image_index"] == -1)]
    assert sorted(likeness["defense"]) == ["iddm", "iddm", "none"]
    assert (likeness["value"] >= 0).all()


def test_undefended_personalization_is_the_baseline_on_the_same_board(immunization_store):
    from antipers.boards import load_boards
    from antipers.leaderboard import build_boards

    boards, _ = build_boards(immunization_store.load(), load_boards())
    (board,) = boards  # the defense's own measure does not split the baseline off
    assert board.baseline != "missing"  # found and checked (works or failed)
    assert sorted(board.table["defense"]) == ["iddm", "iddm", "none"]
    assert board.rules.primary == ("linkability", "ism")
    assert "subject_latent_distance" in board.visibility


def test_the_immunization_track_scores_linkability_by_default():
    spec = ExperimentSpec.from_dict({**tiny_spec_dict(track="immunization"), "defense": "none"})
    assert {m.name for m in spec.metrics} == {"brisque", "ism", "linkability"}
    assert {m.name for m in ExperimentSpec.from_dict(tiny_spec_dict()).metrics} == {"fdfr", "ism"}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"track": "image"}, "defense 'iddm' runs on the immunization track"),
        ({"defense": {"name": "iddm", "rounds": 9}}, "rounds: 9 decoupling rounds need"),
        ({"defense": {"name": "iddm", "privacy": 1.5}}, "privacy: expected 0..1"),
        ({"defense": {"name": "iddm", "learn_fraction": 1.0}}, "learn_fraction: expected"),
        ({"defense": {"name": "iddm", "embedder": "/no/backbone.pth"}}, "/no/backbone.pth do"),
        ({"defense": {"name": "iddm", "embedder": "random:x"}}, "expected random or random:SEED"),
        ({"defense": {"name": "iddm", "embedder": "random:"}}, "expected random or random:SEED"),
        ({"metrics": ["ism", "psnr"]}, "'psnr' compares protected photos"),
        ({"defense": {"name": "iddm", "embedder_depth": "r20"}}, "embedder_depth: expected"),
        ({"defense": {"name": "iddm", "embedder": "mini-faces"}}, "set embedder_depth: mini"),
        ({"defense": "aspl"}, "defense 'aspl' runs on the image track"),
    ],
)
def test_bad_settings_are_refused_when_the_spec_loads(changes, message):
    spec = tiny_spec_dict(track="immunization", defense="iddm", attack={"name": "lora", "steps": 8})
    spec.update(changes)
    with pytest.raises(SpecError, match=message):
        ExperimentSpec.from_dict(spec)


def test_later_rounds_start_from_the_last_but_stay_within_the_budget(tiny_bundle, person):
    from antipers.defenses.decouple import decouple
    from antipers.defenses.pgd import PGDConfig

    photos = person.set_B[:2]
    earlier = (photos + 12 / 255).clamp(0, 1)  # an earlier round's result, near the edge
    out = decouple(
        photos,
        tiny_bundle,
        embedder_model("random", "r18"),
        "a photo of sks person",
        0.5,
        PGDConfig(eps=8.0, step_size=2.0, steps=1),
        torch.Generator().manual_seed(0),
        start=earlier,
    )
    change = (out - photos).abs().max()
    assert change <= 8 / 255 + 1e-6  # projected around the originals
    assert change > 2 / 255 + 1e-6  # one 2/255 step from the originals could not get there


def test_a_second_evaluation_backend_splits_the_board_but_the_optimizer_does_not(
    immunization_store,
):
    """Two face backends for ``ism`` are never averaged; the two IDDM embedders of
    ``decoupled_ism`` (a defense's own measure) split nothing."""
    from antipers.boards import load_boards
    from antipers.leaderboard import build_boards

    rows = immunization_store.load()
    other = rows.copy()
    other["spec_id"] = other["spec_id"] + "-insightface"
    other.loc[other["metric"].str.startswith("ism"), "backend"] = "insightface-buffalo_l"
    boards, _ = build_boards(pd.concat([rows, other]), load_boards())
    assert len(boards) == 2
    for board in boards:
        assert sorted(board.table["defense"]) == ["iddm", "iddm", "none"]
    assert {"offline" in b.key["backends"] for b in boards} == {True, False}


def test_a_failing_own_measure_fails_alone(tiny_bundle):
    from antipers.defenses.iddm import DecouplingCheck
    from antipers.pipeline import own_measure

    check = DecouplingCheck("/no/such/backbone.pth", "r50", torch.rand(1, 3, 64, 64))
    result = own_measure(check, tiny_bundle, torch.rand(2, 3, 64, 64))
    assert result.metric == "decoupled_ism" and result.status == "error"
    assert "/no/such/backbone.pth" in result.reason


def test_the_embedder_is_resolved_where_it_optimizes(monkeypatch, tmp_path):
    from antipers.models.embedders import describe_embedder, resolve_embedder
    from antipers.models.iresnet import WEIGHTS_ENV

    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_ENV):
        resolve_embedder("")
    weights = tmp_path / "backbone.pth"
    torch.save(embedder_model("random", "r18").state_dict(), weights)
    monkeypatch.setenv(WEIGHTS_ENV, str(weights))
    assert resolve_embedder("") == str(weights.resolve())
    assert resolve_embedder("random:3") == "random:3"
    described = describe_embedder(str(weights.resolve()), "r18")
    assert described.startswith("iresnet-r18:backbone.pth@") and str(tmp_path) not in described
