"""Fidelity metrics through their real code paths, with tiny random-init models of the
same classes saved to local folders: only the weights differ from a real run."""

import numpy as np
import pytest
import torch

from antipers.data.synthetic import SyntheticDataset
from antipers.metrics.base import UNAVAILABLE, ScoreInputs, evaluate
from antipers.metrics.fidelity import DINO, FID, CLIPImage, CLIPText, frechet_distance


@pytest.fixture(scope="module")
def sets():
    ds = SyntheticDataset(n_identities=2, photos_per_set=3)
    return ds.load("synth-0000", 64), ds.load("synth-0001", 64)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from antipers.models.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dino")
    ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_clip_i_and_dino_prefer_the_same_person(sets, clip_dir, dino_dir):
    me, other = sets
    for metric in (CLIPImage(path=str(clip_dir)), DINO(path=str(dino_dir))):
        same = metric.score(ScoreInputs(me.set_B, me.set_A)).values
        others = metric.score(ScoreInputs(other.set_B, me.set_A)).values
        assert same.shape == others.shape == (3,) and np.all(np.abs(same) <= 1 + 1e-6)
        assert same.mean() > others.mean()  # another person's photos are further away


def test_clip_t_scores_each_image_against_its_prompt(sets, clip_dir):
    me, _ = sets
    prompts = ("a photo of sks person",) * 3
    result = CLIPText(path=str(clip_dir)).score(ScoreInputs(me.set_B, me.set_A, prompts=prompts))
    assert result.values.shape == (3,) and np.isfinite(result.values).all()
    assert result.backend == f"clip:{clip_dir.name}"
    missing = evaluate(CLIPText(path=str(clip_dir)), ScoreInputs(me.set_B, me.set_A))
    assert missing.status == UNAVAILABLE and "prompt" in missing.reason


def test_frechet_distance_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])
    expected = 1 + 0 + 4 + sum((a**0.5 - b**0.5) ** 2 for a, b in [(1, 4), (4, 1), (9, 1)])
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)
    # a full (non-diagonal) case against scipy's general matrix square root
    from scipy import linalg

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    s1, s2 = a @ a.T + np.eye(4), b @ b.T + np.eye(4)
    ref = np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(np.zeros(4), s1, np.zeros(4), s2) == pytest.approx(ref)


def test_fid_through_inception_from_a_local_file(sets, tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    path = tmp_path / "inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), path)
    me, other = sets
    fid = FID(path=str(path))
    self_fid = fid.score(ScoreInputs(me.set_A, me.set_A)).aggregate
    cross_fid = fid.score(ScoreInputs(other.set_B, me.set_A)).aggregate
    assert self_fid == pytest.approx(0.0, abs=1e-3) and cross_fid > self_fid


@pytest.mark.parametrize(
    "metric,env",
    [
        (CLIPImage(), "ANTIPERS_CLIP_DIR"),
        (DINO(), "ANTIPERS_DINO_DIR"),
        (FID(), "ANTIPERS_INCEPTION_WEIGHTS"),
    ],
    ids=lambda m: getattr(m, "name", m),
)
def test_unconfigured_weights_are_unavailable_with_reason(metric, env, sets, monkeypatch, tmp_path):
    me, _ = sets
    monkeypatch.delenv(env, raising=False)
    result = evaluate(metric, ScoreInputs(me.set_B, me.set_A))
    assert result.status == UNAVAILABLE and env in result.reason
    monkeypatch.setenv(env, str(tmp_path / "missing"))
    result = evaluate(metric, ScoreInputs(me.set_B, me.set_A))
    assert result.status == UNAVAILABLE and str(tmp_path / "missing") in result.reason
