"""The campaign's progress bar: on stderr, so that stdout stays the command's output,
counting from the experiments already stored."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

from antipers.cluster.outcomes import CampaignReport


class Progress:
    """One tick per stored experiment; the postfix shows how many ran and failed."""

    def __init__(
        self, report: CampaignReport, description: str, enabled: bool, file: TextIO | None = None
    ) -> None:
        self.report = report
        self.bar = tqdm(
            total=report.total,
            initial=report.skipped,
            desc=description,
            unit="exp",
            disable=not enabled,
            file=file or sys.stderr,
            dynamic_ncols=True,
        )

    def advance(self) -> None:
        self.bar.update(1)
        self.bar.set_postfix(ok=self.report.ok, failed=self.report.failed, refresh=False)

    def close(self) -> None:
        self.bar.close()
