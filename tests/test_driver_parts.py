"""The campaign driver's parts, each without a Ray instance: the retry policy on each
kind of failure, storing and counting outcomes in a real store, the progress bar,
balancing over pools of plain objects, and the end-of-campaign totals."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError, WorkerCrashedError

from antipers.cluster.outcomes import CampaignReport, record
from antipers.cluster.progress import Progress
from antipers.cluster.retry import failed_rows, message, resubmit
from antipers.cluster.runtime import ClusterError
from antipers.cluster.submission import Dispatcher
from antipers.cluster.teardown import stage_totals
from antipers.cluster.workers import Pool
from antipers.errors import ComponentUnavailable
from antipers.results import ResultStore
from antipers.rows import error_rows
from antipers.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict

STARTED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture(scope="module")
def spec() -> ExperimentSpec:
    return ExperimentSpec.from_dict(tiny_spec_dict())


def raised_in_stage(cause: BaseException, stage: str = "attack") -> RayTaskError:
    """What the driver gets from ``ray.get`` when a stage raised ``cause``."""
    return RayTaskError(stage, "Traceback: in the worker", cause, ip="x").as_instanceof_cause()


# --- the retry policy


def test_an_experiment_that_raised_is_stored_as_an_error_not_resubmitted(spec):
    exc = raised_in_stage(ValueError("eps too small"))
    assert resubmit(exc, attempt=0, retries=2) is False
    (row,) = failed_rows(spec, STARTED, exc, 1.5)
    assert (row["status"], row["metric"], row["worker"]) == ("error", "", "driver")
    assert row["error"].startswith("ValueError: eps too small\nTraceback: in the worker")
    assert (row["spec_id"], row["started_at"], row["duration_s"]) == (spec.spec_id, STARTED, 1.5)


@pytest.mark.parametrize(
    "exc",
    [ActorDiedError(), WorkerCrashedError(), raised_in_stage(ActorDiedError(), "score")],
    ids=["dead worker", "crashed worker", "chained after a dead worker"],
)
def test_machinery_failures_are_resubmitted_while_attempts_remain(exc):
    assert resubmit(exc, attempt=0, retries=2) and resubmit(exc, attempt=1, retries=2)
    assert not resubmit(exc, attempt=2, retries=2)
    assert not resubmit(exc, attempt=0, retries=0)


@pytest.mark.parametrize("wrapper", [None, "as Ray raises it", "plain"])
def test_a_worker_that_cannot_start_stops_the_campaign(wrapper):
    exc: BaseException = RayActorError(error_msg="device string: tpu", actor_init_failed=True)
    if wrapper == "plain":
        exc = RayTaskError("protect", "Traceback", exc, ip="x")
    elif wrapper:
        exc = raised_in_stage(exc, "protect")
    with pytest.raises(ClusterError, match="a worker could not start.*device string: tpu"):
        resubmit(exc, attempt=0, retries=2)


@pytest.mark.parametrize("as_cause", [True, False], ids=["as Ray raises it", "plain wrapper"])
def test_an_unavailable_component_is_stored_with_its_reason(spec, as_cause):
    cause = ComponentUnavailable("no upscaler folder at /nowhere")
    exc = (
        raised_in_stage(cause, "score")
        if as_cause
        else RayTaskError("score", "Traceback", cause, ip="x")
    )
    assert not resubmit(exc, attempt=0, retries=2)
    (row,) = failed_rows(spec, STARTED, exc, 0.0)
    assert (row["status"], row["error"]) == ("unavailable", "no upscaler folder at /nowhere")


def test_messages_lose_the_terminal_colours_ray_adds():
    exc = RayTaskError("attack", "\x1b[31mTraceback\x1b[0m", KeyError("x"), ip="x")
    assert message(exc) == "KeyError: 'x'\nTraceback"
    assert message(OSError("disk full")) == "OSError: disk full"


# --- storing and counting outcomes


def scored_rows(spec: ExperimentSpec, status: str = "ok") -> list[dict[str, Any]]:
    """An experiment that ran: one metric's aggregate row, ``status`` being the metric's."""
    (row,) = error_rows(spec, STARTED, "", 1.0, "worker")
    metric = {"metric": "psnr", "value": 31.0, "higher_is_better": True, "unit": "dB"}
    return [{**row, **metric, "status": status, "error": None if status == "ok" else "no face"}]


def test_a_finished_experiment_is_stored_with_its_thumbnails_and_counted_ok(tmp_path, spec):
    store = ResultStore(str(tmp_path))
    report = CampaignReport(total=2, skipped=1)
    thumbnails = {"generated": [b"png-0", b"png-1"]}
    record(store, report, scored_rows(spec), thumbnails)
    assert (report.ok, report.failed, report.failures) == (1, 0, {})
    assert report.finished
    assert store.finished_ids() == {spec.spec_id}
    assert store.read_images(spec.spec_id) == thumbnails
    record(store, report, scored_rows(spec), None)  # --images none: rows alone
    assert store.image_ids() == set()


def test_a_failed_experiment_is_stored_for_retry_and_counted_with_its_first_line(tmp_path, spec):
    store = ResultStore(str(tmp_path))
    report = CampaignReport(total=1)
    rows = error_rows(spec, STARTED, "ValueError: mix.k=9\nTraceback ...", 2.0, "driver")
    record(store, report, rows)
    assert (report.ok, report.failed) == (0, 1)
    assert report.failures == {spec.spec_id: "ValueError: mix.k=9"}
    assert store.failed_ids() == {spec.spec_id} and store.finished_ids() == set()


@pytest.mark.parametrize("kind", ["metric error", "unavailable"])
def test_what_the_store_does_not_retry_counts_as_run(tmp_path, spec, kind):
    store = ResultStore(str(tmp_path))
    report = CampaignReport(total=1)
    if kind == "metric error":  # one metric could not score; the experiment ran
        rows = scored_rows(spec, status="error")
    else:
        rows = failed_rows(spec, STARTED, ComponentUnavailable("no weights"), 0.0)
    record(store, report, rows)
    assert (report.ok, report.failed, report.failures) == (1, 0, {})
    assert store.finished_ids() == {spec.spec_id}


# --- progress


def test_the_progress_bar_counts_from_what_was_stored_and_shows_the_tally():
    report = CampaignReport(total=4, skipped=1)
    out = io.StringIO()
    bar = Progress(report, "grid", enabled=True, file=out)
    report.ok, report.failed = 1, 1
    bar.advance()
    bar.advance()
    bar.close()
    assert bar.bar.n == 3
    last = out.getvalue().rsplit("\r", 1)[-1]
    assert "grid" in last and "3/4" in last and "failed=1, ok=1" in last


def test_a_disabled_progress_bar_writes_nothing():
    out = io.StringIO()
    bar = Progress(CampaignReport(total=2), "grid", enabled=False, file=out)
    bar.advance()
    bar.close()
    assert out.getvalue() == ""


# --- submission and balancing


class FakeActor:
    """Records each stage call; a call's "reference" names the actor, stage and args."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[Any, ...]] = []
        for stage in ("protect", "attack", "score"):
            setattr(self, stage, _Method(self, stage))


class _Method:
    def __init__(self, actor: FakeActor, stage: str) -> None:
        self.actor, self.stage = actor, stage

    def remote(self, *args: Any) -> tuple[Any, ...]:
        ref = (self.actor.name, self.stage, *args)
        self.actor.calls.append(ref)
        return ref


def fake_pools(counts: dict[str, int]) -> dict[str, Pool]:
    return {
        role: Pool(role, [FakeActor(f"{role}{i}") for i in range(n)], [0] * n)
        for role, n in counts.items()
    }


def test_each_stage_goes_to_the_least_loaded_actor_and_chains_on_the_previous():
    pools = fake_pools({"defense": 2, "attack": 2, "scoring": 1})
    flight = Dispatcher(pools)
    refs = [flight.submit(name) for name in ("a", "b", "c")]
    assert [pools[r].load for r in ("defense", "attack", "scoring")] == [[2, 1], [2, 1], [3]]
    # a's chain: protect on defense0, attack on attack0 given that handoff, then score
    protect = ("defense0", "protect", "a")
    attack = ("attack0", "attack", "a", protect)
    assert refs[0] == ("scoring0", "score", "a", attack)
    assert pools["attack"].actors[1].calls == [
        ("attack1", "attack", "b", ("defense1", "protect", "b"))
    ]
    assert set(flight.pending) == set(refs)
    assert flight.pending[refs[1]].lanes == {"defense": 1, "attack": 1, "scoring": 0}


def test_a_finished_experiment_frees_its_lanes_for_the_next():
    pools = fake_pools({"defense": 2, "attack": 2, "scoring": 1})
    flight = Dispatcher(pools)
    first, second, _ = (flight.submit(name) for name in ("a", "b", "c"))
    job = flight.release(second)  # lane 1 is free: [2, 0]
    assert (job.spec, job.attempt) == ("b", 0)
    assert pools["defense"].load == [2, 0] and pools["scoring"].load == [2]
    again = flight.submit("b", attempt=1)
    assert flight.pending[again].lanes["defense"] == 1 and flight.pending[again].attempt == 1
    flight.release(first)
    assert pools["defense"].load == [1, 1] and first not in flight.pending
    assert len(flight.pending) == 2


# --- the end of a campaign


def test_each_role_counts_only_its_own_stage():
    def info(**started: int) -> dict[str, Any]:
        return {"started": {"protect": 0, "attack": 0, "score": 0, **started}}

    answers = [
        ("defense", info(protect=3, attack=7)),  # a defense worker's attacks are not counted
        ("defense", info(protect=2)),
        ("attack", info(attack=4)),
        ("scoring", info(score=5, protect=1)),
    ]
    assert stage_totals(answers) == {"protect": 5, "attack": 4, "score": 5}
    assert stage_totals([]) == {}
