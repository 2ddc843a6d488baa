"""``antipers score``: score any folder of generated images against reference photos.

The images may come from antipers or from anywhere else; they are read, centre-cropped
and resized to one resolution, and scored by the same metric code the experiments use.
Rows have the store's schema (``suite="score"``), so they load with everything else.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from antipers.data.folders import AntiDreamBoothFolders, is_antidreambooth_layout, list_photos
from antipers.data.identity import DatasetError
from antipers.errors import UserError
from antipers.images import read_images
from antipers.metrics.base import ScoreInputs, evaluate
from antipers.registry import METRICS
from antipers.rows import metric_rows, rows_to_table, unspecified_row
from antipers.spec import ComponentSpec, canonical_json


class ScoreError(UserError, ValueError):
    """Bad input to ``score``; the message names the folder, file or metric."""


def photos_in(folder: Path, what: str) -> list[Path]:
    try:
        return list_photos(folder, what)
    except DatasetError as exc:
        raise ScoreError(str(exc)) from None


def parse_metrics(names: list[str], backend: str | None) -> list[ComponentSpec]:
    if not names:
        raise ScoreError("--metrics: name at least one metric")
    specs = []
    for name in names:
        value: Any = name
        if backend is not None and name in METRICS:
            accepted = {p.name for p in METRICS.params(name)}
            value = {"name": name, "backend": backend} if "backend" in accepted else name
        try:
            specs.append(ComponentSpec.parse(value, METRICS, "--metrics"))
        except ValueError as exc:
            raise ScoreError(str(exc)) from None
    return specs


@dataclass
class ScoreJob:
    generated: Path
    references: Path
    metrics: list[ComponentSpec]
    resolution: int = 512
    identity: str = ""
    gallery: Path | None = None
    protected: Path | None = None
    clean: Path | None = None

    def spec_json(self) -> str:
        return canonical_json(
            {
                "score": {
                    "generated": str(self.generated),
                    "references": str(self.references),
                    "metrics": [m.to_dict() for m in self.metrics],
                    "resolution": self.resolution,
                    "identity": self.identity,
                    "gallery": str(self.gallery or ""),
                    "protected": str(self.protected or ""),
                    "clean": str(self.clean or ""),
                }
            }
        )

    def inputs(self) -> ScoreInputs:
        size = self.resolution
        identity = self.identity or self.references.name
        gallery = None
        if self.gallery is not None:
            if not self.gallery.is_dir():
                raise ScoreError(f"{self.gallery}: gallery folder does not exist")
            people = sorted(p for p in self.gallery.iterdir() if p.is_dir())
            if not people:
                raise ScoreError(f"{self.gallery}: no identity folders in the gallery")
            if is_antidreambooth_layout(self.gallery):  # use each identity's clean set_A
                layout = AntiDreamBoothFolders(str(self.gallery))
                gallery = {p.name: layout.load(p.name, size).set_A for p in people}
            else:
                gallery = {p.name: read_images(photos_in(p, "gallery"), size) for p in people}
            if identity not in gallery:
                raise ScoreError(
                    f"--identity {identity!r} is not in the gallery {self.gallery} "
                    f"(it has {', '.join(sorted(gallery))}); name the person with --identity"
                )
        protected = clean = None
        if (self.protected is None) != (self.clean is None):
            raise ScoreError("--protected and --clean go together")
        if self.protected is not None and self.clean is not None:
            protected = read_images(photos_in(self.protected, "protected"), size)
            clean = read_images(photos_in(self.clean, "clean"), size)
            if protected.shape != clean.shape:
                raise ScoreError(
                    f"--protected has {len(protected)} photos and --clean {len(clean)}: "
                    "they must pair up"
                )
        return ScoreInputs(
            generated=read_images(photos_in(self.generated, "generated"), size),
            references=read_images(photos_in(self.references, "references"), size),
            identity=identity,
            protected=protected,
            clean=clean,
            gallery=gallery,
        )


def run_score(job: ScoreJob) -> list[dict[str, Any]]:
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    try:
        inputs = job.inputs()
    except DatasetError as exc:
        raise ScoreError(str(exc)) from None
    results = [evaluate(m.build(METRICS), inputs) for m in job.metrics]
    spec_json = job.spec_json()
    base = unspecified_row(
        started,
        spec_id=hashlib.sha256(spec_json.encode()).hexdigest()[:16],
        suite="score",
        dataset=str(job.references.parent),
        identity=inputs.identity,
        spec_json=spec_json,
        worker=f"{socket.gethostname()}:{os.getpid()}",
    )
    return metric_rows(base, results, time.perf_counter() - t0)


def write_rows(rows: list[dict[str, Any]], path: Path) -> Path:
    """One Parquet file, written under a temporary name and renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    try:
        pq.write_table(rows_to_table(rows), tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
