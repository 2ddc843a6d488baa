"""The numbers behind /v1/score, without the service."""

from __future__ import annotations

import numpy as np
import torch

from antipers.robustness import Upload, diffusion_loss, overall, score_upload


def test_a_photos_loss_does_not_depend_on_its_batch(tiny_bundle):
    photos = torch.rand(7, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    together = diffusion_loss(tiny_bundle, photos)
    alone = np.concatenate([diffusion_loss(tiny_bundle, photos[i : i + 1]) for i in range(7)])
    shuffled = diffusion_loss(tiny_bundle, photos.flip(0))[::-1]
    assert together.shape == (7,)
    assert np.array_equal(together, alone) and np.array_equal(together, shuffled)


def test_overall_score_grows_with_protection_and_survival():
    gain = np.array([0.0, 0.01, 0.05, 0.05, 0.2])
    worst = np.array([0.0, 0.01, 0.0, 0.05, 0.2])
    score = overall(gain, worst)
    assert score[0] == 0 and np.all((score >= 0) & (score < 1))
    assert score[3] > score[2] and score[4] > score[3] and score[3] > score[1]
    assert np.isclose(score[3], 0.5)  # gain 0.05: strength 0.5, all of it survives


def test_unchanged_photos_gain_nothing_and_report_no_psnr(tiny_bundle):
    photos = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    body = score_upload(tiny_bundle, Upload(photos, photos.clone()), countermeasures=())
    assert body["set"] == {"loss_gain": 0.0, "worst_gain": 0.0, "score": 0.0}
    assert body["photos"][0]["budget"]["psnr_db"] is None
