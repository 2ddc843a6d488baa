"""The differentiable face embedder (ArcFace's iresnet) with random weights."""

from __future__ import annotations

import pytest
import torch

from antipers.models.iresnet import IResNet, load_iresnet, random_iresnet


@pytest.fixture(scope="module")
def embedder():
    return random_iresnet("r18", seed=0)


def test_embeddings_are_unit_vectors_and_differentiable(embedder):
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images.requires_grad_(True)
    out = embedder(images)
    assert out.shape == (3, 512)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    (out[0] @ out[1]).backward()  # a similarity that an optimizer can lower
    assert images.grad is not None and images.grad[:2].abs().sum() > 0
    assert images.grad[2].abs().sum() == 0  # samples do not mix (eval mode)


def test_random_weights_are_seeded():
    a, b, c = random_iresnet("r18", 1), random_iresnet("r18", 1), random_iresnet("r18", 2)
    assert torch.equal(a.fc.weight, b.fc.weight) and not torch.equal(a.fc.weight, c.fc.weight)


def test_weights_load_from_a_state_dict_file_and_mismatches_are_named(embedder, tmp_path):
    path = tmp_path / "backbone.pth"
    torch.save(embedder.state_dict(), path)
    loaded = load_iresnet(path, depth="r18")
    images = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(loaded(images), embedder(images), atol=1e-6)
    with pytest.raises(ValueError, match="do not fit iresnet r50.*another depth"):
        load_iresnet(path, depth="r50")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_iresnet(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="depth: unknown 'r7'"):
        IResNet("r7")


def test_missing_configuration_names_the_variable(monkeypatch):
    monkeypatch.delenv("ANTIPERS_ARCFACE_TORCH", raising=False)
    with pytest.raises(FileNotFoundError, match=r"\$ANTIPERS_ARCFACE_TORCH"):
        load_iresnet()


def test_identity_decoupling_trades_similarity_for_reconstruction(tiny_bundle, embedder):
    """IDDM's data step: similarity to the person drops, the reconstruction loss stays
    within a bound, and the knob moves the trade-off in order."""
    from antipers.defenses.decouple import decouple
    from antipers.defenses.pgd import PGDConfig
    from antipers.models.embedders import identity_similarity, person_embedding
    from antipers.registry import DATASETS
    from tests.conftest import eval_loss

    photos = DATASETS.build("synthetic", {"n_identities": 1}).load("synth-0000", 64).set_B
    person = person_embedding(embedder, photos)
    config = PGDConfig(eps=16, step_size=2, steps=8)
    prompt = "a photo of sks person"

    def outcome(privacy: float) -> tuple[float, float]:
        x = decouple(photos, tiny_bundle, embedder, prompt, privacy, config, torch.Generator())
        with torch.no_grad():
            similarity = identity_similarity(embedder, x, person).mean().item()
        return similarity, eval_loss(tiny_bundle, x)

    with torch.no_grad():
        before = identity_similarity(embedder, photos, person).mean().item()
    loss_before = eval_loss(tiny_bundle, photos)
    private, useful = outcome(0.9), outcome(0.1)
    assert private[0] < before - 0.01  # decoupled: less like the person
    assert abs(private[1] - loss_before) < 0.05  # still reconstructed about as well
    assert private[0] < useful[0]  # more privacy weight, lower similarity
    assert useful[1] <= private[1] + 1e-4  # more utility weight, no worse reconstruction
