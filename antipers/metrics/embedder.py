"""``embedder-ism``: ISM under a face embedder of ArcFace's architecture (the whole
64-112 px image, no detector), by default the ``mini-faces`` embedder antipers ships.
IDDM reports ``decoupled_ism`` under the embedder it optimized against; this metric
gives every defense, the undefended baseline too, the number to compare it with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from antipers.metrics.base import Metric, MetricResult, MetricUnavailable, ScoreInputs, result


@dataclass(frozen=True)
class EmbedderISM(Metric, name="embedder-ism", higher_is_better=False, unit="cosine"):
    """Cosine similarity of each generated image's embedding to the mean embedding of the
    references. ``embedder``: ``mini-faces``, a ``backbone.pth`` path, ``""`` for
    ``$ANTIPERS_ARCFACE_TORCH``, or ``random[:SEED]``; ``depth``: the iresnet depth
    (``""``: the shipped embedder's, else r50)."""

    embedder: str = "mini-faces"
    depth: str = ""

    def score(self, inputs: ScoreInputs) -> MetricResult:
        from antipers.models.embedders import (
            describe_embedder,
            embedder_model,
            identity_similarity,
            person_embedding,
            resolve_embedder,
            shipped_depth,
        )

        depth = self.depth or shipped_depth(self.embedder, "r50")
        try:
            resolved = resolve_embedder(self.embedder)
            model = embedder_model(resolved, depth)  # resident; wherever IDDM has put it
        except FileNotFoundError as exc:  # weights not configured or not there
            raise MetricUnavailable(f"embedder-ism: {exc}") from None
        device = next(model.parameters()).device
        with torch.no_grad():
            person = person_embedding(model, inputs.references.float().to(device))
            values = identity_similarity(model, inputs.generated.float().to(device), person)
        return result(self, values.double().cpu().numpy(), describe_embedder(resolved, depth))
