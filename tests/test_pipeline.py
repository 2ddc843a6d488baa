import math

import pandas as pd
import pytest
import torch

from antipers.cli import main
from antipers.pipeline import RunContext, run_and_store, run_experiment
from antipers.results import ResultStore
from antipers.rows import REQUIRED_COLUMNS
from antipers.spec import ExperimentSpec
from tests.conftest import REPO, tiny_spec_dict


@pytest.fixture(scope="module")
def context():
    return RunContext(device=torch.device("cpu"))


def test_end_to_end_rows_carry_every_required_column(context, tmp_path):
    spec = ExperimentSpec.from_dict(tiny_spec_dict())
    rows = run_experiment(spec, context, raise_errors=True)
    df = pd.DataFrame(rows)
    assert set(REQUIRED_COLUMNS) <= set(df.columns)
    assert (df["status"] == "ok").all() and (df["spec_id"] == spec.spec_id).all()
    assert set(df["metric"]) == {"fdfr", "ism", "ism:references_without_face"}
    n_images = 2  # two prompts x one image
    for metric in ("fdfr", "ism"):
        part = df[df["metric"] == metric]
        assert sorted(part["image_index"]) == [-1, *range(n_images)]
    fdfr = df[df["metric"] == "fdfr"].set_index("image_index")["value"]
    assert math.isclose(fdfr[-1], fdfr.drop(-1).mean())
    assert ExperimentSpec.from_json(df["spec_json"][0]) == spec
    ResultStore(str(tmp_path)).write(rows)
    assert ResultStore(str(tmp_path)).load().shape[0] == len(rows)


def test_resident_base_model_is_not_modified_by_the_attack(context):
    spec = ExperimentSpec.from_dict(tiny_spec_dict())
    bundle = context.base_model(spec.base_model)
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    run_experiment(spec.override({"seed": 1}), context, raise_errors=True)
    assert context.base_model(spec.base_model) is bundle
    after = bundle.unet.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_same_spec_same_rows(context):
    spec = ExperimentSpec.from_dict(tiny_spec_dict())
    a = pd.DataFrame(run_experiment(spec, context))
    b = pd.DataFrame(run_experiment(spec, context))
    pd.testing.assert_series_equal(a["value"], b["value"])


def test_failure_is_an_error_row_not_a_lost_experiment(context, tmp_path):
    spec = ExperimentSpec.from_dict(tiny_spec_dict(identity="synth-0042"))
    rows = run_experiment(spec, context)
    assert len(rows) == 1 and rows[0]["status"] == "error"
    assert "no identity 'synth-0042'" in rows[0]["error"]
    store = ResultStore(str(tmp_path))
    store.write(rows)
    assert spec.spec_id in store.failed_ids()


def test_rerun_skips_finished_spec_ids(context, tmp_path):
    store = ResultStore(str(tmp_path))
    spec = ExperimentSpec.from_dict(tiny_spec_dict())
    rows, ran = run_and_store(spec, store, context)
    assert ran
    path = tmp_path / f"{spec.spec_id}.parquet"
    mtime = path.stat().st_mtime_ns
    again, ran_again = run_and_store(spec, store, context)
    assert not ran_again and len(again) == len(rows)
    assert path.stat().st_mtime_ns == mtime


def test_an_experiment_stores_its_thumbnails_once_and_none_when_asked(context, tmp_path):
    from antipers.samples import decode

    defense = {"name": "aspl", "iterations": 1, "prior_weight": 0, "eps": 8, "step_size": 2}
    spec = ExperimentSpec.from_dict(tiny_spec_dict(defense=defense))
    store = ResultStore(str(tmp_path / "with"))
    run_and_store(spec, store, context)
    samples = store.read_images(spec.spec_id)
    assert {k: len(v) for k, v in samples.items()} == {"clean": 2, "protected": 2, "generated": 2}
    clean, protected = decode(samples["clean"][0]), decode(samples["protected"][0])
    identity = context.identity(spec).set_B[0]
    published = (identity * 255).round().permute(1, 2, 0).numpy()
    assert clean.shape == (64, 64, 3) and (clean == published).all()
    assert 0 < abs(protected.astype(int) - clean).max() <= 8  # the defense's photo, in budget
    run_and_store(spec, store, context, force=True)  # a rerun replaces, never adds
    assert [p.name for p in sorted((tmp_path / "with").iterdir())] == [
        f"{spec.spec_id}.images.parquet",
        f"{spec.spec_id}.parquet",
    ]
    bare = ResultStore(str(tmp_path / "without"))
    run_and_store(spec, bare, context, images=False)
    assert bare.finished_ids() == {spec.spec_id} and bare.image_ids() == set()


def test_cli_experiment_runs_and_prints_table(tmp_path, capsys):
    code = main(
        [
            "experiment",
            str(REPO / "campaigns" / "example.yaml"),
            "--store",
            str(tmp_path),
            "--set",
            "attack.steps=2",
            "--set",
            "sampling.steps=2",
            "--set",
            "resolution=64",
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "fdfr" in out and "ism" in out and "offline-retinaface-dlib" in out
    assert len(ResultStore(str(tmp_path)).finished_ids()) == 1


def test_cli_reports_bad_spec_clearly(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "base_model: tiny\ndataset: synthetic\nidentity: x\nattack: {name: lora, stesp: 3}\n"
    )
    assert main(["experiment", str(bad), "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "'stesp'" in err and "steps: int" in err


def test_cli_list_shows_parameters_and_defaults(capsys):
    assert main(["list", "attacks"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "steps: int = 1000" in out and "lr: float = 0.0001" in out
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for kind in ("base-models", "defenses", "attacks", "countermeasures", "metrics"):
        assert f"{kind}:" in out
    assert "sd21-arch" in out and "synthetic" in out
