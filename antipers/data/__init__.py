"""Identity sets: the photos of one person, split as Anti-DreamBooth splits them."""

from antipers.data.identity import DatasetError, IdentitySet

__all__ = ["DatasetError", "IdentitySet"]
