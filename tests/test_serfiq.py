"""SER-FIQ through its real code path with a tiny random-init TorchScript network."""

import numpy as np
import pytest
import torch

from antipers.data.synthetic import SyntheticDataset
from antipers.metrics.base import UNAVAILABLE, ScoreInputs, evaluate
from antipers.metrics.serfiq import SERFIQ


def _save(path, dropout: bool):
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.ReLU(), torch.nn.Flatten()]
    layers += [torch.nn.Dropout(0.5)] if dropout else []
    layers += [torch.nn.Linear(8 * 28 * 28, 32)]
    torch.jit.script(torch.nn.Sequential(*layers).eval()).save(str(path))
    return path


def test_serfiq_scores_faces_and_skips_faceless_images(tmp_path):
    model = _save(tmp_path / "serfiq.pt", dropout=True)
    faces = SyntheticDataset(n_identities=1).load("synth-0000", 128).set_A[:2]
    noise = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    metric = SERFIQ(path=str(model), passes=8)
    values = metric.score(ScoreInputs(torch.cat([faces, noise]), faces)).values
    assert np.isnan(values[2]) and ((values[:2] > 0) & (values[:2] < 1)).all()
    again = metric.score(ScoreInputs(torch.cat([faces, noise]), faces)).values
    assert np.array_equal(values[:2], again[:2])  # dropout masks are seeded


def test_serfiq_needs_dropout_and_weights(tmp_path, monkeypatch):
    faces = SyntheticDataset(n_identities=1).load("synth-0000", 128).set_A[:1]
    no_dropout = _save(tmp_path / "plain.pt", dropout=False)
    with pytest.raises(ValueError, match="no dropout layers"):
        SERFIQ(path=str(no_dropout), passes=4).score(ScoreInputs(faces, faces))
    monkeypatch.delenv("ANTIPERS_SERFIQ_MODEL", raising=False)
    result = evaluate(SERFIQ(), ScoreInputs(faces, faces))
    assert result.status == UNAVAILABLE and "ANTIPERS_SERFIQ_MODEL" in result.reason
