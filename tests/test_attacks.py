import pytest
import torch

from antipers.attacks.class_images import ClassImageKey, class_images
from antipers.attacks.dreambooth import DreamBooth
from antipers.attacks.lora import LoRADreamBooth
from antipers.attacks.training import TrainConfig, TrainData, finetune
from antipers.data.synthetic import SyntheticDataset
from antipers.registry import SpecError
from antipers.spec import ExperimentSpec
from tests.conftest import eval_loss, tiny_spec_dict

PROMPT = "a photo of sks person"


@pytest.fixture(scope="module")
def photos():
    return SyntheticDataset(n_identities=1, photos_per_set=4).load("synth-0000", 64).set_B


def unet_state(bundle):
    return {k: v.detach().clone() for k, v in bundle.unet.state_dict().items()}


@pytest.mark.parametrize(
    "attack",
    [
        DreamBooth(steps=40, lr=2e-4, prior_weight=0.0, train_text_encoder=True),
        LoRADreamBooth(steps=40, lr=3e-3, rank=8, alpha=8.0, prior_weight=0.0),
    ],
    ids=["dreambooth", "lora"],
)
def test_training_lowers_the_loss_on_the_training_photos(tiny_bundle, photos, attack):
    before = eval_loss(tiny_bundle, photos)
    trained = attack.personalize(photos, tiny_bundle, torch.Generator().manual_seed(0))
    assert eval_loss(trained, photos) < before


def test_lora_changes_only_adapter_weights(tiny_bundle, photos):
    base_before = unet_state(tiny_bundle)
    attack = LoRADreamBooth(steps=5, lr=1e-3, prior_weight=0.0)
    trained = attack.personalize(photos, tiny_bundle, torch.Generator().manual_seed(0))
    after = trained.unet.state_dict()
    lora_keys = [k for k in after if "lora_" in k]
    assert lora_keys
    assert any(not torch.all(after[k] == 0) for k in lora_keys if "lora_B" in k)  # B trained
    for key, value in after.items():
        if "lora_" in key:
            continue
        original = key.replace(".base_layer", "")
        assert torch.equal(value, base_before[original]), key
    assert all(torch.equal(v, tiny_bundle.unet.state_dict()[k]) for k, v in base_before.items())
    assert trained.text_encoder is tiny_bundle.text_encoder


def test_lora_on_text_encoder_and_repeatable(tiny_bundle, photos):
    attack = LoRADreamBooth(steps=3, lr=1e-3, prior_weight=0.0, train_text_encoder=True)
    a = attack.personalize(photos, tiny_bundle, torch.Generator().manual_seed(5))
    b = attack.personalize(photos, tiny_bundle, torch.Generator().manual_seed(5))
    te_lora = [k for k in a.text_encoder.state_dict() if "lora_" in k]
    assert te_lora
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_dreambooth_without_text_encoder_leaves_it_identical(tiny_bundle, photos):
    text_before = {k: v.clone() for k, v in tiny_bundle.text_encoder.state_dict().items()}
    unet_before = unet_state(tiny_bundle)
    attack = DreamBooth(steps=3, lr=1e-4, prior_weight=0.0, train_text_encoder=False)
    trained = attack.personalize(photos, tiny_bundle, torch.Generator().manual_seed(0))
    text_after = trained.text_encoder.state_dict()
    assert all(torch.equal(text_before[k], text_after[k]) for k in text_before)
    unet_after = trained.unet.state_dict()
    assert any(not torch.equal(unet_before[k], unet_after[k]) for k in unet_before)
    assert all(torch.equal(unet_before[k], tiny_bundle.unet.state_dict()[k]) for k in unet_before)


def _train_losses(bundle, photos, **config):
    trained = bundle.copy_of("unet")
    params = list(trained.unet.parameters())
    for p in params:
        p.requires_grad_(True)
    cfg = TrainConfig(steps=3, lr=1e-4, batch_size=2, **config)
    return finetune(
        trained, TrainData(photos, PROMPT), params, cfg, torch.Generator().manual_seed(3)
    )


def test_gradient_checkpointing_changes_memory_not_results(tiny_bundle, photos):
    plain = _train_losses(tiny_bundle, photos)
    checkpointed = _train_losses(tiny_bundle, photos, gradient_checkpointing=True)
    assert plain == pytest.approx(checkpointed, rel=1e-5)
    assert not tiny_bundle.unet.is_gradient_checkpointing  # restored


def test_a_step_split_into_passes_trains_as_one_pass(tiny_bundle, photos):
    whole = _train_losses(tiny_bundle, photos)
    split = _train_losses(tiny_bundle, photos, step_images=1)  # batch 2: two passes a step
    assert whole == pytest.approx(split, rel=1e-5)


@pytest.mark.parametrize("step_images", [1, 2, 3])
def test_a_split_step_has_the_whole_steps_loss_and_gradient(
    tiny_bundle, photos, step_images, unet_passes
):
    """The memory plan's ``step_images``: part by part, then piece by piece, each pass
    weighted by its share of its part's mean. Same draws, same loss and gradients as
    one pass, to float rounding (the sums run in another order: the loss to 1e-5
    relative, the gradients to 1e-4)."""
    from antipers.attacks import training

    bundle = tiny_bundle.copy_of("unet", "text_encoder")
    bundle.unet.requires_grad_(True)
    bundle.text_encoder.requires_grad_(True)
    params = [*bundle.unet.parameters(), *bundle.text_encoder.parameters()]
    posterior = bundle.posterior(photos)
    with torch.no_grad():
        classes = bundle.posterior(photos.flip(-1))
    passes = unet_passes

    def step(limit):
        for p in params:
            p.grad = None
        gen = torch.Generator().manual_seed(3)
        chunks = [
            training._draw(bundle, posterior[:2], PROMPT, gen),
            training._draw(bundle, classes[:3], "a person", gen),
        ]
        embeds = training._Embeds(bundle, True)
        value = training._backward(bundle, chunks, embeds, 0.7, 2, limit)
        return value, [None if p.grad is None else p.grad.clone() for p in params]

    whole_value, whole = step(None)
    assert passes == [5]
    passes.clear()
    split_value, split = step(step_images)
    assert len(passes) > 1 and max(passes) <= step_images and sum(passes) == 5
    assert split_value == pytest.approx(whole_value, rel=1e-5)
    assert sum(g is not None for g in whole) > len(list(bundle.unet.parameters()))
    for a, b in zip(whole, split, strict=True):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_a_posterior_encoded_once_draws_what_encoding_each_step_draws(tiny_bundle, photos):
    """finetune encodes each photo once and samples its posterior per step: the draws
    must be the ones per-step encoding gives (same generator, same numbers), chunked or
    not."""
    idx = torch.tensor([2, 0])
    with torch.no_grad():
        once = tiny_bundle.posterior(photos, chunk=3)[idx].latents(torch.Generator().manual_seed(7))
        each = tiny_bundle.encode(photos[idx], torch.Generator().manual_seed(7))
        mean = tiny_bundle.posterior(photos)[idx].latents()
    assert torch.allclose(once, each, atol=1e-5)
    assert torch.allclose(mean, tiny_bundle.encode(photos[idx]), atol=1e-5)
    assert not torch.allclose(once, mean)  # a draw, not the mean


@pytest.mark.parametrize("text_encoder", [True, False])
def test_one_pass_over_instance_and_class_images_is_the_two_pass_loss(
    tiny_bundle, photos, text_encoder
):
    """Prior preservation runs the instance and class chunks through one UNet (and text
    encoder) pass, as the reference scripts batch them. Same draws, same loss and
    gradients as a pass per chunk, to float rounding (batched kernels sum in another
    order: 1e-5 relative)."""
    from antipers.attacks.training import _chunked_loss, _draw, _Embeds

    bundle = tiny_bundle.copy_of("unet", "text_encoder")
    bundle.unet.requires_grad_(True)
    bundle.text_encoder.requires_grad_(True)
    params = list(bundle.unet.parameters())[:6] + list(bundle.text_encoder.parameters())[-2:]
    posterior = bundle.posterior(photos)
    with torch.no_grad():
        classes = bundle.posterior(photos.flip(-1))

    def grads(loss):
        return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=not text_encoder)

    embeds = _Embeds(bundle, text_encoder)
    gen = torch.Generator().manual_seed(3)
    chunks = [
        _draw(bundle, posterior[:2], PROMPT, gen),
        _draw(bundle, classes[:2], "a person", gen),
    ]
    one = _chunked_loss(bundle, chunks, embeds, prior_weight=0.7)
    gen = torch.Generator().manual_seed(3)
    inst = bundle.training_loss(posterior[:2].latents(gen), embeds.batch([(PROMPT, 2)]), gen)
    prior = bundle.training_loss(classes[:2].latents(gen), embeds.batch([("a person", 2)]), gen)
    two = inst + 0.7 * prior
    assert float(one.detach()) == pytest.approx(float(two.detach()), rel=1e-5)
    for a, b in zip(grads(one), grads(two), strict=True):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(grads(one)[0], grads(inst)[0], atol=1e-7)  # the prior counts
    assert (grads(one)[-1] is not None) == text_encoder  # the text encoder in the pass


def test_the_fused_optimizer_trains_like_the_plain_one():
    from antipers.attacks.training import adamw

    weights = [torch.nn.Parameter(torch.randn(64, generator=torch.Generator().manual_seed(0)))]
    twin = [torch.nn.Parameter(weights[0].detach().clone())]
    fused, plain = adamw(weights, 1e-2, 1e-2), torch.optim.AdamW(twin, 1e-2, weight_decay=1e-2)
    assert fused.defaults["fused"]
    for _ in range(5):
        for params, optimizer in ((weights, fused), (twin, plain)):
            params[0].pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    assert torch.allclose(weights[0], twin[0], atol=1e-6)
    assert not torch.equal(weights[0], torch.randn(64, generator=torch.Generator().manual_seed(0)))


def test_accumulation_and_schedule_run(tiny_bundle, photos):
    losses = _train_losses(tiny_bundle, photos, grad_accum=2, lr_schedule="cosine", warmup_steps=1)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_prior_preservation_uses_class_images(tiny_bundle, photos, isolated_cache):
    attack = LoRADreamBooth(steps=2, lr=1e-3, num_class_images=2, class_steps=2)
    fingerprinted = tiny_bundle.replace(fingerprint="tiny-test-prior")
    attack.personalize(photos, fingerprinted, torch.Generator().manual_seed(0))
    cached = list((isolated_cache / "class-images").glob("*/key.json"))
    assert any("tiny-test-prior" in p.read_text() for p in cached)


def test_class_image_cache_is_reused_and_keyed(tiny_bundle, tmp_path):
    bundle = tiny_bundle.replace(fingerprint="tiny-seed-0")
    key = ClassImageKey(bundle.fingerprint, "a photo of person", 2, 32, 0, 2, 7.5, "ddim")
    first, generated = class_images(bundle, key, tmp_path)
    assert generated and first.shape == (2, 3, 32, 32)
    again, generated_again = class_images(bundle, key, tmp_path)
    assert not generated_again and torch.equal(first, again)
    changed = ClassImageKey(bundle.fingerprint, "a photo of person", 3, 32, 0, 2, 7.5, "ddim")
    third, generated_third = class_images(bundle, changed, tmp_path)
    assert generated_third and third.shape[0] == 3
    assert len(list(tmp_path.glob("class-images/*/key.json"))) == 2
    assert not list(tmp_path.glob("class-images/.*"))  # no temporary folder left


@pytest.mark.parametrize(
    "override,message",
    [
        ({"attack.steps": -1}, "steps: expected >= 1, got -1"),
        ({"attack.rank": 0}, "rank: expected >= 1, got 0"),
        ({"sampling.scheduler": "heun"}, "sampling.scheduler: expected one of 'ddim'"),
        ({"attack.lr_schedule": "cyclic"}, "attack.lr_schedule: expected one of 'constant'"),
        ({"countermeasure": [{"name": "jpeg", "quality": 0}]}, "quality: expected 1..100"),
        ({"countermeasure": [{"name": "blur", "kernel": 4}]}, "kernel: expected an odd size"),
    ],
)
def test_bad_settings_are_refused_at_load(override, message):
    with pytest.raises(SpecError, match=message.replace(".", r"\.").replace("(", r"\(")):
        ExperimentSpec.from_dict(tiny_spec_dict()).override(override)
