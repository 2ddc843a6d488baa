"""No-reference image quality of the generated images.

``brisque``: the ``brisque`` package, the implementation Anti-DreamBooth and APDM
report (lower is better quality, so a defense wants it higher). ``piqe``: pyiqa's
weight-free PIQE. ``clipiqa``, ``liqe``, ``topiq-face``: pyiqa models whose weights
must already be in pyiqa's cache (``$TORCH_HOME/hub/pyiqa``, CLIP under ``.../clip``);
they are never downloaded. Every model loads once per process.
"""

from __future__ import annotations

import contextlib
import functools
import io
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from antipers.images import to_uint8
from antipers.metrics.base import Metric, MetricResult, ScoreInputs, result
from antipers.metrics.offline import refuse_downloads


@functools.lru_cache(maxsize=1)
def _brisque_model() -> Any:
    from brisque import BRISQUE

    class _NumpyTwoBRISQUE(BRISQUE):
        """The package's features are 1-element arrays, which numpy 2 will not turn
        into floats implicitly; flatten them before its scaling step."""

        def scale_features(self, features: Any) -> Any:
            flat = [float(np.ravel(np.asarray(f, dtype=np.float64))[0]) for f in features]
            return super().scale_features(flat)

    return _NumpyTwoBRISQUE(url=False)


@dataclass(frozen=True)
class Brisque(Metric, name="brisque", higher_is_better=True, unit="score"):
    """BRISQUE: higher means worse quality. ``package``: the ``brisque`` package the field
    reports; ``pyiqa``: pyiqa's, when its weights are in pyiqa's cache."""

    implementation: Literal["package", "pyiqa"] = "package"

    def score(self, inputs: ScoreInputs) -> MetricResult:
        if self.implementation == "pyiqa":
            return _pyiqa_result(self, "brisque", inputs)
        model = _brisque_model()
        values = [float(model.score(arr)) for arr in to_uint8(inputs.generated)]
        return result(self, np.array(values), "brisque-package")


@functools.lru_cache(maxsize=8)
def _pyiqa_metric(name: str, device: str) -> Any:
    """A pyiqa metric built from local files only (see ``refuse_downloads``)."""
    import pyiqa

    # pyiqa prints "Downloading: ..." before any fetch, which refuse_downloads stops;
    # keep that misleading line (and its loading chatter) off the user's console
    with refuse_downloads(f"pyiqa {name}"), contextlib.redirect_stdout(io.StringIO()):
        return pyiqa.create_metric(name, device=device, as_loss=False)


def _pyiqa_result(metric: Metric, pyiqa_name: str, inputs: ScoreInputs) -> MetricResult:
    """Per-image scores of a pyiqa no-reference metric."""
    images = inputs.generated
    model = _pyiqa_metric(pyiqa_name, str(images.device))
    values = np.array([float(model(images[i : i + 1])) for i in range(len(images))])
    return result(metric, values, f"pyiqa-{pyiqa_name}")


class _PyiqaNR(Metric):
    """A pyiqa no-reference metric scored image by image; ``pyiqa_name`` (a class
    keyword) is pyiqa's name for it where that is not the metric's own."""

    pyiqa_name: ClassVar[str]

    def __init_subclass__(cls, *, pyiqa_name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.pyiqa_name = pyiqa_name or cls.name

    def score(self, inputs: ScoreInputs) -> MetricResult:
        return _pyiqa_result(self, self.pyiqa_name, inputs)


@dataclass(frozen=True)
class PIQE(_PyiqaNR, name="piqe", higher_is_better=True, unit="score"):
    """PIQE (pyiqa, no weights needed): higher means worse quality."""


@dataclass(frozen=True)
class CLIPIQA(_PyiqaNR, name="clipiqa", higher_is_better=False, unit="score"):
    """CLIP-IQA (pyiqa; CLIP RN50 weights in pyiqa's cache): higher means better quality."""


@dataclass(frozen=True)
class LIQE(_PyiqaNR, name="liqe", higher_is_better=False, unit="mos"):
    """LIQE (pyiqa; CLIP ViT-B/32 and LIQE weights in pyiqa's cache): higher is better quality."""


@dataclass(frozen=True)
class TOPIQFace(
    _PyiqaNR, name="topiq-face", pyiqa_name="topiq_nr-face", higher_is_better=False, unit="score"
):
    """TOPIQ-face (pyiqa; TOPIQ face weights and a ResNet-50 cached locally): higher is
    better face quality."""
