"""Fidelity of the generations to the person and to the prompt, from local weights.

- ``clip-i``: mean cosine similarity of each generated image's CLIP image embedding to
  the references' (DreamBooth's CLIP-I); ``clip-t``: cosine of each image's embedding
  to its prompt's text embedding. CLIP from a local transformers folder
  (``CLIPModel`` + processor), ``path`` or ``$ANTIPERS_CLIP_DIR``.
- ``dino``: mean cosine similarity of DINO ViT [CLS] embeddings to the references'
  (a transformers ViT folder, ``path`` or ``$ANTIPERS_DINO_DIR``).
- ``fid``: Fréchet distance between Inception-v3 pool features (2048-D) of the
  generated and reference sets; torchvision's Inception-v3 from a local state dict
  (``path`` or ``$ANTIPERS_INCEPTION_WEIGHTS``). Values differ slightly from
  TF-Inception FID; with a few dozen images FID is dominated by sample size, so
  compare it only between runs of equal counts.
Nothing is downloaded: a missing folder or file makes the metric ``unavailable``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from antipers.images import to_uint8
from antipers.metrics.base import Metric, MetricResult, MetricUnavailable, ScoreInputs, result


def _local(path: str, env: str, what: str, folder: bool) -> Path:
    chosen = path or os.environ.get(env, "")
    if not chosen:
        raise MetricUnavailable(f"{what}: no weights configured; set the metric's path or ${env}")
    p = Path(chosen).expanduser()
    if (folder and not p.is_dir()) or (not folder and not p.is_file()):
        kind = "folder" if folder else "file"
        raise MetricUnavailable(f"{what}: {kind} {p} not found; set the metric's path or ${env}")
    return p


@dataclass(frozen=True)
class _Weights:
    """Where one family of metrics finds its local weights, and the backend label it
    reports: the metrics of a family share both."""

    family: str
    env: str
    what: str
    folder: bool = True


_CLIP = _Weights("clip", "ANTIPERS_CLIP_DIR", "a CLIP folder")
_DINO = _Weights("dino", "ANTIPERS_DINO_DIR", "a DINO ViT folder")
_INCEPTION = _Weights("inception", "ANTIPERS_INCEPTION_WEIGHTS", "Inception-v3 weights", False)


@dataclass(frozen=True)
class _LocalWeights(Metric):
    """A metric whose weights are read from ``path``, else from its family's variable."""

    path: str = ""
    weights: ClassVar[_Weights]

    def local(self) -> Path:
        w = self.weights
        return _local(self.path, w.env, f"{self.name} ({w.what})", folder=w.folder)

    def label(self, found: Path) -> str:
        """The result's backend (not named ``backend``: ``evaluate`` reads that attribute)."""
        return f"{self.weights.family}:{found.name}"


@functools.lru_cache(maxsize=2)
def _clip(folder: str) -> tuple[Any, Any]:
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    return model, CLIPProcessor.from_pretrained(folder, local_files_only=True)


@functools.lru_cache(maxsize=2)
def _vit(folder: str) -> tuple[Any, Any]:
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    return model, AutoImageProcessor.from_pretrained(folder, local_files_only=True)


def _pixels(processor: Any, images: torch.Tensor) -> torch.Tensor:
    return processor(images=list(to_uint8(images)), return_tensors="pt")["pixel_values"]


def _unit(x: torch.Tensor) -> np.ndarray:
    return F.normalize(x.float(), dim=-1).detach().cpu().numpy().astype(np.float64)


def _clip_images(folder: Path, images: torch.Tensor) -> np.ndarray:
    model, processor = _clip(str(folder))
    with torch.no_grad():
        out = model.get_image_features(pixel_values=_pixels(processor, images))
    return _unit(getattr(out, "pooler_output", out))


class _SimilarityToReferences(_LocalWeights):
    """Each generated image's mean cosine similarity to the reference embeddings; the
    metrics differ only in ``embed``."""

    def embed(self, folder: Path, images: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def score(self, inputs: ScoreInputs) -> MetricResult:
        folder = self.local()
        gen = self.embed(folder, inputs.generated)
        ref = self.embed(folder, inputs.references)
        return result(self, (gen @ ref.T).mean(axis=1), self.label(folder))


@dataclass(frozen=True)
class CLIPImage(_SimilarityToReferences, name="clip-i", higher_is_better=False, unit="cosine"):
    """CLIP-I: similarity of each generated image to the person's references."""

    weights: ClassVar[_Weights] = _CLIP

    def embed(self, folder: Path, images: torch.Tensor) -> np.ndarray:
        return _clip_images(folder, images)


@dataclass(frozen=True)
class CLIPText(_LocalWeights, name="clip-t", higher_is_better=True, unit="cosine"):
    """CLIP-T: similarity of each generated image to its prompt (prompt fidelity)."""

    weights: ClassVar[_Weights] = _CLIP

    def score(self, inputs: ScoreInputs) -> MetricResult:
        folder = self.local()
        if len(inputs.prompts) != len(inputs.generated):
            raise MetricUnavailable("clip-t needs the prompt of every generated image")
        model, processor = _clip(str(folder))
        tokens = processor(text=list(inputs.prompts), return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
        text = _unit(getattr(out, "pooler_output", out))
        gen = _clip_images(folder, inputs.generated)
        return result(self, (gen * text).sum(axis=1), self.label(folder))


@dataclass(frozen=True)
class DINO(_SimilarityToReferences, name="dino", higher_is_better=False, unit="cosine"):
    """DINO: similarity of each generated image's ViT [CLS] embedding to the references'."""

    weights: ClassVar[_Weights] = _DINO

    def embed(self, folder: Path, images: torch.Tensor) -> np.ndarray:
        model, processor = _vit(str(folder))
        with torch.no_grad():
            hidden = model(pixel_values=_pixels(processor, images)).last_hidden_state
        return _unit(hidden[:, 0])


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

    Tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix S1^(1/2) S2 S1^(1/2): stable for the rank-deficient covariances
    of small sets, where a general matrix square root returns garbage."""
    d1, u1 = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (u1 * np.sqrt(np.clip(d1, 0, None))) @ u1.T
    inner = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


@functools.lru_cache(maxsize=2)
def _inception(path: str) -> torch.nn.Module:
    from torchvision.models import inception_v3

    # transform_input: torchvision's Inception weights expect it (on by default when
    # torchvision loads them itself); it maps the ImageNet-normalised input to [-1, 1].
    model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise MetricUnavailable(
            f"fid: {path} is not a torchvision Inception-v3 state dict"
        ) from exc
    model.fc = torch.nn.Identity()  # pool3 features
    return model.eval()


def inception_features(path: str, images: torch.Tensor, batch: int = 16) -> np.ndarray:
    model = _inception(path)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    feats = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = F.interpolate(
                images[start : start + batch].cpu(),
                size=(299, 299),
                mode="bilinear",
                align_corners=False,
            )
            feats.append(model((x - mean) / std))
    return torch.cat(feats).double().numpy()


@dataclass(frozen=True)
class FID(_LocalWeights, name="fid", higher_is_better=True, unit="fid"):
    """FID of the generated set against the references (one value per set)."""

    weights: ClassVar[_Weights] = _INCEPTION

    def score(self, inputs: ScoreInputs) -> MetricResult:
        file = self.local()
        if len(inputs.generated) < 2 or len(inputs.references) < 2:
            raise ValueError("fid needs at least two generated and two reference images")
        a = inception_features(str(file), inputs.generated)
        b = inception_features(str(file), inputs.references)
        value = frechet_distance(
            a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
        )
        return result(
            self,
            np.array([]),
            self.label(file),
            aggregate=value,
            notes={"generated": float(len(a)), "references": float(len(b))},
        )
