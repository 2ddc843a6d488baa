"""The ``mini`` face embedder IDDM optimizes against on ``mini-faces``: its seed stream,
its training loop, and that the shipped weights know the generator's people."""

from __future__ import annotations

import pytest
import torch

from antipers.data import synthetic
from antipers.errors import UserError
from antipers.models.embedders import SHIPPED, resolve_embedder
from antipers.models.iresnet import IResNet, load_iresnet, random_iresnet
from antipers.models.train_embedder import EmbedderTrainConfig, identification, train_embedder


def test_embedder_people_are_no_identity_and_no_training_face():
    """Latents, not seeds, compared (torch keeps 32 bits of a seed): random 100-d normals
    lie about 14 apart, one person shared would be 0 apart."""
    people = torch.cat(
        [synthetic.stream_latents(synthetic.EMBEDDER_STREAM, k, 1)[0] for k in range(512)]
    )
    identities = torch.cat([synthetic.identity_latent(s, i) for s in range(5) for i in range(512)])
    assert torch.cdist(people, identities).min() > 5.0
    assert torch.cdist(people, synthetic.training_latents(0, 512)).min() > 5.0
    assert torch.cdist(people, people).topk(2, largest=False).values[:, 1].min() > 5.0
    base, nudges = synthetic.stream_latents(synthetic.EMBEDDER_STREAM, 3, 4)
    again = synthetic.stream_latents(synthetic.EMBEDDER_STREAM, 3, 4)
    assert torch.equal(base, again[0]) and torch.equal(nudges, again[1])  # deterministic


def test_mini_depth_sees_64_px_and_is_small():
    model = random_iresnet("mini", 0)
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    out = model(images)
    assert out.shape == (2, 512)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    out.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    params = sum(p.numel() for p in model.parameters())
    assert params < sum(p.numel() for p in IResNet("r18").parameters()) / 10


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("embedder")
    config = EmbedderTrainConfig(people=6, photos_per_person=2, steps=4, batch=4, eval_identities=3)
    return out, config, train_embedder(out, config)


def test_training_writes_weights_that_load_as_the_mini_depth(small_run):
    out, config, folder = small_run
    model = load_iresnet(folder / "backbone.pth", "mini")
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 512)
    card = (folder / "README.md").read_text()
    assert "train-embedder" in card and "rank-1" in card
    losses = (folder / "losses.csv").read_text().splitlines()
    assert len(losses) == 1 + config.steps  # header and one line per step
    with pytest.raises(ValueError, match="do not fit iresnet r18"):
        load_iresnet(folder / "backbone.pth", "r18")


def test_training_resumes_and_refuses_other_settings(small_run):
    out, config, folder = small_run
    before = (folder / "backbone.pth").read_bytes()
    train_embedder(out, config)  # the checkpoint is at the last step: nothing retrains
    assert load_iresnet(folder / "backbone.pth", "mini").state_dict().keys()
    again = torch.load(folder / "backbone.pth", weights_only=True)
    first = torch.load(__import__("io").BytesIO(before), weights_only=True)
    assert all(torch.equal(again[k], first[k]) for k in first)
    with pytest.raises(UserError, match="margin: 0.35 -> 0.5"):
        train_embedder(out, EmbedderTrainConfig(**{**config.__dict__, "margin": 0.5}))


def test_shipped_embedder_knows_the_generators_people():
    """On evaluation people it never saw, the trained weights put a person's photos
    further above strangers than the same architecture at random weights does."""
    path, depth = SHIPPED["mini-faces"]
    assert resolve_embedder("mini-faces") == str(path)
    people = [
        synthetic.SyntheticDataset(n_identities=8).load(f"synth-{i:04d}", 64) for i in range(8)
    ]
    trained = identification(load_iresnet(path, depth), people)
    random = identification(random_iresnet(depth, 0), people)

    def margin(report):
        return report["same_person_cosine"] - report["different_person_q95"]

    assert margin(trained) > margin(random) + 0.05


def test_a_missing_shipped_embedder_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(SHIPPED, "mini-faces", (tmp_path / "gone" / "backbone.pth", "mini"))
    with pytest.raises(FileNotFoundError, match="gone/backbone.pth"):
        resolve_embedder("mini-faces")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"batch": 1}, r"batch: expected >= 2 \(BatchNorm\), got 1"),
        ({"resolution": 40}, "resolution: expected a multiple of 16, got 40"),
        ({"nudge": -0.1}, r"nudge: expected 0\.\.2, got -0.1"),
        ({"margin": 1.0}, r"margin: expected in \[0, 1\), got 1.0"),
    ],
)
def test_bad_settings_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        EmbedderTrainConfig(**change)
