import math
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime

import pyarrow.parquet as pq
import pytest

from antipers.results import ResultStore
from antipers.rows import REQUIRED_COLUMNS
from tests.conftest import REPO


def make_rows(spec_id: str, n: int = 3, status: str = "ok") -> list[dict]:
    return [
        {
            "spec_id": spec_id,
            "suite": "t",
            "protocol": "adb-v1",
            "track": "image",
            "dataset": "synthetic",
            "identity": "synth-0000",
            "base_model": "tiny",
            "defense": "none",
            "defense_params": "{}",
            "countermeasure": "none",
            "countermeasure_params": "{}",
            "attack": "lora",
            "attack_params": "{}",
            "metric": "" if status == "error" else "fdfr",
            "value": float(i),
            "higher_is_better": True,
            "unit": "fraction",
            "backend": "b",
            "image_index": i,
            "seed": 0,
            "subject": "protected",
            "status": status,
            "error": "boom" if status == "error" else None,
            "started_at": datetime.now(UTC),
            "duration_s": 1.0,
            "worker": "host:1",
            "antipers_version": "0",
            "schema_version": 1,
            "spec_json": "{}",
        }
        for i in range(n)
    ]


def test_write_load_round_trip(tmp_path):
    store = ResultStore(str(tmp_path / "store"))
    store.write(make_rows("a"))
    store.write(make_rows("b", 2))
    assert store.finished_ids() == {"a", "b"}
    df = store.load()
    assert len(df) == 5 and set(REQUIRED_COLUMNS) <= set(df.columns)
    assert list(store.load(["b"])["value"]) == [0.0, 1.0]


def test_pyarrow_fs_uri(tmp_path):
    store = ResultStore(f"file://{tmp_path}/uri-store")
    store.write(make_rows("c"))
    assert (tmp_path / "uri-store" / "c.parquet").is_file()
    assert ResultStore(str(tmp_path / "uri-store")).finished_ids() == {"c"}


def test_error_rows_kept_and_retried(tmp_path):
    store = ResultStore(str(tmp_path))
    store.write(make_rows("x", 1, status="error"))
    assert store.finished_ids() == set() and store.failed_ids() == {"x"}
    assert store.load()["error"].tolist() == ["boom"]
    store.write(make_rows("x", 2))
    assert store.finished_ids() == {"x"} and store.failed_ids() == set()
    assert not (tmp_path / "x.error.parquet").exists()


def test_rows_missing_a_column_are_refused(tmp_path):
    rows = make_rows("y", 1)
    del rows[0]["backend"]
    with pytest.raises(ValueError, match="backend"):
        ResultStore(str(tmp_path)).write(rows)


WRITER = textwrap.dedent(
    """
    import sys
    from tests.test_results import make_rows
    from antipers.results import ResultStore
    rows = make_rows("killed", 400_000)
    print("writing", flush=True)
    ResultStore(sys.argv[1]).write(rows)
    """
)


def test_writer_killed_mid_write_leaves_nothing_loadable(tmp_path):
    root = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"
    deadline = time.time() + 120
    while time.time() < deadline and not list(root.glob(".tmp-*")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = list(root.glob(".tmp-*"))
    assert leftovers, "the writer was not caught mid-write"
    store = ResultStore(str(root))
    assert store.finished_ids() == set()
    assert store.load().empty
    assert not [p for p in root.iterdir() if p.suffix == ".parquet"]  # nothing visible
    assert store.sweep_temporary(older_than_s=0) == len(leftovers)
    assert not list(root.iterdir())


def test_written_file_is_plain_parquet(tmp_path):
    path = ResultStore(str(tmp_path)).write(make_rows("p", 2))
    table = pq.read_table(path)
    assert table.num_rows == 2 and math.isclose(table["value"][1].as_py(), 1.0)


def test_failed_forced_rerun_is_not_hidden_by_an_older_ok_result(tmp_path):
    store = ResultStore(str(tmp_path))
    store.write(make_rows("f", 2))
    time.sleep(0.01)
    rows = make_rows("f", 1, status="error")
    for r in rows:
        assert r["metric"] == ""  # an experiment-level failure
    store.write(rows)
    assert store.failed_ids() == {"f"} and store.finished_ids() == set()
    assert store.load()["status"].tolist() == ["error"]
    assert (tmp_path / "f.parquet").exists()  # the older ok result is kept on disk


def test_a_metric_error_does_not_fail_the_experiment(tmp_path):
    store = ResultStore(str(tmp_path))
    rows = make_rows("m", 2)
    rows[1]["status"], rows[1]["error"] = "error", "ValueError: no face"
    store.write(rows)
    assert store.finished_ids() == {"m"}


def test_a_store_written_before_the_subject_column_still_loads(tmp_path):
    """Schema version 2 files (no ``subject``) load beside new ones, as null."""
    from antipers.rows import rows_to_table

    store = ResultStore(str(tmp_path))
    store.write(make_rows("new"))
    old = rows_to_table(make_rows("old")).drop_columns(["subject"])
    pq.write_table(old, tmp_path / "old.parquet")
    rows = store.load()
    assert set(rows["spec_id"]) == {"new", "old"}
    assert rows.loc[rows["spec_id"] == "old", "subject"].isna().all()
    assert (rows.loc[rows["spec_id"] == "new", "subject"] == "protected").all()
