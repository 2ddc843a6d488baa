"""The insightface backend's code path with a tiny random-init ONNX model of ArcFace's
input and output (1x3x112x112 -> 512): only the weights differ from a real run."""

import numpy as np
import pytest
import torch

from antipers.data.synthetic import SyntheticDataset
from antipers.metrics.base import UNAVAILABLE, ScoreInputs, evaluate
from antipers.metrics.faces import ArcFace, FaceBackend, RetinaFaceMobile, face_backend
from antipers.metrics.identity import ISM


@pytest.fixture(scope="module")
def tiny_arcface(tmp_path_factory):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(128, 512),
    ).eval()
    path = tmp_path_factory.mktemp("arcface") / "w600k_r50.onnx"
    torch.onnx.export(
        net,
        torch.zeros(1, 3, 112, 112),
        str(path),
        input_names=["input.1"],
        output_names=["embedding"],
        dynamic_axes={"input.1": {0: "batch"}},
        dynamo=False,
    )
    return path


def test_arcface_onnx_path_embeds_aligned_faces(tiny_arcface):
    backend = FaceBackend("test-arcface", RetinaFaceMobile(), ArcFace(tiny_arcface))
    faces = SyntheticDataset(n_identities=1).load("synth-0000", 128).set_A
    noise = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    emb = backend.embed(torch.cat([faces, noise]))
    assert emb.shape == (5, 512)
    assert np.allclose(np.linalg.norm(emb[:4], axis=1), 1.0)
    assert np.isnan(emb[4]).all()
    again = FaceBackend("test-arcface", RetinaFaceMobile(), ArcFace(tiny_arcface)).embed(faces)
    assert np.allclose(again, emb[:4], atol=1e-6)  # deterministic through alignment + ONNX


def test_insightface_backend_unavailable_without_models(tmp_path, monkeypatch, tiny_arcface):
    monkeypatch.setenv("ANTIPERS_INSIGHTFACE_DIR", str(tmp_path))
    faces = SyntheticDataset(n_identities=1).load("synth-0000", 64).set_A
    result = evaluate(ISM(backend="insightface"), ScoreInputs(faces, faces))
    assert result.status == UNAVAILABLE
    assert str(tmp_path) in result.reason and "ANTIPERS_INSIGHTFACE_DIR" in result.reason
    (tmp_path / "w600k_r50.onnx").write_bytes(tiny_arcface.read_bytes())
    face_backend.cache_clear()
    result = evaluate(ISM(backend="insightface"), ScoreInputs(faces, faces))
    assert result.status == UNAVAILABLE and "no detection model" in result.reason
