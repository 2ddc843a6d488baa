"""What a finished experiment leaves behind: its rows (and thumbnails) in the store, and
its count in the campaign's report. Only the driver calls this, so only the driver
writes the store."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from antipers.results import ResultStore
from antipers.rows import failed


@dataclass
class CampaignReport:
    total: int
    skipped: int = 0
    ok: int = 0
    failed: int = 0
    resubmitted: int = 0
    seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)  # spec_id -> first line
    # stage executions begun by the workers at the end (a restarted one: since its restart)
    executions: dict[str, int] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.skipped + self.ok + self.failed == self.total

    def summary(self) -> str:
        return (
            f"{self.total} experiments: {self.skipped} already stored, {self.ok} ran, "
            f"{self.failed} failed, {self.resubmitted} resubmitted after a worker died "
            f"({self.seconds:.0f} s)"
            + (
                "; stage executions: " + ", ".join(f"{k} {v}" for k, v in self.executions.items())
                if self.executions
                else ""
            )
        )


def record(
    store: ResultStore,
    report: CampaignReport,
    rows: list[dict[str, Any]],
    images: Mapping[str, list[bytes]] | None = None,
) -> None:
    """Store one experiment and count it. It failed only with an experiment-level error
    row (no metric), the rule by which the store retries it: a metric that could not
    score, or a component unavailable here, still counts as run."""
    store.write(rows, images=images)
    if failed(rows):
        first = rows[0]
        report.failed += 1
        report.failures[first["spec_id"]] = first["error"].splitlines()[0]
    else:
        report.ok += 1
