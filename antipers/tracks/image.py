"""The image track: the defense changes the published photos (Anti-DreamBooth and its
successors); the attacker personalizes the base model on them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from antipers.tracks.base import Track


@dataclass(frozen=True)
class ImageTrack(Track):
    """Perturbed photos against the attacker's personalization of the base model."""

    changes_photos: ClassVar[bool] = True
