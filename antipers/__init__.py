"""antipers: an evaluation cluster for privacy defenses against personalized diffusion.

Importing antipers is cheap: torch, diffusers, peft, ray and the face backends are
imported where they are used.
"""

__version__ = "0.1.0"
