"""No-reference image quality of the generated images.

``brisque``: the ``brisque`` package, the implementation Anti-DreamBooth and APDM
report (lower is better quality, so a defense wants it higher). ``piqe``: pyiqa's
weight-free PIQE. Both models load once per process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from antipers.images import to_uint8
from antipers.metrics.base import MetricResult, ScoreInputs, result


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
class Brisque:
    """BRISQUE (the ``brisque`` package): higher means worse quality."""

    name: ClassVar[str] = "brisque"
    higher_is_better: ClassVar[bool] = True
    unit: ClassVar[str] = "score"

    def score(self, inputs: ScoreInputs) -> MetricResult:
        model = _brisque_model()
        values = [float(model.score(arr)) for arr in to_uint8(inputs.generated)]
        return result(self, np.array(values), "brisque-package")


@functools.lru_cache(maxsize=4)
def _pyiqa_metric(name: str, device: str) -> Any:
    import pyiqa

    return pyiqa.create_metric(name, device=device, as_loss=False)


@dataclass(frozen=True)
class PIQE:
    """PIQE (pyiqa, no weights needed): higher means worse quality."""

    name: ClassVar[str] = "piqe"
    higher_is_better: ClassVar[bool] = True
    unit: ClassVar[str] = "score"

    def score(self, inputs: ScoreInputs) -> MetricResult:
        images = inputs.generated
        metric = _pyiqa_metric("piqe", str(images.device))
        values = [float(metric(images[i : i + 1])) for i in range(len(images))]
        return result(self, np.array(values), "pyiqa-piqe")
