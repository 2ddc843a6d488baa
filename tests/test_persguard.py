"""PersGuard's losses on constructed inputs, its backdoor outputs, its checks, and one
short implant on the tiny model."""

from __future__ import annotations

import pytest
import torch

from antipers.defenses.backdoor import backdoor_loss, backdoor_target, prior_loss
from antipers.defenses.persguard import PersGuard, checkerboard
from antipers.images import write_png
from antipers.registry import DATASETS, SpecError
from antipers.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict


def test_backdoor_target_denoises_to_the_backdoor_output(tiny_bundle):
    scheduler = tiny_bundle.scheduler
    gen = torch.Generator().manual_seed(0)
    photo, output, noise = (torch.randn(3, 4, 8, 8, generator=gen) for _ in range(3))
    t = torch.tensor([10, 400, 900])
    noisy = scheduler.add_noise(photo, noise, t)
    # zero point: with the photo itself as the output, the target is the true noise
    assert torch.allclose(backdoor_target(scheduler, noisy, photo, t), noise, atol=1e-4)
    # direction: predicting the target makes the model's estimate of x0 the output
    eps = backdoor_target(scheduler, noisy, output, t)
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    estimate = (noisy - (1 - abar).sqrt() * eps) / abar.sqrt()
    assert torch.allclose(estimate, output, atol=1e-4)


def test_backdoor_loss_with_the_photo_as_output_is_the_weighted_denoising_loss(tiny_bundle):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    latents = tiny_bundle.encode(images)
    embeds = tiny_bundle.prompt_embeds(["a photo of sks person"] * 2)
    with torch.no_grad():
        draws = torch.Generator().manual_seed(2)  # the draws backdoor_loss makes
        noise = tiny_bundle.noise_like(latents, draws)
        t = tiny_bundle.sample_timesteps(2, draws)
        per_sample = tiny_bundle.denoising_loss(latents, embeds, noise, t, reduction="none")
        plain = ((1 - tiny_bundle.scheduler.alphas_cumprod[t]) * per_sample).mean()
        same = backdoor_loss(
            tiny_bundle, latents, latents, embeds, torch.Generator().manual_seed(2)
        )
        other = backdoor_loss(
            tiny_bundle, latents, latents.flip(0), embeds, torch.Generator().manual_seed(2)
        )
    assert same.item() == pytest.approx(plain.item(), rel=1e-4)
    assert other.item() > same.item()  # another output is further from what it predicts


def test_prior_loss_is_zero_against_itself_and_grows_with_change(tiny_bundle):
    latents = tiny_bundle.encode(
        torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    )
    embeds = tiny_bundle.prompt_embeds(["a photo of person"] * 2)
    student = tiny_bundle.copy_of("unet")
    gen = torch.Generator
    with torch.no_grad():
        assert prior_loss(student, tiny_bundle, latents, embeds, gen().manual_seed(4)).item() == 0
        student.unet.conv_in.weight.add_(0.05)
        assert prior_loss(student, tiny_bundle, latents, embeds, gen().manual_seed(4)).item() > 0


def test_pattern_backdoor_output_is_a_visible_checkerboard():
    photos = torch.full((2, 3, 32, 32), 0.5)
    out = checkerboard(photos, 0.5)
    centre = out[..., 8:24, 8:24]
    assert set(centre.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(out[..., :8, :], photos[..., :8, :])  # the rest untouched


@pytest.mark.parametrize(
    "defense, message",
    [
        ({"name": "persguard", "backdoor": "invisible"}, "backdoor: unknown 'invisible'"),
        ({"name": "persguard", "backdoor": "target"}, "target_image: the target backdoor needs"),
        (
            {"name": "persguard", "backdoor": "target", "target_image": "/no/such/file.png"},
            "target_image: /no/such/file.png does not exist",
        ),
        (
            {"name": "persguard", "backdoor": "erasure", "iterations": 0},
            "erasure has no check of its own",
        ),
    ],
)
def test_bad_backdoors_are_refused_when_the_spec_loads(defense, message):
    with pytest.raises(SpecError, match=message):
        ExperimentSpec.from_dict(tiny_spec_dict(track="model", defense=defense))


@pytest.fixture(scope="module")
def target_file(tmp_path_factory):
    person = DATASETS.build("synthetic", {"n_identities": 4}).load("synth-0003", 64)
    path = tmp_path_factory.mktemp("target") / "target.png"
    write_png(person.set_A[:1], [path])
    return str(path)


def test_a_short_implant_runs_every_loss(tiny_bundle, target_file):
    person = DATASETS.build("synthetic", {"n_identities": 2}).load("synth-0000", 64)
    settings = {
        "backdoor": "target",
        "target_image": target_file,
        "iterations": 2,
        "simulated_steps": 2,
        "lr": 1e-3,
        "simulated_lr": 1e-3,
        "num_class_images": 2,
        "class_steps": 2,
    }
    before = {k: v.clone() for k, v in tiny_bundle.unet.state_dict().items()}
    protected, trace = PersGuard(**settings).train(
        person, tiny_bundle, torch.Generator().manual_seed(0)
    )
    assert len(trace.backdoor) == len(trace.prior) == len(trace.retention) == 2
    assert any(not torch.equal(v, before[k]) for k, v in protected.unet.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in tiny_bundle.unet.state_dict().items())
    # without retention no attacker is simulated
    _, trace = PersGuard(**settings, retention_weight=0.0).train(
        person, tiny_bundle, torch.Generator().manual_seed(0)
    )
    assert trace.retention == []


def test_backdoor_checks_measure_what_shows(tiny_bundle, target_file):
    from antipers.defenses.persguard import BackdoorCheck

    photos = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    pattern = BackdoorCheck("pattern", checkerboard(photos[:1], 0.5), 0.5)
    stamped = pattern.score(tiny_bundle, checkerboard(photos, 0.5))
    plain = pattern.score(tiny_bundle, photos)
    assert stamped.metric == "backdoor_pattern" and stamped.aggregate == pytest.approx(1.0)
    assert abs(plain.aggregate) < 0.2  # random photos do not carry it
    target = PersGuard(target_image=target_file).outputs(photos[:1], tiny_bundle)
    check = BackdoorCheck("target", target)
    distances = check.score(tiny_bundle, torch.cat([target, photos])).values
    assert distances[0] == pytest.approx(0.0, abs=1e-6) and (distances[1:] > 1e-3).all()


def test_model_track_rows_carry_the_backdoor_measure():
    from antipers.pipeline import RunContext, run_experiment

    defense = {
        "name": "persguard",
        "backdoor": "pattern",
        "iterations": 1,
        "simulated_steps": 1,
        "num_class_images": 2,
        "class_steps": 2,
    }
    spec = ExperimentSpec.from_dict(
        tiny_spec_dict(track="model", defense=defense, metrics=["fdfr"])
    )
    rows = run_experiment(spec, RunContext(device=torch.device("cpu")), raise_errors=True)
    found = {
        (r["subject"], r["higher_is_better"])
        for r in rows
        if r["metric"] == "backdoor_pattern" and r["image_index"] == -1
    }
    # on the protected person the backdoor showing is the defense working; on anyone else
    # it is the defense breaking their personalization
    assert found == {("protected", True), ("unprotected", False)}


def test_the_control_scores_the_clean_model_with_the_same_check(tiny_bundle, target_file):
    person = DATASETS.build("synthetic", {"n_identities": 2}).load("synth-0000", 64)
    control = PersGuard(target_image=target_file, iterations=0)
    protected = control.protect(person, tiny_bundle, torch.Generator().manual_seed(0))
    assert protected.bundle is tiny_bundle  # nothing implanted, nothing copied
    (check,) = protected.checks
    implanted = PersGuard(target_image=target_file, iterations=1, simulated_steps=0)
    reference = implanted.outputs(person.set_B[:1], tiny_bundle)
    assert check.metric == "backdoor_target_distance"
    assert torch.equal(check.reference, reference.cpu())
    with pytest.raises(SpecError, match="iterations 0 is the control"):
        ExperimentSpec.from_dict(
            tiny_spec_dict(
                track="model",
                defense={
                    "name": "persguard",
                    "backdoor": "pattern",
                    "iterations": 0,
                    "save_to": "/tmp/x",
                },
            )
        )
