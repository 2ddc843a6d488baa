import pytest
import torch

from antipers.attacks.countermeasures import (
    JPEG,
    AttackEnv,
    Blur,
    Flip,
    Mix,
    Noise,
    Purify,
    Resize,
)
from antipers.attacks.impress import Impress, consistency
from antipers.attacks.sampling import SCHEDULERS, GuidedSampler
from antipers.data.synthetic import SyntheticDataset
from antipers.images import check_images
from antipers.pipeline import RunContext, run_experiment
from antipers.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict


@pytest.fixture(scope="module")
def person():
    return SyntheticDataset(n_identities=1, photos_per_set=4).load("synth-0000", 64)


@pytest.fixture
def env(tiny_bundle, person):
    return AttackEnv(tiny_bundle, person, torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "cm",
    [
        JPEG(50),
        Resize(2.0),
        Resize(4.0, "area"),
        Blur(5, 1.5),
        Flip(1.0),
        Flip(0.5),
        Purify(50, 3),
        Mix(2),
        Noise(12.75),
        Noise(255.0),
        Impress(steps=3),
    ],
    ids=repr,
)
def test_countermeasures_keep_the_image_contract(cm, person, env):
    out = cm.apply(person.set_B, env)
    check_images(out)
    assert out.shape == person.set_B.shape


def test_jpeg_error_grows_as_quality_drops(person, env):
    errors = [
        float((JPEG(q).apply(person.set_B, env) - person.set_B).abs().mean())
        for q in (95, 75, 50, 10)
    ]
    assert errors == sorted(errors) and errors[0] < errors[-1]


def test_flip_twice_is_identity(person, env):
    once = Flip(1.0).apply(person.set_B, env)
    assert not torch.equal(once, person.set_B)
    assert torch.equal(Flip(1.0).apply(once, env), person.set_B)


def test_resize_returns_original_size_and_smooths(person, env):
    out = Resize(4.0).apply(person.set_B, env)
    assert out.shape == person.set_B.shape
    assert not torch.equal(out, person.set_B)


def test_blur_removes_detail(person, env):
    def detail(x):
        return float((x[..., 1:] - x[..., :-1]).abs().mean())

    assert detail(Blur(7, 2.0).apply(person.set_B, env)) < detail(person.set_B)


def test_purify_at_zero_is_identity_and_above_changes(person, env):
    assert torch.equal(Purify(0).apply(person.set_B, env), person.set_B)
    purified = Purify(200, 3).apply(person.set_B, env)
    assert not torch.allclose(purified, person.set_B)


def test_purify_rejects_timestep_beyond_the_schedule(person, env):
    with pytest.raises(ValueError, match="purify.t: expected < 1000"):
        Purify(1000).apply(person.set_B, env)


def test_noise_has_the_stated_sigma_and_repeats_by_seed(person, tiny_bundle):
    gray = torch.full((4, 3, 64, 64), 0.5)
    out = Noise(12.75).apply(gray, AttackEnv(tiny_bundle, person, torch.Generator().manual_seed(0)))
    assert float((out - gray).std()) == pytest.approx(12.75 / 255, rel=0.02)
    again = Noise(12.75).apply(
        gray, AttackEnv(tiny_bundle, person, torch.Generator().manual_seed(0))
    )
    other = Noise(12.75).apply(
        gray, AttackEnv(tiny_bundle, person, torch.Generator().manual_seed(1))
    )
    assert torch.equal(out, again) and not torch.equal(out, other)
    assert Noise(0).apply(gray, AttackEnv(tiny_bundle, person, torch.Generator())) is gray
    with pytest.raises(ValueError, match="sigma"):
        Noise(-1.0)


def test_impress_makes_the_photos_vae_consistent_within_its_distance(person, env):
    photos = person.set_B
    out = Impress(steps=20, lr=0.01, delta=0.05).apply(photos, env)
    with torch.no_grad():
        before, after = consistency(photos, env), consistency(out, env)
    assert (after < before).all()
    rms = ((out - photos) ** 2).flatten(1).mean(1).sqrt()
    assert (rms < 0.05 + 0.02).all()  # the hinge holds it near delta (Adam overshoots a little)
    assert torch.equal(out, Impress(steps=20, lr=0.01, delta=0.05).apply(photos, env))
    assert Impress(steps=0).apply(photos, env) is photos


def test_impress_names_missing_lpips_weights(person, env, tmp_path):
    with pytest.raises(ValueError, match="impress.lpips_weights: .*missing.pth"):
        Impress(steps=1, lpips_weights=str(tmp_path / "missing.pth")).apply(person.set_B, env)
    with pytest.raises(ValueError, match="lr: expected > 0, got 0"):
        Impress(lr=0)


def test_the_robust_suite_expands_in_a_campaign(tmp_path):
    from antipers.attacks.suites import SUITES
    from antipers.campaign import CampaignError, load_campaign

    text = (
        "base_model: tiny\nresolution: 32\n"
        "datasets: [{name: synthetic, n_identities: 1}]\n"
        "defenses: [none]\nattacks: [{name: lora, steps: 1, prior_weight: 0}]\n"
    )
    path = tmp_path / "c.yaml"
    path.write_text(text + "countermeasures: robust\n")
    chains = {s.countermeasure_name for s in load_campaign(path).specs}
    assert chains == {"none", "jpeg", "noise", "impress", "purify"}
    assert len(SUITES["robust"]) == 5
    from antipers.leaderboard import suite_named

    assert suite_named(chains) == "robust"
    assert suite_named(chains - {"impress"}) is None and suite_named(set()) is None
    path.write_text(text + "countermeasures: sturdy\n")
    with pytest.raises(CampaignError, match="unknown attacker suite 'sturdy'; suites: robust"):
        load_campaign(path)


def test_mix_puts_exactly_k_clean_photos_in(person, env):
    protected = (person.set_B + 0.03).clamp(0, 1)  # stand-in for perturbed photos
    for k in (0, 1, 3):
        out = Mix(k).apply(protected, env)
        from_clean = [any(torch.equal(img, c) for c in person.set_C) for img in out]
        kept = [any(torch.equal(img, p) for p in protected) for img in out]
        assert sum(from_clean) == k and sum(kept) == len(out) - k


def test_mix_larger_than_the_set_fails_before_any_work(tiny_bundle):
    spec = ExperimentSpec.from_dict(tiny_spec_dict(countermeasure=[{"name": "mix", "k": 9}]))
    stages = []
    rows = run_experiment(spec, RunContext(device=torch.device("cpu")), progress=stages.append)
    assert rows[0]["status"] == "error" and "mix.k=9" in rows[0]["error"]
    assert "k must be at most 4" in rows[0]["error"]
    assert stages == ["load"]  # refused before protecting or training


def test_rows_record_the_countermeasure_chain():
    chain = [{"name": "jpeg", "quality": 60}, "flip"]
    spec = ExperimentSpec.from_dict(tiny_spec_dict(countermeasure=chain))
    rows = run_experiment(spec, RunContext(device=torch.device("cpu")), raise_errors=True)
    assert {r["countermeasure"] for r in rows} == {"jpeg+flip"}
    assert '"quality":60' in rows[0]["countermeasure_params"]
    assert spec.override({"countermeasure.0.quality": 30}).countermeasure[0]["quality"] == 30
    assert ExperimentSpec.from_dict(tiny_spec_dict(countermeasure="none")).countermeasure == ()


def test_sampling_is_repeatable_by_seed(tiny_bundle):
    sampler = GuidedSampler(
        prompts=("a photo of sks person",), images_per_prompt=3, steps=3, batch_size=2
    )
    a = sampler.sample(tiny_bundle, 32, torch.Generator().manual_seed(9))
    b = sampler.sample(tiny_bundle, 32, torch.Generator().manual_seed(9))
    c = sampler.sample(tiny_bundle, 32, torch.Generator().manual_seed(10))
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_scheduler_samples(tiny_bundle, scheduler):
    sampler = GuidedSampler(prompts=("x",), images_per_prompt=1, steps=2, scheduler=scheduler)
    out = sampler.sample(tiny_bundle, 32, torch.Generator().manual_seed(0))
    check_images(out)
    assert torch.isfinite(out).all()


# ---- Noisy Upscaling -----------------------------------------------------------------


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    """A diffusers folder in the SD x4 upscaler layout, random-init (seed 0), tiny."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from antipers.models.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    blocks = {"norm_num_groups": 8, "layers_per_block": 1}
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=7,  # latents + the low-resolution image, as the x4 upscaler
        out_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        num_class_embeds=351,  # the noise level is a class label
        **blocks,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        scaling_factor=0.08333,
        **blocks,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=49408,
        )
    )
    pipe = StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=clip_tokenizer(),
        unet=unet,
        low_res_scheduler=DDPMScheduler(),
        scheduler=DDIMScheduler(),
    )
    folder = tmp_path_factory.mktemp("upscaler") / "x4"
    pipe.save_pretrained(folder)
    return folder


def test_upscale_keeps_the_contract_and_repeats_by_seed(upscaler, person, tiny_bundle):
    from antipers.attacks.upscale import Upscale

    def run(seed, **settings):
        env = AttackEnv(tiny_bundle, person, torch.Generator().manual_seed(seed))
        return Upscale(path=str(upscaler), steps=2, **settings).apply(person.set_B[:2], env)

    out = run(0)
    check_images(out)
    assert out.shape == person.set_B[:2].shape
    assert torch.equal(out, run(0)) and not torch.equal(out, run(1))
    assert not torch.equal(run(0, sigma=0.0), out)  # the noise is part of it


def test_upscale_without_a_folder_is_unavailable(upscaler, tmp_path):
    from antipers.attacks.upscale import Upscale
    from antipers.errors import ComponentUnavailable
    from antipers.results import ResultStore

    env = AttackEnv(None, None, torch.Generator())
    with pytest.raises(ComponentUnavailable, match="no upscaler configured"):
        Upscale().apply(torch.zeros(1, 3, 8, 8), env)
    (tmp_path / "half").mkdir()
    with pytest.raises(ComponentUnavailable, match="missing model_index.json, unet"):
        Upscale(path=str(tmp_path / "half")).apply(torch.zeros(1, 3, 8, 8), env)
    with pytest.raises(ValueError, match="noise_level"):
        Upscale(noise_level=400)
    spec = ExperimentSpec.from_dict(tiny_spec_dict(countermeasure=["upscale"]))
    (row,) = run_experiment(spec, RunContext(device=torch.device("cpu")))
    assert row["status"] == "unavailable" and "no upscaler configured" in row["error"]
    store = ResultStore(str(tmp_path / "store"))
    store.write([row])
    assert spec.spec_id in store.finished_ids()  # not retried: configuring path is a new spec
