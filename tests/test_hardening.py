"""Bad input at every boundary gets one line that names it (exit 2), internal errors
keep their traceback (exit 1), and nothing outside what antipers wrote is touched."""

from __future__ import annotations

import io
import json
import socket

import pytest
import torch
from PIL import Image

from antipers.cli import main
from antipers.data.synthetic import SyntheticDataset
from antipers.images import read_image, write_png
from antipers.registry import SpecError


def one_line_error(capsys, code: int, *needles: str, lines: int = 1) -> str:
    """``lines``: a folder with several bad photos gets one line per photo."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    err = err[err.find("error: ") :] if "\nerror: " in err else err  # after progress lines
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert len(err.splitlines()) == lines, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def faces():
    return SyntheticDataset(n_identities=1).load("synth-0000", 64)


def write_campaign(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


CAMPAIGN = """suite: hard
base_model: tiny
resolution: 16
datasets: [{name: synthetic, n_identities: 3, identities: IDS}]
defenses: [none]
attacks: [{name: lora, steps: 1}]
metrics: [fdfr]
"""


def test_a_yaml_key_that_is_not_a_string_is_named(tmp_path, capsys):
    path = write_campaign(tmp_path, CAMPAIGN.replace("IDS", "all") + "defaults:\n  1: x\n")
    code = main(["run", str(path), "--store", str(tmp_path / "s")])
    one_line_error(capsys, code, "defaults", "key 1 is not a name")
    spec = tmp_path / "spec.yaml"
    spec.write_text("attack: {name: lora, true: 3}\n")
    code = main(["experiment", str(spec), "--store", str(tmp_path / "s")])
    one_line_error(capsys, code, "attack", "key True is not a name")


@pytest.mark.parametrize("first", [-1, 0, 1.5, "two"])
def test_identities_first_must_be_a_whole_number_of_at_least_one(tmp_path, first):
    from antipers.campaign import CampaignError, load_campaign

    path = write_campaign(tmp_path, CAMPAIGN.replace("IDS", f"{{first: {first}}}"))
    with pytest.raises(CampaignError, match="identities.first: expected a whole number >= 1"):
        load_campaign(path)
    path = write_campaign(tmp_path, CAMPAIGN.replace("IDS", "{first: 2}"))
    assert [s.identity for s in load_campaign(path).specs] == ["synth-0000", "synth-0001"]


@pytest.fixture
def bomb_limit(monkeypatch):
    """Pillow refuses images over twice MAX_IMAGE_PIXELS; lowered, a 64 px photo is one."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)


def test_a_decompression_bomb_is_a_named_problem_everywhere(faces, tmp_path, capsys, bomb_limit):
    root = tmp_path / "adb"
    for name in ("set_A", "set_B", "set_C"):
        write_png(faces.set_A, [root / "alice" / name / f"{i}.png" for i in range(4)])
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "decompression bomb" in out and "set_A/0.png" in out
    code = main(
        [
            "protect",
            str(root / "alice" / "set_A"),
            str(tmp_path / "out"),
            "--defense",
            "none",
            "--base-model",
            "tiny",
            "--resolution",
            "64",
        ]
    )
    one_line_error(capsys, code, "0.png", "3.png", "decompression bomb", lines=4)
    code = main(
        ["score", str(root / "alice" / "set_B"), "--references", str(root / "alice" / "set_A")]
    )
    one_line_error(capsys, code, "set_B/0.png", "decompression bomb", lines=4)


def test_data_check_lists_every_problem_of_a_folder(faces, tmp_path, capsys):
    root = tmp_path / "adb"
    for name in ("set_A", "set_B", "set_C"):
        write_png(faces.set_A, [root / "alice" / name / f"{i}.png" for i in range(4)])
    (root / "alice" / "set_A" / "0.png").write_bytes(b"not a png")
    (root / "alice" / "set_A" / "notes.txt").write_text("x")
    for i in range(3):
        (root / "alice" / "set_B" / f"{i}.png").unlink()
    assert main(["data", "check", str(root), "--min-photos", "2"]) == 1
    out = capsys.readouterr().out
    assert "3 problem(s)" in out, out
    assert "set_A/0.png: unreadable" in out and "notes.txt: not an image" in out
    assert "set_B: 1 usable photo(s), need at least 2" in out


def test_data_synth_refuses_bad_flags_and_a_missing_extra(tmp_path, capsys, monkeypatch):
    out = tmp_path / "synth"
    code = main(["data", "synth", "--identities", "1", "--out", str(out), "--resolution", "0"])
    one_line_error(capsys, code, "--resolution", "got 0")
    code = main(["data", "synth", "--identities", "1", "--out", str(out), "--nudge", "5"])
    one_line_error(capsys, code, "--nudge")
    import importlib.util

    from antipers.data import synthetic

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gan_face_generate" else real(name, *a),
    )
    synthetic.face_generator.cache_clear()
    try:
        code = main(["data", "synth", "--identities", "1", "--out", str(out)])
    finally:
        monkeypatch.undo()
        synthetic.face_generator.cache_clear()
    one_line_error(capsys, code, "pip install 'antipers[synth]'")
    assert not out.exists()  # checked before anything was written


def test_camera_mpo_photos_read_as_jpeg(faces, tmp_path):
    from antipers.cluster.client_options import Limits
    from antipers.cluster.uploads import decode_photo as _decode

    frames = [
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype("uint8"))
        for img in faces.set_A[:2]
    ]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="MPO", save_all=True, append_images=frames[1:], quality=95)
    data = buffer.getvalue()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    decoded = _decode("protected", 0, data, Limits(), 64)
    (tmp_path / "camera.jpg").write_bytes(data)
    read = read_image(tmp_path / "camera.jpg", 64)
    assert decoded.shape == read.shape == (1, 3, 64, 64)
    assert (decoded - faces.set_A[:1]).abs().mean() < 0.05  # the first frame


def test_save_to_never_replaces_a_folder_antipers_did_not_write(tmp_path):
    from antipers.defenses.model_folder import RECORD, SaveToError, check_save_to

    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"...")
    with pytest.raises(SaveToError, match="did not write"):
        check_save_to(precious)
    assert (precious / "holiday.jpg").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SaveToError, match="not a folder"):
        check_save_to(tmp_path / "file")
    ours = tmp_path / "model"
    ours.mkdir()
    (ours / RECORD).write_text("{}")
    check_save_to(ours)  # a folder antipers wrote may be replaced
    (tmp_path / "empty").mkdir()
    check_save_to(tmp_path / "empty")
    check_save_to(tmp_path / "new")


def test_apdm_refuses_a_foreign_save_to_before_training(tmp_path):
    from antipers.defenses.model_folder import SaveToError
    from antipers.models.tiny import TinyModel
    from antipers.registry import DEFENSES

    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"...")
    person = SyntheticDataset(n_identities=1).load("synth-0000", 16)
    bundle = TinyModel(seed=0).load(torch.device("cpu"))
    apdm = DEFENSES.build("apdm", {"save_to": str(precious)})
    with pytest.raises(SaveToError):
        apdm.protect(person, bundle, torch.Generator().manual_seed(0))
    assert sorted(p.name for p in precious.iterdir()) == ["holiday.jpg"]


MINIMAL = {"dataset": {"name": "synthetic"}, "attack": "lora", "base_model": "tiny"}


@pytest.mark.parametrize("bad", ["../up", "a/b", "..", "has space", ""])
def test_names_that_reach_paths_are_checked(tmp_path, bad):
    from antipers.search import SearchError, load_search
    from antipers.spec import ExperimentSpec

    base = {**MINIMAL, "identity": "synth-0000"}
    with pytest.raises(SpecError, match="suite"):
        ExperimentSpec.from_dict({**base, "suite": bad})
    path = tmp_path / "s.yaml"
    path.write_text(
        json.dumps(
            {
                "name": bad,
                "base": {"base_model": "tiny", "attack": "lora"},
                "datasets": [{"name": "synthetic"}],
                "space": {"attack.steps": [1, 2]},
            }
        )
    )
    with pytest.raises(SearchError, match="name"):
        load_search(path)


@pytest.mark.parametrize("bad", ["../../etc", "a/b", ".."])
def test_an_identity_cannot_climb_out_of_its_dataset(bad):
    from antipers.spec import ExperimentSpec

    with pytest.raises(SpecError, match="identity"):
        ExperimentSpec.from_dict({**MINIMAL, "identity": bad})
    ExperimentSpec.from_dict({**MINIMAL, "identity": "Alice Smith"})


def test_an_internal_error_keeps_its_traceback(monkeypatch, capsys):
    import antipers.cli as cli

    def broken(args):
        raise ValueError("a bug, not the user's mistake")

    monkeypatch.setattr(cli, "cmd_list", broken)
    assert main(["list"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "a bug" in err and "internal error" in err


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "nope.yaml")
    assert main(["experiment", missing, "--store", str(tmp_path / "s")]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["--debug", "experiment", missing, "--store", str(tmp_path / "s")]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("ANTIPERS_DEBUG", "1")
    assert main(["experiment", missing, "--store", str(tmp_path / "s")]) == 2
    assert "Traceback" in capsys.readouterr().err


def serve_config(tmp_path, args: dict) -> str:
    import yaml

    path = tmp_path / "serve.yaml"
    app = {"name": "scoring", "import_path": "antipers.cluster.scoring:app", "args": args}
    path.write_text(yaml.safe_dump({"applications": [app]}))
    return str(path)


@pytest.mark.parametrize(
    "args, needles",
    [
        ({"limits": {"max_imgs": 3}}, ["limits.max_imgs: unknown", "max_images"]),
        ({"limits": {"max_images": 0}}, ["limits.max_images", ">= 1"]),
        ({"batching": {"max_request": 3}}, ["batching.max_request: unknown"]),
        ({"base_modle": "tiny"}, ["args.base_modle: unknown"]),
        ({"base_model": "sd15"}, ["base model 'sd15'", "does not exist"]),
        ({"base_model": "nope"}, ["args.base_model", "nope"]),
        ({"evaluation_defaults": {"dataset": "x"}}, ["evaluation_defaults.dataset: unknown"]),
        ({"batching": {"max_requests": 0}}, ["batching.max_requests"]),
        ({"batching": [1]}, ["batching: expected a mapping"]),
    ],
)
def test_serve_refuses_a_bad_config_before_starting(tmp_path, capsys, monkeypatch, args, needles):
    monkeypatch.setenv("ANTIPERS_MODELS_DIR", str(tmp_path / "models"))
    code = main(["serve", "--config", serve_config(tmp_path, args), "--port", "1"])
    one_line_error(capsys, code, *needles)


def test_serve_names_a_busy_port(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--port", str(port)])
    one_line_error(capsys, code, f"--port {port}", "cannot listen")


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["models", "train-mini", "--out", "OUT", "--pool", "0"], ["--pool: expected >= 1, got 0"]),
        (
            ["models", "train-embedder", "--out", "OUT", "--people", "1"],
            ["--people: expected >= 2, got 1"],
        ),
        (["run", "CAMPAIGN", "--store", "OUT", "--gpus", "1.5"], ["a share above 1 must be whole"]),
        (["report", "--store", "nope://x", "--out", "OUT"], ["store nope://x: cannot be used"]),
        (["experiment", "BINARY", "--store", "OUT"], ["not a text file"]),
        (
            ["experiment", "SPEC", "--store", "OUT", "--set", "defense={1: 2}"],
            ["key 1 is not a name"],
        ),
    ],
)
def test_more_user_mistakes_get_one_line(tmp_path, capsys, argv, needles):
    campaign = write_campaign(tmp_path, CAMPAIGN.replace("IDS", "all"))
    binary = tmp_path / "spec.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    spec = tmp_path / "ok.yaml"
    spec.write_text("base_model: tiny\ndataset: synthetic\nidentity: synth-0000\nattack: lora\n")
    paths = {"OUT": tmp_path / "out", "CAMPAIGN": campaign, "BINARY": binary, "SPEC": spec}
    code = main([str(paths.get(a, a)) for a in argv])
    one_line_error(capsys, code, *needles)
