import pandas as pd
import pytest

from antipers.cli import main
from antipers.data.synthetic import SyntheticDataset
from antipers.images import quantize, write_png
from antipers.rows import REQUIRED_COLUMNS


@pytest.fixture
def folders(tmp_path):
    ds = SyntheticDataset(n_identities=2, photos_per_set=2)
    me, other = ds.load("synth-0000", 128), ds.load("synth-0001", 128)
    paths = {}
    for name, images in [
        ("refs", me.set_A),
        ("gen", me.set_B),
        ("clean", me.set_C),
        ("protected", quantize((me.set_C + 3 / 255).clamp(0, 1))),
    ]:
        write_png(images, [tmp_path / name / f"{i}.png" for i in range(len(images))])
        paths[name] = tmp_path / name
    for person in (me, other):
        write_png(
            person.set_A, [tmp_path / "gallery" / person.identity / f"{i}.png" for i in range(2)]
        )
    paths["gallery"] = tmp_path / "gallery"
    return paths


def test_score_end_to_end(folders, tmp_path, capsys):
    out = tmp_path / "rows.parquet"
    code = main(
        [
            "score",
            str(folders["gen"]),
            "--references",
            str(folders["refs"]),
            "--metrics",
            "fdfr,ism,linkability,linf,psnr,brisque",
            "--identity",
            "synth-0000",
            "--gallery",
            str(folders["gallery"]),
            "--protected",
            str(folders["protected"]),
            "--clean",
            str(folders["clean"]),
            "--resolution",
            "128",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "ism" in printed and "linkability" in printed
    df = pd.read_parquet(out)
    assert set(REQUIRED_COLUMNS) <= set(df.columns) and (df["suite"] == "score").all()
    agg = df[df["image_index"] == -1].set_index("metric")["value"]
    assert agg["fdfr"] == 0.0 and agg["ism"] > 0.9
    assert agg["linkability"] == 1.0
    assert agg["linf"] == 3.0
    assert not list(tmp_path.glob(".rows.parquet*"))


def test_score_marks_unavailable_metrics(folders, capsys):
    assert (
        main(
            [
                "score",
                str(folders["gen"]),
                "--references",
                str(folders["refs"]),
                "--metrics",
                "ssim",
                "--resolution",
                "128",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "unavailable" in captured.out and "protected with clean" in captured.err


@pytest.mark.parametrize(
    "setup,args,message",
    [
        (lambda p: (p / "empty").mkdir(), ["{empty}"], "no images in the generated folder"),
        (
            lambda p: (p / "gen" / "readme.txt").write_text("x"),
            ["{gen}"],
            "readme.txt: not an image",
        ),
        (lambda p: None, ["{gen}", "--metrics", "fdfr,ims"], "unknown metric 'ims'"),
        (lambda p: None, ["{nowhere}"], "generated folder does not exist"),
        (
            lambda p: None,
            ["{gen}", "--protected", "{protected}"],
            "--protected and --clean go together",
        ),
    ],
)
def test_score_bad_inputs(folders, tmp_path, capsys, setup, args, message):
    setup(tmp_path)
    names = {
        **{k: str(v) for k, v in folders.items()},
        "empty": str(tmp_path / "empty"),
        "nowhere": str(tmp_path / "nowhere"),
    }
    argv = ["score", *[a.format(**names) for a in args], "--references", str(folders["refs"])]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_score_identity_must_be_in_the_gallery(folders, capsys):
    code = main(
        [
            "score",
            str(folders["gen"]),
            "--references",
            str(folders["refs"]),
            "--metrics",
            "linkability",
            "--gallery",
            str(folders["gallery"]),
            "--resolution",
            "128",
        ]
    )
    assert code == 2
    assert "--identity 'refs' is not in the gallery" in capsys.readouterr().err


def test_cli_bad_yaml_value_is_a_clear_error(capsys):
    from tests.conftest import REPO

    code = main(
        [
            "experiment",
            str(REPO / "campaigns" / "example.yaml"),
            "--store",
            "/tmp/x",
            "--set",
            "defense.eot=[jpeg",
        ]
    )
    assert code == 2 and "cannot parse the value" in capsys.readouterr().err
