"""Metrics: per-image scores of generated images against clean references."""
