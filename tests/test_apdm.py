"""APDM on the tiny model: the DPO loss, Learning to Protect's two paths, saving the
protected model, and the model track's rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from antipers.defenses.apdm import APDM
from antipers.defenses.dpo import dpo_loss, preference_loss
from antipers.defenses.model_folder import RECORD
from antipers.images import write_png
from antipers.models.local import DiffusersFolder
from antipers.registry import DATASETS


def errors(*values):
    return [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]


def test_dpo_loss_on_constructed_errors():
    beta = 2.0
    # model == reference: no preference yet, loss log 2; the gradient pushes the preferred
    # (generic) error down and the dispreferred (subject) error up, beta/2 each
    mw, rw, ml, rl = errors([0.3], [0.3], [0.5], [0.5])
    loss = dpo_loss(mw, rw, ml, rl, beta)
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    assert mw.grad.item() == pytest.approx(beta / 2) and ml.grad.item() == pytest.approx(-beta / 2)
    assert rw.grad is None and rl.grad is None  # the frozen reference receives nothing

    def value(model_w, model_l, b=beta):
        return dpo_loss(*errors([model_w], [0.3], [model_l], [0.5]), b).item()

    assert value(0.3, 0.6) < math.log(2) < value(0.4, 0.5)  # subject worse: lower loss
    assert value(0.3, 0.9) < value(0.3, 0.6)  # monotone in the margin
    assert value(0.3, 0.6, b=0.0) == pytest.approx(math.log(2))  # beta 0: no preference
    assert value(0.3, 0.6, b=8.0) < value(0.3, 0.6, b=2.0)  # beta sharpens it
    assert value(0.4, 0.5, b=8.0) > value(0.4, 0.5, b=2.0)


def test_dpo_loss_through_the_model(tiny_bundle):
    """At model == reference the loss is log 2 on any pair; on a pair of one image the
    gradient vanishes (what lowers one error raises the other)."""
    model = tiny_bundle.copy_of("unet")
    model.unet.requires_grad_(True)
    photos = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    latents = tiny_bundle.encode(photos)
    embeds = tiny_bundle.prompt_embeds(["a photo of sks person"])
    gen = torch.Generator().manual_seed(1)
    loss = preference_loss(model, tiny_bundle, latents[:1], latents[1:], embeds, 1.0, gen)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    params = list(model.unet.parameters())

    def largest_gradient(loss: torch.Tensor) -> float:
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return max(g.abs().max().item() for g in grads if g is not None)

    pair = largest_gradient(loss)
    same = preference_loss(model, tiny_bundle, latents[:1], latents[:1], embeds, 1.0, gen)
    assert pair > 1e-4 and largest_gradient(same) < 1e-3 * pair  # zero up to float32 rounding
    assert all(p.grad is None for p in tiny_bundle.unet.parameters())


@pytest.fixture(scope="module")
def person():
    return DATASETS.build("synthetic", {"n_identities": 2}).load("synth-0000", 64)


@pytest.fixture(scope="module")
def generic_dir(tmp_path_factory):
    """Generic photos to prefer (the tiny model's own class images are noise, not people)."""
    folder = tmp_path_factory.mktemp("generic")
    people = DATASETS.build("synthetic", {"n_identities": 5})
    photos = torch.cat([people.load(f"synth-000{i}", 64).set_A for i in (2, 3, 4)])
    write_png(photos, [folder / f"{i:03d}.png" for i in range(len(photos))])
    return str(folder)


FAST = {"iterations": 2, "inner_steps": 2, "lr": 1e-3, "inner_lr": 1e-3, "batch_size": 2}


def test_the_personalization_path_reaches_the_model_only_through_gradients(
    tiny_bundle, person, generic_dir
):
    before = {k: v.clone() for k, v in tiny_bundle.unet.state_dict().items()}
    # beta 0 and no prior: the protection path contributes nothing, so however far the
    # simulated attacker moved its copy, the protected weights stay exactly the base's
    apdm = APDM(**FAST, beta=0.0, prior_weight=0.0, paired_dir=generic_dir)
    protected, trace = apdm.train(
        person, tiny_bundle, torch.Generator().manual_seed(0), *apdm.folders(tiny_bundle, 64)
    )
    assert min(trace.inner_drift) > 0 and len(trace.dpo) == 2
    for name, value in protected.unet.state_dict().items():
        assert torch.equal(value, before[name]), name
    # with beta > 0 the same path moves them; the base model is never touched
    apdm = APDM(**FAST, beta=1.0, prior_weight=0.0, paired_dir=generic_dir)
    protected, _ = apdm.train(
        person, tiny_bundle, torch.Generator().manual_seed(0), *apdm.folders(tiny_bundle, 64)
    )
    moved = [not torch.equal(v, before[k]) for k, v in protected.unet.state_dict().items()]
    assert any(moved)
    assert all(torch.equal(v, before[k]) for k, v in tiny_bundle.unet.state_dict().items())


@pytest.fixture(scope="module")
def retain_dir(tmp_path_factory):
    """Two people who are not protected, in the Anti-DreamBooth layout."""
    folder = tmp_path_factory.mktemp("retain")
    people = DATASETS.build("synthetic", {"n_identities": 7})
    for name in ("synth-0005", "synth-0006"):
        photos = people.load(name, 64)
        for part in ("set_A", "set_B", "set_C"):
            images = getattr(photos, part)
            write_png(images, [folder / name / part / f"{i}.png" for i in range(len(images))])
    return str(folder)


def test_the_retention_path_keeps_others_personalizable(
    tiny_bundle, person, generic_dir, retain_dir
):
    """With DPO and prior off, retention is the only force: it must move the weights
    (where beta 0 alone leaves them exactly the base's) and lower the retained people's
    held-out loss under the attacker's prompt, one path per iteration, people in turn."""
    from antipers.data.folders import AntiDreamBoothFolders
    from tests.conftest import eval_loss

    apdm = APDM(
        **FAST,
        beta=0.0,
        prior_weight=0.0,
        paired_dir=generic_dir,
        retain_dir=retain_dir,
        retain_weight=1.0,
    )
    protected, trace = apdm.train(
        person, tiny_bundle, torch.Generator().manual_seed(0), *apdm.folders(tiny_bundle, 64)
    )
    assert len(trace.retain) == FAST["iterations"] and all(map(math.isfinite, trace.retain))
    held_out = torch.cat(
        [AntiDreamBoothFolders(retain_dir).load(n, 64).set_A for n in ("synth-0005", "synth-0006")]
    )
    assert eval_loss(protected, held_out) < eval_loss(tiny_bundle, held_out)
    # the retained photos are part of what the protected model depends on
    plain = APDM(**FAST, paired_dir=generic_dir)
    record = apdm.record(person, tiny_bundle, *apdm.folders(tiny_bundle, 64))["params"]
    assert record["retain_dir"] != retain_dir and record["retain_dir"]
    record = plain.record(person, tiny_bundle, *plain.folders(tiny_bundle, 64))["params"]
    assert record["retain_dir"] == ""


def test_protected_model_is_saved_as_diffusers_folder_and_reused(
    tiny_bundle, person, generic_dir, tmp_path
):
    folder = tmp_path / "apdm-model"
    apdm = APDM(**FAST, paired_dir=generic_dir, save_to=str(folder))
    first = apdm.protect(person, tiny_bundle, torch.Generator().manual_seed(0))
    assert (folder / RECORD).is_file() and (folder / "unet").is_dir()
    loaded = DiffusersFolder(str(folder)).load(torch.device("cpu"))
    saved, trained = loaded.unet.state_dict(), first.bundle.unet.state_dict()
    assert all(torch.equal(saved[k], trained[k]) for k in trained)
    again = apdm.protect(person, tiny_bundle, torch.Generator().manual_seed(5))
    assert again.log.reused and again.bundle.fingerprint == first.bundle.fingerprint
    assert all(torch.equal(again.bundle.unet.state_dict()[k], trained[k]) for k in trained)
    other = APDM(**{**FAST, "iterations": 1}, paired_dir=generic_dir, save_to=str(folder))
    assert not other.protect(person, tiny_bundle, torch.Generator().manual_seed(0)).log.reused
    assert not list(tmp_path.glob(".apdm-model-*"))  # no temporary folder left


def test_bad_settings_are_refused():
    for bad in ({"iterations": 0}, {"inner_steps": -1}, {"lr": 0.0}, {"beta": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            APDM(**bad)
    with pytest.raises(ValueError, match="paired_dir"):
        APDM(paired_dir="/nonexistent-folder").paired_images(None, 64)
    with pytest.raises(ValueError, match="retain_weight: expected >= 0"):
        APDM(retain_weight=-1.0, retain_dir="x")
    with pytest.raises(ValueError, match="retain_weight: needs retain_dir"):
        APDM(retain_weight=1.0)


def test_model_track_rows_name_each_subject(tmp_path, generic_dir):
    from antipers.pipeline import RunContext, run_experiment
    from antipers.spec import ExperimentSpec
    from tests.conftest import tiny_spec_dict

    ctx = RunContext(device=torch.device("cpu"))
    rows = {}
    for defense in ("none", {"name": "apdm", **FAST, "paired_dir": generic_dir}):
        metrics = ["fdfr", "ism", "clip-t"]  # clip-t: on ordinary prompts too (no weights here)
        data = tiny_spec_dict(track="model", defense=defense, metrics=metrics)
        spec = ExperimentSpec.from_dict(data)
        rows[spec.defense.name] = run_experiment(spec, ctx, raise_errors=True)
    for defense, got in rows.items():
        agg = [r for r in got if r["image_index"] == -1 and ":" not in r["metric"]]
        subjects = {(r["subject"], r["identity"]) for r in agg}
        assert subjects == {
            ("protected", "synth-0001"),
            ("unprotected", "synth-0000"),
            ("generic", "synth-0001"),
        }, defense
        ism = {r["subject"]: r["higher_is_better"] for r in agg if r["metric"] == "ism"}
        assert ism == {"protected": False, "unprotected": True}  # bystander ISM is utility
        # how far each attack got, on each person's held-out photos: a failed attack is
        # the defense's success for the protected person, the bystander's loss is utility
        loss = {r["subject"]: r for r in agg if r["metric"] == "person_loss"}
        assert {s: r["higher_is_better"] for s, r in loss.items()} == {
            "protected": True,
            "unprotected": False,
        }
        assert all(np.isfinite(r["value"]) and r["value"] > 0 for r in loss.values())
        per_photo = [r for r in got if r["metric"] == "person_loss" and r["image_index"] >= 0]
        assert len(per_photo) == 2 * len(ctx.identity(spec).set_A)
        generic = {r["metric"]: r for r in agg if r["subject"] == "generic"}
        assert set(generic) == {"generic_loss_gain", "clip-t"}
        assert generic["clip-t"]["status"] == "unavailable"  # says why, invents nothing
        gain = generic["generic_loss_gain"]["value"]
        assert (gain == 0.0) if defense == "none" else np.isfinite(gain)
    single = ExperimentSpec.from_dict(
        tiny_spec_dict(
            track="model", identity="synth-0000", dataset={"name": "synthetic", "n_identities": 1}
        )
    )
    (error,) = run_experiment(single, ctx)
    assert error["status"] == "error" and "no identity besides" in error["error"]


@pytest.mark.slow
def test_on_mini_faces_the_attack_it_simulates_fails_on_the_person_alone():
    """Issue 19's behaviour test, on the shipped ``mini-faces`` (about 2 minutes):
    ``validity-apdm-budget.yaml``'s APDM at half its iterations protects synth-0000.
    Before any attack, the protected model's loss rises on the person's held-out photos
    much more than on a bystander's or on held-out generic images. After the campaign's
    DreamBooth, run for APDM's ``inner_steps`` (the attack Learning to Protect simulates,
    at the same lr), the person's loss is still above what the same attack reaches on
    the base model, while the bystander's, attacked on their own photos, moves much
    less. The campaign's full 120-step attack erases the effect by about step 64
    (``benchmarks/apdm_horizon.py``; README, "Model-track defenses"), so this checks the
    mechanism, not protection against the evaluation's attacker.

    Like is compared with like: the generic images are never attacked, so they are
    compared before the attack (their +0.025 against the attacked person's +0.039 would
    not pass). The attack's noise sets the tolerances after it: the attack is repeated
    with 3 seeds (APDM runs once, seed 0); the person's gain over the base model must
    exceed the spread of the base model's loss across those seeds at every seed, and the
    paired person-minus-bystander gain must have its 95% t-interval over the seeds above
    0. "Much less" is a fixed definition, not a noise bound: under half the person's
    gain (measured on 2 CPU cores, 2026-12-07, before the attack: person +0.087,
    bystander +0.020, generic +0.025; after: person +0.039, bystander +0.007; with beta 0,
    prior preservation alone, +0.033, +0.021 and +0.022, and the test fails)."""
    import dataclasses
    from pathlib import Path

    import antipers
    from antipers.campaign import load_campaign
    from antipers.registry import ATTACKS, BASE_MODELS
    from antipers.tracks.model import generic_loss, held_out_images, person_loss

    campaign = Path(antipers.__file__).parent / "campaigns" / "validity-apdm-budget.yaml"
    spec = next(s for s in load_campaign(campaign).specs if s.defense.name == "apdm")
    apdm = APDM(**{**spec.defense.kwargs, "iterations": 60})
    attack = ATTACKS.build(spec.attack.name, spec.attack.kwargs)
    assert attack.lr == apdm.inner_lr  # the attack it simulates is the campaign's, cut short
    attack = dataclasses.replace(attack, steps=apdm.inner_steps)
    base = BASE_MODELS.build(spec.base_model.name, spec.base_model.kwargs).load(torch.device("cpu"))
    people = DATASETS.build(spec.dataset.name, spec.dataset.kwargs)
    person, bystander = (people.load(n, spec.resolution) for n in people.identities()[:2])
    protected = apdm.protect(person, base, torch.Generator().manual_seed(0)).bundle

    def loss(model, who):
        return person_loss(model, who.set_A).aggregate

    def attacked_losses(model, who):
        seeds = (0, 1, 2)
        tuned = (
            attack.personalize(who.set_B, model, torch.Generator().manual_seed(s)) for s in seeds
        )
        return np.array([loss(t, who) for t in tuned])

    # before the attack
    unattacked = {
        who: loss(protected, p) - loss(base, p)
        for who, p in (("person", person), ("bystander", bystander))
    }
    unattacked["generic"] = generic_loss(
        protected, base, held_out_images(base, attack, spec.resolution)
    ).aggregate
    for other in ("bystander", "generic"):
        assert abs(unattacked[other]) < unattacked["person"] / 2, unattacked
    # after the attack it simulates
    person_base = attacked_losses(base, person)
    gain = attacked_losses(protected, person) - person_base
    bystander_gain = attacked_losses(protected, bystander) - attacked_losses(base, bystander)
    spread = person_base.max() - person_base.min()
    assert gain.min() > spread, (gain, spread)
    paired = gain - bystander_gain
    half_width = 4.303 * paired.std(ddof=1) / np.sqrt(len(paired))  # t(2) at 97.5%
    assert paired.mean() - half_width > 0, (gain, bystander_gain, half_width)
    assert abs(bystander_gain.mean()) < gain.mean() / 2, (gain, bystander_gain)
