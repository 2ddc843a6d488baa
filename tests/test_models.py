import pytest
import torch

from antipers.models.local import SD15, DiffusersFolder, ModelNotFoundError
from antipers.models.tiny import TinyModel
from antipers.registry import BASE_MODELS


def _state(bundle):
    return {
        f"{name}.{k}": v
        for name in ("vae", "unet", "text_encoder")
        for k, v in getattr(bundle, name).state_dict().items()
    }


def test_tiny_is_deterministic_by_seed(tiny_bundle):
    again = TinyModel(seed=0).load(torch.device("cpu"))
    a, b = _state(tiny_bundle), _state(again)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = _state(TinyModel(seed=1).load(torch.device("cpu")))
    assert any(not torch.equal(a[k], other[k]) for k in a if a[k].is_floating_point())


def test_tokenizer_is_real_clip_vocabulary(tiny_bundle):
    ids = tiny_bundle.tokenizer("a photo of").input_ids
    assert ids == [49406, 320, 1125, 539, 49407]  # CLIP's own ids for these words
    assert len(tiny_bundle.tokenizer) == 49408


def test_shared_operations_at_small_latents(tiny_bundle):
    images = torch.rand(2, 3, 32, 32)
    latents = tiny_bundle.encode(images)
    assert latents.shape == (2, 4, 8, 8)
    decoded = tiny_bundle.decode(latents)
    assert decoded.shape == images.shape and decoded.min() >= 0 and decoded.max() <= 1
    embeds = tiny_bundle.prompt_embeds(["a photo of sks person"] * 2)
    assert embeds.shape == (2, 77, 32)
    gen = torch.Generator().manual_seed(0)
    loss = tiny_bundle.training_loss(latents, embeds, gen)
    assert loss.ndim == 0 and torch.isfinite(loss)
    again = tiny_bundle.training_loss(latents, embeds, torch.Generator().manual_seed(0))
    assert torch.equal(loss, again)  # noise and timesteps come from the generator alone


def test_encode_is_differentiable_for_pgd(tiny_bundle):
    images = torch.rand(1, 3, 32, 32, requires_grad=True)
    embeds = tiny_bundle.prompt_embeds(["x"])
    loss = tiny_bundle.training_loss(
        tiny_bundle.encode(images), embeds, torch.Generator().manual_seed(1)
    )
    loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_bundle.unet.parameters())  # resident model frozen


def test_diffusers_folder_round_trip(tiny_bundle, tmp_path, monkeypatch):
    tiny_bundle.save_pretrained(tmp_path / "stable-diffusion-v1-5")
    loaded = DiffusersFolder(str(tmp_path / "stable-diffusion-v1-5")).load(torch.device("cpu"))
    a, b = _state(tiny_bundle), _state(loaded)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.tokenizer("a photo of").input_ids == tiny_bundle.tokenizer("a photo of").input_ids
    monkeypatch.setenv("ANTIPERS_MODELS_DIR", str(tmp_path))
    by_name = BASE_MODELS.build("sd15").load(torch.device("cpu"))
    assert by_name.name == "sd15"
    assert torch.equal(by_name.unet.conv_in.weight, tiny_bundle.unet.conv_in.weight)


def test_missing_folder_says_where_and_what(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTIPERS_MODELS_DIR", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as err:
        SD15().load(torch.device("cpu"))
    msg = str(err.value)
    assert str(tmp_path / "stable-diffusion-v1-5") in msg
    assert "unet/" in msg and "ANTIPERS_MODELS_DIR" in msg
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(
        ModelNotFoundError, match="lacks vae/, text_encoder/, tokenizer/, scheduler/"
    ):
        DiffusersFolder(str(tmp_path / "partial")).load(torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,unet_params", [("sd15-arch", 859_520_964), ("sd21-arch", 865_910_724)]
)
def test_real_architectures(name, unet_params):
    bundle = BASE_MODELS.build(name).load(torch.device("cpu"))
    assert sum(p.numel() for p in bundle.unet.parameters()) == unet_params
    assert bundle.latent_factor == 8


def test_vae_passes_hold_a_bounded_number_of_pixels(tiny_bundle, monkeypatch):
    """Encodes and decodes go ``vae_chunk`` images at a time: at most 16, at most
    ``VAE_PIXELS`` pixels (one photo at 512 px), with the results of one whole pass to
    float rounding (on a CPU a small batch of one runs another convolution kernel)."""
    from antipers.models import bundle as bundle_module

    assert bundle_module.vae_chunk(64 * 64) == 16
    assert bundle_module.vae_chunk(256 * 256) == 4
    assert bundle_module.vae_chunk(512 * 512) == 1
    assert bundle_module.vae_chunk(1024 * 1024) == 1
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = tiny_bundle.posterior(images)
        latents = whole.latents()
        decoded = tiny_bundle.decode(latents)
    seen = []
    vae = tiny_bundle.vae
    real_encode, real_decode = vae.encode, vae.decode
    monkeypatch.setattr(vae, "encode", lambda x: seen.append(len(x)) or real_encode(x))
    monkeypatch.setattr(vae, "decode", lambda z: seen.append(len(z)) or real_decode(z))
    monkeypatch.setattr(bundle_module, "VAE_PIXELS", 2 * 32 * 32)
    with torch.no_grad():
        parts = tiny_bundle.posterior(images)
        assert torch.allclose(parts.mean, whole.mean, atol=1e-5)
        assert torch.allclose(tiny_bundle.decode(latents), decoded, atol=1e-5)
    assert seen == [2, 1, 2, 1]
