"""Checkpointing recomputes the same numbers, layer by layer where asked, and leaves
the model as it found it."""

import copy

import pytest
import torch

from antipers.models import recompute
from antipers.models.recompute import encoder_checkpointed, layers_checkpointed


def _input_grad(vae, x):
    x = x.clone().requires_grad_(True)
    vae.encode(x).latent_dist.mean.square().sum().backward()
    return x.grad


@pytest.fixture
def vae(tiny_bundle):
    return copy.deepcopy(tiny_bundle.vae).requires_grad_(False)


def test_encoder_recomputed_layer_by_layer_gives_the_same_gradient(vae, monkeypatch):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain = _input_grad(vae, x)
    ran = []

    def spy(fn, *args, **kwargs):
        ran.append(fn)
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(recompute, "checkpoint", spy)
    layers = recompute._encoder_layers(vae)
    with encoder_checkpointed(vae):
        recomputed = _input_grad(vae, x)
        with torch.no_grad():  # no gradients, nothing to recompute
            before = len(ran)
            vae.encode(x)
            assert len(ran) == before
    assert torch.equal(plain, recomputed)
    resnets = [r for block in vae.encoder.down_blocks for r in block.resnets]
    assert len(layers) > len(vae.encoder.down_blocks) and set(resnets) <= set(layers)
    # every layer's own forward, and only those, ran under checkpoint, once each
    assert len(ran) == len(layers) and {fn.__self__ for fn in ran} == set(layers)
    assert all("forward" not in vars(layer) for layer in layers)
    assert not vae.encoder.gradient_checkpointing


def test_a_layer_keeps_a_forward_someone_else_installed(vae):
    layer = vae.encoder.down_blocks[0].resnets[0]
    hooked = layer.forward
    layer.forward = hooked  # as accelerate's offload hooks do
    with layers_checkpointed([layer]):
        assert vars(layer)["forward"] is not hooked
    assert vars(layer)["forward"] is hooked


def test_a_vae_of_another_layout_uses_its_own_checkpointing():
    calls = []

    class Other(torch.nn.Module):
        def enable_gradient_checkpointing(self):
            calls.append("on")

        def disable_gradient_checkpointing(self):
            calls.append("off")

    with encoder_checkpointed(Other()):
        assert calls == ["on"]
    assert calls == ["on", "off"]
    with encoder_checkpointed(Other(), on=False):
        pass
    assert calls == ["on", "off"]


def test_layers_listed_twice_or_a_failure_inside_still_restore_every_layer(vae):
    layers = list(vae.encoder.down_blocks[0].resnets)
    twice = [layers[0], *layers, layers[0]]
    with pytest.raises(RuntimeError, match="inside"), layers_checkpointed(twice):
        assert all("forward" in vars(layer) for layer in layers)
        raise RuntimeError("inside")
    assert all("forward" not in vars(layer) for layer in layers)
