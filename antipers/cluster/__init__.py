"""The Ray layer: resident workers, the campaign driver (and later Tune and Serve).

The only package that imports ray; the rest of antipers runs without it.
"""

# each worker role and the stage it runs (its ``StageWorker`` method, the key of its
# ``info()["started"]`` count); here so that the CLI can check ``--workers`` and
# ``--cpus`` without importing ray
STAGE_OF = {"defense": "protect", "attack": "attack", "scoring": "score"}
ROLES = tuple(STAGE_OF)
