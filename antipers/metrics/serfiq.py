"""SER-FIQ: face image quality from the spread of stochastic embeddings.

The face (largest, found by the chosen face backend) is aligned on its 5 landmarks
to 112x112 as ArcFace expects, then embedded ``passes`` times by a recognition network
with its dropout layers active; quality is 2 / (1 + exp(mean pairwise Euclidean
distance of the normalised embeddings)) (Terhörst et al., 2020): 1 for a perfectly
stable embedding, lower for faces the network is unsure of. The network is a
TorchScript file (``path`` or ``$ANTIPERS_SERFIQ_MODEL``): an ArcFace-style model
mapping ``(N, 3, 112, 112)`` RGB in ``[-1, 1]`` to embeddings, with dropout layers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F

from antipers.images import to_uint8
from antipers.metrics.base import Metric, MetricResult, ScoreInputs, result
from antipers.metrics.faces import BackendName, face_backend
from antipers.metrics.fidelity import _local
from antipers.ranges import Checked, Range


@functools.lru_cache(maxsize=2)
def _network(path: str) -> torch.nn.Module:
    model = torch.jit.load(path, map_location="cpu").eval()
    dropouts = [m for m in model.modules() if getattr(m, "original_name", "").startswith("Dropout")]
    if not dropouts:
        raise ValueError(f"serfiq: {path} has no dropout layers; SER-FIQ needs them")
    for m in dropouts:
        m.train()  # only the dropout layers sample; normalisation layers stay in eval mode
    return model


def aligned_faces(rgb: np.ndarray, landmarks: np.ndarray) -> torch.Tensor:
    from insightface.utils.face_align import norm_crop

    crop = norm_crop(rgb, landmark=landmarks, image_size=112)
    return torch.from_numpy(crop).permute(2, 0, 1).float()[None] / 127.5 - 1.0


@dataclass(frozen=True)
class SERFIQ(Checked, Metric, name="serfiq", higher_is_better=False, unit="quality"):
    """SER-FIQ face quality of each generated image (NaN where no face is found)."""

    path: str = ""
    passes: Annotated[int, Range(ge=2)] = 100
    backend: BackendName = "offline"
    seed: int = 0

    def score(self, inputs: ScoreInputs) -> MetricResult:
        path = _local(
            self.path, "ANTIPERS_SERFIQ_MODEL", "serfiq (a TorchScript network)", folder=False
        )
        network = _network(str(path))
        backend = face_backend(self.backend)
        values = np.full(len(inputs.generated), np.nan)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(self.seed)  # dropout masks: repeatable
            for i, (rgb, box) in enumerate(
                zip(to_uint8(inputs.generated), backend.detect(inputs.generated), strict=True)
            ):
                if box is None:
                    continue
                face = aligned_faces(rgb, box.landmarks).expand(self.passes, -1, -1, -1)
                emb = F.normalize(network(face).float(), dim=1)
                dist = torch.cdist(emb, emb)
                mean = dist.sum() / (self.passes * (self.passes - 1))
                values[i] = float(2.0 / (1.0 + torch.exp(mean)))
        return result(self, values, f"serfiq:{path.name}+{backend.name}")
