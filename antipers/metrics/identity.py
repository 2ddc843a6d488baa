"""Identity metrics: FDFR, ISM and linkability.

FDFR counts every generated image in which no face is found. ISM averages, over the
images that do have a face, the cosine similarity of each face embedding to the mean
embedding of the clean references; references without a face are left out of that
mean and reported (``references_without_face``), unlike the reference code, which
counted them. Linkability is rank-1 retrieval: is the person's own gallery entry the
nearest to each generated face among all identities of the campaign?
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from antipers.metrics.base import Metric, MetricResult, ScoreInputs, result
from antipers.metrics.faces import BackendName, face_backend


def mean_embedding(images: torch.Tensor, backend_name: str, what: str) -> tuple[np.ndarray, int]:
    """Unit-norm mean embedding of the images that have a face, and how many had none."""
    emb = face_backend(backend_name).embed(images)
    found = ~np.isnan(emb).any(axis=1)
    if not found.any():
        raise ValueError(
            f"no face found in any of the {len(images)} {what} (backend {backend_name!r}); "
            "identity metrics need at least one"
        )
    mean = emb[found].mean(axis=0)
    return mean / np.linalg.norm(mean), int((~found).sum())


@dataclass(frozen=True)
class _FaceMetric(Metric):
    """A metric of the faces that ``backend`` finds (see ``faces.face_backend``)."""

    backend: BackendName = "offline"


@dataclass(frozen=True)
class FDFR(_FaceMetric, name="fdfr", higher_is_better=True, unit="fraction"):
    """Face detection failure rate: share of generated images with no face."""

    def score(self, inputs: ScoreInputs) -> MetricResult:
        backend = face_backend(self.backend)
        values = [1.0 if box is None else 0.0 for box in backend.detect(inputs.generated)]
        return result(self, np.array(values), backend.name)


@dataclass(frozen=True)
class ISM(_FaceMetric, name="ism", higher_is_better=False, unit="cosine"):
    """Identity score matching: cosine similarity of each generated face to the mean
    reference face (NaN where no face is found)."""

    def score(self, inputs: ScoreInputs) -> MetricResult:
        backend = face_backend(self.backend)
        ref, missing = mean_embedding(inputs.references, self.backend, "reference images")
        values = backend.embed(inputs.generated) @ ref
        return result(self, values, backend.name, notes={"references_without_face": float(missing)})


@dataclass(frozen=True)
class Linkability(_FaceMetric, name="linkability", higher_is_better=False, unit="fraction"):
    """Rank-1 retrieval against a gallery of every identity's mean reference face: 1 if
    the person's own entry is the nearest, 0 if another identity's is, NaN with no face.
    Another identity whose references have no face is left out of the gallery (noted),
    so one unusable photo set does not void every other person's linkability."""

    needs_gallery: ClassVar[bool] = True

    def score(self, inputs: ScoreInputs) -> MetricResult:
        gallery = dict(inputs.gallery or {})
        gallery.setdefault(inputs.identity, inputs.references)
        if len(gallery) < 2:
            raise ValueError("linkability needs a gallery of at least two identities")
        names, means, left_out = [], [], 0
        for name in sorted(gallery):
            try:
                mean = mean_embedding(gallery[name], self.backend, f"gallery photos of {name!r}")
            except ValueError:
                if name == inputs.identity:
                    raise
                left_out += 1
                continue
            names.append(name)
            means.append(mean[0])
        if len(names) < 2:
            raise ValueError(
                f"linkability needs a gallery of at least two identities with a face; "
                f"{left_out} of {len(gallery)} have none (backend {self.backend!r})"
            )
        means = np.stack(means)
        backend = face_backend(self.backend)
        emb = backend.embed(inputs.generated)
        values = np.full(len(emb), np.nan)
        found = ~np.isnan(emb).any(axis=1)
        if found.any():
            nearest = np.argmax(emb[found] @ means.T, axis=1)
            values[found] = [1.0 if names[i] == inputs.identity else 0.0 for i in nearest]
        notes = {"gallery_size": float(len(names))}
        if left_out:
            notes["gallery_without_face"] = float(left_out)
        return result(self, values, backend.name, notes=notes)
