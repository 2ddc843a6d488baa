"""Tracks: the three fronts a defense can be on (image, model, immunization), as
objects the pipeline's stages call (``base.Track``); registered in
``antipers.registry.TRACKS``."""
