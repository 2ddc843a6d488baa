import numpy as np
import pytest
import torch

from antipers.data.synthetic import SyntheticDataset
from antipers.defenses.features import vae_features, vgg_features
from antipers.defenses.objectives import dynamic_weight, gram_spread
from antipers.defenses.pgd import project_png, uniform_noise_like
from antipers.defenses.surrogate import Surrogate
from antipers.images import quantize, read_images, write_png
from antipers.registry import DEFENSES
from tests.conftest import eval_loss

# prior preservation (the default) on two class images of two DDIM steps: the plumbing
CLASS = {"num_class_images": 2, "class_steps": 2}
FAST = {"iterations": 2, "pgd_steps": 2, "surrogate_steps": 1, **CLASS}
DEFENSE_PARAMS = {
    "aspl": FAST,
    "fsmg": {"pgd_steps": 3, "finetune_steps": 2, **CLASS},
    "simac": {**FAST, "search_every": 1, "search_delta": 300},
    "cap-aspl": {**FAST, "cap_warmup": 2},
    "cap-simac": {**FAST, "cap_measure": "grad"},
    "cap-fsmg": {"pgd_steps": 3, "finetune_steps": 1, **CLASS},
}


@pytest.fixture(scope="module")
def person():
    """Photos as published: on the 8-bit grid, like any PNG read from disk."""
    person = SyntheticDataset(n_identities=1, photos_per_set=2).load("synth-0000", 32)
    person.set_A, person.set_B = quantize(person.set_A), quantize(person.set_B)
    return person


def protect(name, person, bundle, seed=0, **extra):
    defense = DEFENSES.build(name, {**DEFENSE_PARAMS.get(name, {}), **extra})
    return defense.protect(person, bundle, torch.Generator().manual_seed(seed)).images


@pytest.mark.parametrize("name", sorted(DEFENSE_PARAMS))
def test_budget_holds_on_written_pngs_and_seed_repeats(name, person, tiny_bundle, tmp_path):
    eps = DEFENSES.build(name, DEFENSE_PARAMS[name]).eps
    out = protect(name, person, tiny_bundle)
    paths = write_png(out, [tmp_path / f"{i}.png" for i in range(len(out))])
    written = (read_images(paths, 32) * 255).round()
    clean = (person.set_B * 255).round()
    assert (written - clean).abs().max() <= np.floor(eps)
    assert (written != clean).any()  # it did perturb
    assert torch.equal(out, protect(name, person, tiny_bundle))


def test_project_png_stays_on_grid_within_fractional_budget():
    clean = quantize(torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    x = (clean + 0.5 * (torch.rand(clean.shape) - 0.5)).clamp(0, 1)
    out = project_png(x, clean, 6.375)
    assert torch.equal(out * 255, (out * 255).round())
    assert ((out - clean).abs() * 255).max() <= 6 + 1e-4


def test_protection_raises_the_surrogate_loss_beyond_clean_and_noise(person, tiny_bundle):
    protected = protect(
        "aspl", person, tiny_bundle, eps=8.0, step_size=1.0, iterations=3, pgd_steps=5
    )
    noise = uniform_noise_like(person.set_B, 8.0, torch.Generator().manual_seed(0))
    on_protected = eval_loss(tiny_bundle, protected, draws=24, seed=99)
    assert on_protected > eval_loss(tiny_bundle, person.set_B, draws=24, seed=99)
    assert on_protected > eval_loss(tiny_bundle, noise, draws=24, seed=99)


def test_cap_lowers_gram_spread_against_the_wrapped_method(person, tiny_bundle):
    extract = vae_features(tiny_bundle, (0, 1))
    common = {"eps": 8.0, "step_size": 1.0, "iterations": 2, "pgd_steps": 4}
    plain = protect("aspl", person, tiny_bundle, **common)
    cap = protect("cap-aspl", person, tiny_bundle, **common, cap_target=2.0, cap_warmup=0)
    with torch.no_grad():
        assert float(gram_spread(extract(cap))) < float(gram_spread(extract(plain)))


def test_dynamic_ratio_follows_its_rule():
    # after warm-up the weighted consistency term is exactly `target` of the reconstruction
    w = dynamic_weight(reconstruction=2.0, consistency=0.5, iteration=10, target=0.3, warmup=5)
    assert w * 0.5 == pytest.approx(0.3 * 2.0)
    # during warm-up the share ramps linearly: (k+1)/warmup of the target
    ramp = [dynamic_weight(1.0, 1.0, k, target=0.6, warmup=3) for k in range(5)]
    assert ramp == pytest.approx([0.2, 0.4, 0.6, 0.6, 0.6])
    assert dynamic_weight(1.0, 1.0, 0, target=0.6, warmup=0) == pytest.approx(0.6)
    assert dynamic_weight(-4.0, 0.0, 0, 0.5, 0) > 0  # magnitudes, safe at zero


def test_cap_records_one_positive_weight_per_pgd_step(person, tiny_bundle):
    defense = DEFENSES.build("cap-aspl", {**FAST, "cap_target": 0.5, "cap_warmup": 2})
    result = defense.protect(person, tiny_bundle, torch.Generator().manual_seed(0))
    weights = result.log.cap_weights
    assert len(weights) == FAST["iterations"] * FAST["pgd_steps"]
    assert all(w > 0 and np.isfinite(w) for w in weights)


@pytest.mark.parametrize("kind", ["dreambooth", "lora"])
def test_surrogate_snapshots_only_trainable_weights(tiny_bundle, person, kind):
    gen = torch.Generator().manual_seed(0)
    with Surrogate.build(tiny_bundle, kind, 1e-3, True, "a photo of sks person", gen) as sur:
        snap = sur.snapshot()
        trainable = {
            f"{part}.{n}"
            for part in ("unet", "text_encoder")
            for n, p in getattr(sur.bundle, part).named_parameters()
            if p.requires_grad
        }
        assert set(snap) == trainable
        assert not any(k.startswith("vae") for k in snap)
        if kind == "lora":
            assert all("lora_" in k for k in snap)
        sur.train(person.set_A, 2, torch.Generator().manual_seed(1))
        assert any(not torch.equal(snap[k], p) for k, p in sur.trainable.items())
        sur.restore(snap)
        assert all(torch.equal(snap[k], p) for k, p in sur.trainable.items())
        assert sur.bundle.vae is tiny_bundle.vae  # frozen parts are shared, never copied
    assert not any(p.requires_grad for p in tiny_bundle.unet.parameters())


def _spy_training(bundle, monkeypatch):
    """What each surrogate step's one UNet pass trains on: its prompts, row by row."""
    seen = []
    prompts = {p: bundle.prompt_embeds([p]) for p in ("a photo of sks person", "a photo of person")}
    real = bundle.denoising_loss

    def spy(latents, cond, *rest, **kw):
        if not latents.requires_grad:  # a training step (PGD's latents carry a gradient)
            rows = [next(p for p, e in prompts.items() if torch.allclose(c, e[0])) for c in cond]
            seen.append(tuple(rows))
        return real(latents, cond, *rest, **kw)

    monkeypatch.setattr(bundle, "denoising_loss", spy)
    return seen


def _structure(bundle):
    """Module types by name and every weight, of the parts a surrogate trains."""
    parts = (bundle.unet, bundle.text_encoder)
    types = [(n, type(m).__name__) for part in parts for n, m in part.named_modules()]
    weights = [(n, p.detach().clone()) for part in parts for n, p in part.named_parameters()]
    return types, weights


def test_lora_surrogate_adapts_the_resident_model_and_leaves_it_exact(tiny_bundle, person):
    """No copy of the UNet or text encoder: the adapters go on the resident model, and
    closing (also after an error) gives back the same modules and weights bit for bit,
    with no adapter bookkeeping left for a later attack to trip on."""
    types, weights = _structure(tiny_bundle)
    gen = torch.Generator().manual_seed(0)
    sur = Surrogate.build(tiny_bundle, "lora", 1e-3, True, "a photo of sks person", gen)
    with pytest.raises(RuntimeError, match="interrupted"), sur:
        assert sur.bundle.unet is tiny_bundle.unet
        assert any("lora_" in n for n, _ in tiny_bundle.text_encoder.named_parameters())
        sur.train(person.set_A, 2, torch.Generator().manual_seed(1))
        raise RuntimeError("interrupted")
    after_types, after_weights = _structure(tiny_bundle)
    assert after_types == types
    assert [n for n, _ in after_weights] == [n for n, _ in weights]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(weights, after_weights, strict=True))
    assert not hasattr(tiny_bundle.unet, "peft_config")
    assert not hasattr(tiny_bundle.text_encoder, "peft_config")
    assert not any(p.requires_grad for _, p in after_weights)


def test_a_lora_surrogate_that_fails_to_build_leaves_no_adapters(tiny_bundle, monkeypatch):
    """A failure after the adapters went on (here: a bad memory setting) takes them off
    again, so the next build works; a base that already carries adapters is refused,
    since removing ours would remove those too."""
    types, _ = _structure(tiny_bundle)
    monkeypatch.setenv("ANTIPERS_MEMORY", "tiny")
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="ANTIPERS_MEMORY"):
        Surrogate.build(tiny_bundle, "lora", 1e-3, True, "a photo of sks person", gen)
    assert _structure(tiny_bundle)[0] == types
    assert not hasattr(tiny_bundle.unet, "peft_config")
    monkeypatch.delenv("ANTIPERS_MEMORY")
    first = Surrogate.build(tiny_bundle, "lora", 1e-3, True, "a photo of sks person", gen)
    with first, pytest.raises(ValueError, match="carry adapters"):
        Surrogate.build(tiny_bundle, "lora", 1e-3, True, "a photo of sks person", gen)
    assert _structure(tiny_bundle)[0] == types


def test_surrogate_steps_train_as_the_reference(person, tiny_bundle, monkeypatch):
    """Anti-DreamBooth's train_one_epoch: each step one pass over one instance photo
    (instance prompt) and one class image (class prompt), prior weight 1."""
    seen = _spy_training(tiny_bundle, monkeypatch)
    aspl = DEFENSES.build(
        "aspl", {**FAST, "iterations": 1, "surrogate_steps": 2, "train_text_encoder": False}
    )
    aspl.protect(person, tiny_bundle, torch.Generator().manual_seed(0))
    assert seen == [("a photo of sks person", "a photo of person")] * 4  # 2 phases of 2 steps


def test_whole_set_surrogate_is_a_setting(person, tiny_bundle, monkeypatch):
    seen = _spy_training(tiny_bundle, monkeypatch)
    settings = {"prior_weight": 0, "surrogate_batch": 8, "train_text_encoder": False}
    aspl = DEFENSES.build("aspl", {**FAST, "iterations": 1, "surrogate_steps": 2, **settings})
    aspl.protect(person, tiny_bundle, torch.Generator().manual_seed(0))
    assert seen == [("a photo of sks person",) * len(person.set_A)] * 4


def test_eot_entries_take_parameters_and_purify_with_the_frozen_base(person, tiny_bundle):
    from antipers.attacks.countermeasures import JPEG, Purify

    eot = ({"name": "jpeg", "quality": 50}, {"name": "purify", "t": 20, "steps": 2}, "blur")
    aspl = DEFENSES.build("aspl", {**FAST, "eot": eot})
    assert aspl.eot[0] == {"name": "jpeg", "quality": 50}
    refused = r"eot\[0\]: countermeasure 'jpeg': quality: expected 1\.\.100, got 500"
    with pytest.raises(ValueError, match=refused):
        DEFENSES.build("aspl", {"eot": [{"name": "jpeg", "quality": 500}]})
    seen = []
    real_jpeg, real_purify = JPEG.apply, Purify.apply

    def jpeg(self, images, env):
        seen.append(("jpeg", self.quality))
        return real_jpeg(self, images, env)

    def purify(self, images, env):
        unet = env.bundle.unet
        seen.append(("purify", unet is not tiny_bundle.unet))
        trained = dict(tiny_bundle.unet.named_parameters())
        seen.append(
            ("frozen", all(torch.equal(p, originals[n]) for n, p in unet.named_parameters()))
        )
        seen.append(("trained", any(not torch.equal(p, originals[n]) for n, p in trained.items())))
        return real_purify(self, images, env)

    originals = {n: p.detach().clone() for n, p in tiny_bundle.unet.named_parameters()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(JPEG, "apply", jpeg)
        mp.setattr(Purify, "apply", purify)
        DEFENSES.build("aspl", {**FAST, "eot": eot, "pgd_steps": 6}).protect(
            person, tiny_bundle, torch.Generator().manual_seed(0)
        )
    assert ("jpeg", 50) in seen and ("purify", True) in seen
    assert ("frozen", False) not in seen and ("trained", True) in seen


def test_eot_and_lora_surrogate_run(person, tiny_bundle):
    out = protect(
        "aspl",
        person,
        tiny_bundle,
        iterations=1,
        pgd_steps=2,
        surrogate="lora",
        eot=("jpeg", "blur", "flip"),
    )
    assert out.shape == person.set_B.shape


def test_eot_makes_the_perturbation_survive_its_transform():
    """The objective rewards a checkerboard (which blur erases) a little more than a
    uniform shift (which blur keeps). Plain PGD takes the checkerboard; through blur,
    EOT finds the shift, so after blurring its loss is the higher one."""
    from antipers.defenses.pgd import PGDConfig, eot_transforms, pgd

    blur = eot_transforms(["blur"], None)[0]
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    weights = ((((yy + xx) % 2) * 2 - 1).float() + 0.3).expand(1, 3, 32, 32)
    clean = torch.full((1, 3, 32, 32), 0.5)

    def loss(x, step=0):
        return (x * weights).mean()

    config = PGDConfig(eps=8, step_size=1, steps=10)
    plain = pgd(clean, clean, loss, config, torch.Generator().manual_seed(0))
    eot = pgd(clean, clean, loss, config, torch.Generator().manual_seed(0), eot=[blur])
    assert loss(blur(eot)) > loss(blur(plain)) + 0.5 / 255
    assert loss(plain) > loss(eot)  # without the transform, plain PGD is the better one


@pytest.mark.parametrize("peak, expected", [(400, 400), (1000, 1000), (-500, 100), (430, 400)])
def test_simac_greedy_rule_stops_where_the_gain_stops_rising(peak, expected):
    """On a constructed gain that peaks at ``peak``, lowering the upper timestep by 100
    from 1000 stops at the grid point nearest the peak from above (or at t_min)."""
    from antipers.defenses.simac import greedy_upper_bound

    asked = []

    def gain(t_hi):
        asked.append(t_hi)
        return -((t_hi - peak) ** 2)

    assert greedy_upper_bound(gain, 1000, 100, 100) == expected
    assert asked == list(range(1000, max(expected - 100, 100) - 1, -100))


def test_simac_search_uses_the_rule_on_the_surrogate(tiny_bundle):
    from antipers.defenses.simac import SimAC
    from antipers.defenses.surrogate_pgd import RunState

    class KnownGain(SimAC):
        def gain_fn(self, bundle, x, clean, generator):
            return lambda t_hi: -((t_hi - 400) ** 2)

    state = RunState()
    x = torch.zeros(1, 3, 16, 16)
    KnownGain(search_delta=100, search_min_t=100).before_pgd(
        tiny_bundle, x, x, torch.Generator(), 0, state
    )
    assert state.t_range == (0, 400) and state.extra["t_max"] == [400]


def test_simac_candidates_share_their_random_numbers(person, tiny_bundle):
    """Common random numbers: a candidate's gain is a function of its interval alone
    within one search, and the whole search repeats for a seed."""
    simac = DEFENSES.build("simac", {"search_draws": 2})
    x = uniform_noise_like(person.set_B, 8.0, torch.Generator().manual_seed(3))

    def search(seed):
        gain = simac.gain_fn(tiny_bundle, x, person.set_B, torch.Generator().manual_seed(seed))
        return [gain(t) for t in (1000, 600, 200, 600)]

    first = search(0)
    assert first[1] == first[3]  # the same candidate, asked twice: the same numbers
    assert search(0) == first
    assert search(1) != first


def test_simac_search_narrows_to_the_interval_it_reports(person, tiny_bundle):
    defense = DEFENSES.build("simac", {**DEFENSE_PARAMS["simac"], "search_min_t": 100})
    result = defense.protect(person, tiny_bundle, torch.Generator().manual_seed(0))
    t_max = result.log.extra["t_max"]
    assert len(t_max) == 2 and all(100 <= t <= 1000 for t in t_max)
    assert result.log.t_range == (0, t_max[-1])


def test_vgg_extractor_needs_local_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="VGG-19 weights not found"):
        vgg_features(str(tmp_path / "missing.pth"), (), torch.device("cpu"))
    bad = tmp_path / "bad.pth"
    torch.save({"nope": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a torchvision VGG-19 state dict"):
        vgg_features(str(bad), (), torch.device("cpu"))


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A random-init (seeded) torchvision VGG-19 state dict in a file, as a user's
    downloaded weights would be."""
    from torchvision.models import vgg19

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vgg") / "vgg19.pth"
    torch.save(vgg19(weights=None).state_dict(), path)
    return path


def test_vgg_extractor_from_a_local_file(vgg_file, person):
    extract = vgg_features(str(vgg_file), (1, 6), torch.device("cpu"))
    feats = extract(person.set_B)
    assert [f.shape[1] for f in feats] == [64, 128]
    again = extract(person.set_B)
    other = extract(person.set_B.flip(-1))
    assert all(torch.equal(a, b) for a, b in zip(feats, again, strict=True))
    assert not torch.allclose(feats[1], other[1])  # features of the content, not constant


@pytest.mark.slow
def test_cap_aspl_with_the_vgg_extractor(vgg_file, person, tiny_bundle):
    out = protect(
        "cap-aspl", person, tiny_bundle, cap_extractor="vgg19", cap_vgg_weights=str(vgg_file)
    )
    assert out.shape == person.set_B.shape


@pytest.mark.parametrize("name", ["aspl", "fsmg"])
def test_in_place_surrogate_gives_the_base_model_back(name, person, tiny_bundle):
    before = {k: v.clone() for k, v in tiny_bundle.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in tiny_bundle.text_encoder.state_dict().items()}
    protect(name, person, tiny_bundle)
    assert all(torch.equal(before[k], v) for k, v in tiny_bundle.unet.state_dict().items())
    assert all(
        torch.equal(text_before[k], v) for k, v in tiny_bundle.text_encoder.state_dict().items()
    )
    assert not any(p.requires_grad for p in tiny_bundle.unet.parameters())


def test_base_model_restored_when_the_defense_fails(person, tiny_bundle):
    before = {k: v.clone() for k, v in tiny_bundle.unet.state_dict().items()}
    broken = DEFENSES.build("simac", {**FAST, "feature_blocks": (7,)})  # no such up block
    with pytest.raises(ValueError, match="feature_blocks"):
        broken.protect(person, tiny_bundle, torch.Generator().manual_seed(0))
    assert all(torch.equal(before[k], v) for k, v in tiny_bundle.unet.state_dict().items())
    assert not any(p.requires_grad for p in tiny_bundle.unet.parameters())
