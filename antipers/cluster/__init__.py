"""The Ray layer: resident workers, the campaign driver (and later Tune and Serve).

The only package that imports ray; the rest of antipers runs without it.
"""

# the worker roles (one stage each), here so that the CLI can check ``--workers`` and
# ``--cpus`` without importing ray
ROLES = ("defense", "attack", "scoring")
