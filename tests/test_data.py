import pytest
import torch

from antipers.cli import main
from antipers.data.folders import PlainFolders, VGGFace2, open_folder
from antipers.data.identity import DatasetError
from antipers.data.synthetic import SyntheticDataset
from antipers.images import write_png


def test_synthetic_is_deterministic_and_split():
    ds = SyntheticDataset(n_identities=3, photos_per_set=2, seed=4)
    a = ds.load("synth-0001", 32)
    b = SyntheticDataset(n_identities=3, photos_per_set=2, seed=4).load("synth-0001", 32)
    assert a.counts() == {"set_A": 2, "set_B": 2, "set_C": 2}
    assert a.set_A.shape == (2, 3, 32, 32) and a.set_A.dtype == torch.float32
    assert torch.equal(a.set_B, b.set_B)
    other = ds.load("synth-0002", 32)
    assert not torch.allclose(a.set_B, other.set_B)
    assert ds.identities() == ["synth-0000", "synth-0001", "synth-0002"]
    with pytest.raises(DatasetError, match="no identity 'synth-0009'"):
        ds.load("synth-0009", 32)


@pytest.fixture
def adb_root(tmp_path):
    root = tmp_path / "adb"
    assert (
        main(
            [
                "data",
                "synth",
                "--identities",
                "2",
                "--out",
                str(root),
                "--resolution",
                "32",
                "--photos-per-set",
                "2",
            ]
        )
        == 0
    )
    return root


def test_data_synth_writes_antidreambooth_layout(adb_root):
    for identity in ("synth-0000", "synth-0001"):
        for s in ("set_A", "set_B", "set_C"):
            assert len(list((adb_root / identity / s).glob("*.png"))) == 2
    loaded = VGGFace2(root=str(adb_root)).load("synth-0001", 32)
    direct = SyntheticDataset(n_identities=2, photos_per_set=2).load("synth-0001", 32)
    assert torch.allclose(loaded.set_B, direct.set_B, atol=1 / 255 + 1e-6)  # PNG quantization
    assert loaded.sources["set_B"][0].endswith("set_B/00.png")


def test_data_check_accepts_good_folder(adb_root, capsys):
    assert main(["data", "check", str(adb_root)]) == 0
    assert "ok" in capsys.readouterr().out


@pytest.mark.parametrize(
    "damage,expected",
    [
        (lambda r: __import__("shutil").rmtree(r / "synth-0000" / "set_C"), "set_C: missing"),
        (
            lambda r: (r / "synth-0000" / "set_A" / "notes.txt").write_text("x"),
            "notes.txt: not an image",
        ),
        (
            lambda r: (r / "synth-0001" / "set_B" / "00.png").write_bytes(b"garbage"),
            "00.png: unreadable image",
        ),
        (
            lambda r: (r / "synth-0001" / "set_A" / "01.png").unlink(),
            "set_A: 1 usable photo(s), need at least 2",
        ),
    ],
)
def test_bad_folders_are_named(adb_root, damage, expected, capsys):
    damage(adb_root)
    problems = open_folder(adb_root).check()
    assert any(expected in p for p in problems), problems
    assert main(["data", "check", str(adb_root)]) == 1
    assert expected in capsys.readouterr().out


def test_missing_root_and_identity(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        VGGFace2(root=str(tmp_path / "nope")).identities()
    (tmp_path / "ds").mkdir()
    with pytest.raises(DatasetError, match="no identity 'bob'"):
        VGGFace2(root=str(tmp_path / "ds")).load("bob", 32)


def test_plain_folders_split_round_robin(tmp_path):
    faces = SyntheticDataset(n_identities=1, photos_per_set=2).load("synth-0000", 32).set_A
    photos = torch.cat([faces, faces, faces])[:5]
    write_png(photos, [tmp_path / "alice" / f"{i}.png" for i in range(5)])
    ds = open_folder(tmp_path, min_photos=1)
    assert isinstance(ds, PlainFolders)
    person = ds.load("alice", 32)
    assert person.counts() == {"set_A": 2, "set_B": 2, "set_C": 1}
    assert person.sources["set_B"] == (
        str(tmp_path / "alice" / "1.png"),
        str(tmp_path / "alice" / "4.png"),
    )
    write_png(faces[:1], [tmp_path / "bob" / "0.png"])
    with pytest.raises(DatasetError, match="bob: 1 usable photo"):
        ds.load("bob", 32)
    # min_photos counts per set, as `data check --help` says: 5 photos give set_C one
    with pytest.raises(DatasetError, match=r"alice: 5 usable photo\(s\), need at least 6"):
        open_folder(tmp_path, min_photos=2).load("alice", 32)


def test_real_sample_loads(sample_dir):
    person = VGGFace2(root=str(sample_dir), min_photos=4).load("n000050", 64)
    assert person.counts() == {"set_A": 4, "set_B": 4, "set_C": 4}
    assert person.set_A.min() >= 0 and person.set_A.max() <= 1
