"""The numbers behind /v1/score, without the service."""

from __future__ import annotations

import numpy as np
import torch

from antipers.robustness import (
    Upload,
    countermeasure_specs,
    diffusion_loss,
    overall,
    score_upload,
    score_uploads,
)


def test_a_photos_loss_does_not_depend_on_its_batch(tiny_bundle):
    photos = torch.rand(7, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    together = diffusion_loss(tiny_bundle, photos)
    alone = np.concatenate([diffusion_loss(tiny_bundle, photos[i : i + 1]) for i in range(7)])
    shuffled = diffusion_loss(tiny_bundle, photos.flip(0))[::-1]
    channels_last = photos.contiguous(memory_format=torch.channels_last)  # as decoded
    mixed = torch.cat([channels_last[:1].expand(2, -1, -1, -1), channels_last[1:]])
    assert together.shape == (7,)
    assert np.array_equal(together, alone) and np.array_equal(together, shuffled)
    assert np.array_equal(together, diffusion_loss(tiny_bundle, channels_last))
    assert np.array_equal(together[[0, 0, *range(1, 7)]], diffusion_loss(tiny_bundle, mixed))


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


def test_uploads_scored_together_get_their_numbers_alone(tiny_bundle):
    """Requests batched by the service share micro-batches, never numbers; one request
    whose countermeasure fails does not fail the others."""
    gen = torch.Generator().manual_seed(2)
    a = Upload(torch.rand(1, 3, 64, 64, generator=gen), torch.rand(1, 3, 64, 64, generator=gen))
    b = Upload(torch.rand(3, 3, 64, 64, generator=gen))
    cms = countermeasure_specs([{"name": "jpeg", "quality": 50}, "blur"])
    broken = countermeasure_specs([{"name": "purify", "t": 100000, "steps": 1}])
    together = score_uploads(tiny_bundle, [(a, cms), (b, broken), (b, cms)])
    assert together[0] == score_upload(tiny_bundle, a, cms)
    assert together[2] == score_upload(tiny_bundle, b, cms)
    assert isinstance(together[1], ValueError) and "purify.t" in str(together[1])
