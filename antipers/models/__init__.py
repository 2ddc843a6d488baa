"""Base models: the bundle every stage shares, and the ways to get one."""

from antipers.models.bundle import DiffusionBundle

__all__ = ["DiffusionBundle"]
