"""The Ray layer: resident workers, the campaign driver (and later Tune and Serve).

The only package that imports ray; the rest of antipers runs without it.
"""
