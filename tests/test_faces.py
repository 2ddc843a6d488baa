import numpy as np
import torch

from antipers.images import read_images
from antipers.metrics.faces import face_backend
from antipers.metrics.identity import FDFR, ISM


def _photos(sample_dir, name):
    return read_images(sorted((sample_dir / "n000050" / name).glob("*.png")), 512)


def test_offline_backend_finds_every_real_face(sample_dir):
    photos = torch.cat([_photos(sample_dir, s) for s in ("set_A", "set_B", "set_C")])
    assert len(photos) == 12
    result = FDFR().score(photos, photos)
    assert result.aggregate == 0.0 and result.values.tolist() == [0.0] * 12


def test_ism_separates_the_person_from_a_stranger(sample_dir):
    set_a, set_b = _photos(sample_dir, "set_A"), _photos(sample_dir, "set_B")
    stranger = read_images([sample_dir / "target.jpg"], 512)
    same = ISM().score(set_b, set_a)
    other = ISM().score(stranger, set_a)
    assert same.aggregate > other.aggregate
    assert same.backend == "offline-retinaface-dlib" and not same.higher_is_better


def test_no_face_is_nan_for_ism_and_counted_by_fdfr():
    noise = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    from antipers.data.synthetic import SyntheticDataset

    refs = SyntheticDataset(n_identities=1).load("synth-0000", 64).set_A
    mixed = torch.cat([noise[:1], refs[:1]])
    assert FDFR().score(mixed, refs).values.tolist() == [1.0, 0.0]
    ism = ISM().score(mixed, refs)
    assert np.isnan(ism.values[0]) and ism.values[1] > 0.9
    assert ism.aggregate == ism.values[1]  # the face-less image is not averaged in
    assert np.isnan(ISM().score(noise, refs).aggregate)


def test_references_without_any_face_are_an_error():
    noise = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    try:
        ISM().score(noise, noise)
    except ValueError as exc:
        assert "no face found in any of the 2 reference images" in str(exc)
    else:
        raise AssertionError("expected a ValueError")


def test_backend_is_resident():
    assert face_backend("offline") is face_backend("offline")
