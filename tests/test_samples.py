"""Sample thumbnails: their size and bytes, and their place in the store (atomic, once
per experiment, for a folder and a pyarrow.fs URI alike)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from antipers import results
from antipers.results import IMAGES_SUFFIX, ResultStore
from antipers.samples import LIMITS, MAX_BYTES, MAX_SIDE, amplified, decode, thumbnails
from tests.test_results import make_rows


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_thumbnails_keep_small_images_exactly_and_shrink_large_ones():
    small = images(5, 64)
    pngs = thumbnails(small, "generated")
    assert len(pngs) == LIMITS["generated"] == 4
    exact = np.round(small[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    assert np.array_equal(decode(pngs[0]), exact)  # 8-bit, as published
    large = thumbnails(images(3, 300), "protected")
    assert len(large) == 2 and decode(large[0]).shape == (MAX_SIDE, MAX_SIDE, 3)
    assert thumbnails(None, "clean") == [] and thumbnails(small[:0], "clean") == []


def test_the_amplified_perturbation_is_mid_gray_where_nothing_changed():
    clean = images(1, 16)
    protected = (clean + 4 / 255).clamp(0, 1)
    same = decode(amplified(thumbnails(clean, "clean")[0], thumbnails(clean, "clean")[0]))
    assert (same == 128).all()
    shown = decode(amplified(thumbnails(protected, "clean")[0], thumbnails(clean, "clean")[0]))
    inside = (clean[0] < 0.9).all(dim=0).numpy()  # pixels the clamp did not touch
    assert np.all(shown[inside] == 128 + 40)


@pytest.mark.parametrize("uri", ["folder", "file-uri"])
def test_the_store_writes_reads_and_lists_thumbnails(tmp_path, uri):
    root = tmp_path / "store"
    store = ResultStore(str(root) if uri == "folder" else f"file://{root}")
    samples = {
        "clean": thumbnails(images(2, 64, 1), "clean"),
        "generated": thumbnails(images(4, 64, 2), "generated"),
    }
    store.write(make_rows("a"), images=samples)
    store.write(make_rows("b"))  # no images
    assert store.image_ids() == {"a"}
    assert store.read_images("a") == samples
    assert store.read_images("b") == {}
    assert store.finished_ids() == {"a", "b"}  # the images file is not an experiment
    assert set(store.load()["spec_id"]) == {"a", "b"}
    size = (root / f"a{IMAGES_SUFFIX}").stat().st_size
    assert 0 < size <= MAX_BYTES
    # a rerun replaces the thumbnails: one file, the new images
    again = {"generated": thumbnails(images(4, 64, 3), "generated")}
    store.write(make_rows("a"), images=again)
    assert store.read_images("a") == again
    assert sorted(p.name for p in root.iterdir()) == ["a.images.parquet", "a.parquet", "b.parquet"]
    store.write(make_rows("a"))  # a rerun without thumbnails leaves none of the old ones
    assert store.image_ids() == set() and store.read_images("a") == {}
    with pytest.raises(ValueError, match="spec_id"):
        store.read_images("../escape")


def test_a_crash_while_writing_thumbnails_leaves_neither_file(tmp_path, monkeypatch):
    store = ResultStore(str(tmp_path / "store"))
    real = pq.write_table

    def fails_on_images(table, sink, **kw):
        if "png" in table.column_names:
            raise OSError("disk full")
        return real(table, sink, **kw)

    monkeypatch.setattr(results.pq, "write_table", fails_on_images)
    with pytest.raises(OSError, match="disk full"):
        store.write(make_rows("a"), images={"clean": thumbnails(images(1, 8), "clean")})
    assert list((tmp_path / "store").iterdir()) == []  # no rows without their images
    assert store.finished_ids() == set()


def test_the_largest_possible_experiment_stays_within_the_stated_bound(tmp_path):
    store = ResultStore(str(tmp_path / "store"))
    noise = {
        kind: thumbnails(images(n, 512, i), kind) for i, (kind, n) in enumerate(LIMITS.items())
    }
    store.write(make_rows("a"), images=noise)  # random pixels: PNG cannot compress them
    assert (tmp_path / "store" / f"a{IMAGES_SUFFIX}").stat().st_size <= MAX_BYTES
