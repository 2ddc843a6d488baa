import json
import shutil

import numpy as np
import pytest
import torch

from antipers.cli import main
from antipers.data.synthetic import SyntheticDataset
from antipers.images import read_images, write_png
from antipers.pipeline import RunContext, run_experiment
from antipers.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict

FAST = ["--param", "iterations=1", "--param", "pgd_steps=2", "--param", "surrogate_steps=1"]
FAST += ["--param", "num_class_images=2", "--param", "class_steps=2"]


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "me"
    faces = SyntheticDataset(n_identities=1, photos_per_set=3).load("synth-0000", 32).set_B
    write_png(faces, [folder / f"photo{i}.png" for i in range(3)])
    return folder


def run(photos, out, *extra):
    return main(
        [
            "protect",
            str(photos),
            str(out),
            "--defense",
            "aspl",
            "--param",
            "eps=8",
            *FAST,
            "--base-model",
            "tiny",
            "--resolution",
            "32",
            "--device",
            "cpu",
            *extra,
        ]
    )


def test_protect_end_to_end(photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(photos, out) == 0
    report = json.loads((out / "protect.json").read_text())
    assert report["defense"]["name"] == "aspl" and report["defense"]["eps"] == 8.0
    assert [p["output"] for p in report["photos"]] == [str(out / f"photo{i}.png") for i in range(3)]
    clean = read_images(sorted(photos.glob("*.png")), 32)
    protected = read_images(sorted(out.glob("photo*.png")), 32)
    diff = ((protected - clean).abs() * 255).round()
    assert diff.max() <= 8 and diff.max() > 0
    assert [p["linf_255"] for p in report["photos"]] == diff.amax(dim=(1, 2, 3)).tolist()
    assert all(np.isfinite(p["psnr_db"]) and 0 < p["ssim"] <= 1 for p in report["photos"])
    assert "L-inf" in capsys.readouterr().out


def test_a_second_protect_reads_its_class_images_from_the_cache(photos, tmp_path, monkeypatch):
    """``antipers protect`` fingerprints its base model as a campaign does, so the class
    images it made are read back next time, not generated again (at SD scale that is
    hundreds of sampler runs per call)."""
    from antipers.attacks import class_images

    made = []
    real = class_images.generate

    def counting(bundle, prompt, count, *args, **kwargs):
        made.append(count)
        return real(bundle, prompt, count, *args, **kwargs)

    monkeypatch.setattr(class_images, "generate", counting)
    monkeypatch.setenv("ANTIPERS_CACHE_DIR", str(tmp_path / "cache"))  # none made yet
    assert run(photos, tmp_path / "first") == 0
    assert made == [2]
    assert run(photos, tmp_path / "second") == 0
    assert made == [2]  # read from the cache
    first = read_images(sorted((tmp_path / "first").glob("photo*.png")), 32)
    second = read_images(sorted((tmp_path / "second").glob("photo*.png")), 32)
    assert torch.equal(first, second)


def test_protect_keeps_each_photos_size_within_budget(tmp_path):
    """A 80x48 and a 64x64 photo protected at 32 px come back at their own sizes, every
    pixel within 8/255 of the original, the perturbation spread over the whole photo."""
    from PIL import Image

    from antipers.images import read_image, resize

    folder = tmp_path / "me"
    folder.mkdir()
    face = SyntheticDataset(n_identities=1, photos_per_set=2).load("synth-0000", 64).set_B
    wide = torch.nn.functional.interpolate(face[:1], size=(48, 80), mode="bilinear")
    for name, image in (("wide", wide), ("square", resize(face[1:], 64))):
        arr = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{name}.png")
    out = tmp_path / "out"
    assert run(folder, out) == 0
    report = json.loads((out / "protect.json").read_text())
    assert {p["size"] == list(Image.open(p["output"]).size) for p in report["photos"]} == {True}
    assert sorted(p["size"] for p in report["photos"]) == [[64, 64], [80, 48]]
    for name in ("wide", "square"):
        original, protected = read_image(folder / f"{name}.png"), read_image(out / f"{name}.png")
        diff = ((protected - original).abs() * 255).round()
        assert diff.max() <= 8
        assert (diff.amax(dim=(0, 1)) > 0).float().mean() > 0.5  # not only a corner changed
    assert report["resolution"] == 32
    # the preview: a row per photo of original | protected | difference, captioned
    from antipers.protect import PREVIEW_SIDE

    preview = np.asarray(Image.open(out / "preview.png").convert("RGB"), dtype=int)
    row = PREVIEW_SIDE + 20 + 6
    assert preview.shape[0] == 2 * row + 6
    square = next(i for i, p in enumerate(report["photos"]) if p["size"] == [64, 64])
    top = 6 + square * row + 20
    tiles = [preview[top : top + PREVIEW_SIDE, x : x + PREVIEW_SIDE] for x in (6, 204, 402)]
    original, protected, difference = tiles
    assert np.abs(original - protected).max() > 0  # the protected tile is not the original
    assert abs(difference.mean() - 128) < 12 and difference.std() > 5  # x10 around gray
    assert (preview[6 + square * row : top] < 128).any()  # the caption's text


def test_protect_refuses_a_photo_the_preview_would_overwrite(photos, tmp_path, capsys):
    folder = tmp_path / "mine"
    shutil.copytree(photos, folder)
    (folder / "photo0.png").rename(folder / "preview.png")
    assert run(folder, tmp_path / "out") == 2
    assert "preview.png" in capsys.readouterr().err


def test_protect_refuses_to_overwrite_or_write_into_input(photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(photos, out) == 0
    before = (out / "photo0.png").read_bytes()
    assert run(photos, out) == 2
    assert "exists" in capsys.readouterr().err and (out / "photo0.png").read_bytes() == before
    assert run(photos, out, "--overwrite") == 0
    assert run(photos, photos / "protected") == 2
    assert "refusing to write into the input folder" in capsys.readouterr().err
    assert not (photos / "protected").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--param", "epss=3"], "has no parameter 'epss'"),
        (["--param", "eps=-1"], "eps: expected 1..255"),
        (["--param", "eps"], "expected KEY=VALUE"),
        (["--defense", "iddm"], "defense 'iddm' does not change photos"),
    ],
)
def test_protect_bad_parameters(photos, tmp_path, capsys, args, message):
    assert run(photos, tmp_path / "out", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_protect_bad_inputs(photos, tmp_path, capsys, monkeypatch):
    (photos / "notes.txt").write_text("hi")
    assert run(photos, tmp_path / "out") == 2
    assert "notes.txt: not an image" in capsys.readouterr().err
    (photos / "notes.txt").unlink()
    (photos / "broken.png").write_bytes(b"not a png")
    assert run(photos, tmp_path / "out") == 2
    assert "broken.png: unreadable image" in capsys.readouterr().err
    (photos / "broken.png").unlink()
    assert run(tmp_path / "nobody", tmp_path / "out") == 2
    assert "input folder does not exist" in capsys.readouterr().err
    monkeypatch.setenv("ANTIPERS_MODELS_DIR", str(tmp_path / "models"))
    code = main(
        [
            "protect",
            str(photos),
            str(tmp_path / "out"),
            "--defense",
            "aspl",
            "--base-model",
            "sd21-base",
            "--resolution",
            "32",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "stable-diffusion-2-1-base does not exist" in err and "unet/" in err


def test_defense_runs_inside_an_experiment():
    spec = ExperimentSpec.from_dict(
        tiny_spec_dict(
            defense={"name": "cap-aspl", "iterations": 1, "pgd_steps": 2, "num_class_images": 2}
        )
    )
    rows = run_experiment(spec, RunContext(device=torch.device("cpu")), raise_errors=True)
    assert {r["defense"] for r in rows} == {"cap-aspl"}
    assert '"iterations":1' in rows[0]["defense_params"]
    assert all(r["status"] == "ok" for r in rows)
