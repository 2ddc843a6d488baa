"""Defenses: what a protector changes (photos, base model, or the personalization)."""

from antipers.defenses.base import Protected

__all__ = ["Protected"]
