"""The Parquet store of result rows (what a row is: ``antipers.rows``).

A store is a folder (local path or any ``pyarrow.fs`` URI such as
``s3://bucket/prefix``) with one Parquet file per finished experiment, written under a
temporary name and renamed, so a killed writer leaves nothing that loads. Beside it,
``<spec_id>.images.parquet`` holds the experiment's sample thumbnails (PNG bytes,
``antipers.samples``), written the same way and before the rows, so a stored experiment
has its images and a rerun replaces them rather than adding more.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from antipers.errors import UserError
from antipers.names import check_name
from antipers.rows import ERROR, OK, SCHEMA, failed, rows_to_table

IMAGES_SUFFIX = ".images.parquet"
IMAGES_SCHEMA = pa.schema([("kind", pa.string()), ("index", pa.int32()), ("png", pa.binary())])


class StoreError(UserError, OSError):
    """A store URI or folder that cannot be opened; the message names it."""


@dataclass
class ResultStore:
    """One Parquet file per experiment: ``<spec_id>.parquet`` (ok) or
    ``<spec_id>.error.parquet`` (failed: retried by the next run)."""

    uri: str

    def __post_init__(self) -> None:
        try:
            if "://" in self.uri:
                self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
            else:
                self.fs = pafs.LocalFileSystem()
                self.root = str(Path(self.uri).expanduser().absolute())
            self.root = self.root.rstrip("/")
            self.fs.create_dir(self.root, recursive=True)
        except (OSError, ValueError) as exc:  # pyarrow: an unknown scheme is ArrowInvalid
            raise StoreError(f"store {self.uri}: cannot be used ({exc})") from None

    def _path(self, spec_id: str, status: str) -> str:
        suffix = ".parquet" if status == OK else ".error.parquet"
        return f"{self.root}/{spec_id}{suffix}"

    def write(
        self, rows: list[dict[str, Any]], images: Mapping[str, list[bytes]] | None = None
    ) -> str:
        """Atomically store one experiment's rows (and first its sample thumbnails, kind
        -> PNG bytes); returns the rows' final path."""
        if not rows:
            raise ValueError("no rows to write")
        spec_ids = {r["spec_id"] for r in rows}
        if len(spec_ids) != 1:
            raise ValueError(f"one experiment per file, got spec_ids {sorted(spec_ids)}")
        spec_id = spec_ids.pop()
        status = ERROR if failed(rows) else OK
        table = rows_to_table(rows)
        check_name(spec_id, "spec_id")
        if not images:  # a rerun without thumbnails: none from an earlier run stay behind
            self._delete(f"{self.root}/{spec_id}{IMAGES_SUFFIX}")
        else:
            records = [
                {"kind": kind, "index": i, "png": png}
                for kind, pngs in images.items()
                for i, png in enumerate(pngs)
            ]
            self._put(f"{self.root}/{spec_id}{IMAGES_SUFFIX}", spec_id, records, IMAGES_SCHEMA)
        final = self._path(spec_id, status)
        self._put(final, spec_id, table)
        if status == OK:
            self._delete(self._path(spec_id, ERROR))
        return final

    def _put(
        self, final: str, spec_id: str, data: pa.Table | list[dict], schema: pa.Schema = SCHEMA
    ) -> None:
        """Write under a temporary name, then rename: nothing half-written survives."""
        table = data if isinstance(data, pa.Table) else pa.Table.from_pylist(data, schema=schema)
        tmp = f"{self.root}/.tmp-{spec_id}-{uuid.uuid4().hex}.part"
        try:
            with self.fs.open_output_stream(tmp) as sink:
                pq.write_table(table, sink, row_group_size=65536)
            self.fs.move(tmp, final)
        except BaseException:
            self._delete(tmp)
            raise

    def _delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.delete_file(path)

    def _files(self) -> list[pafs.FileInfo]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return [
            i
            for i in infos
            if i.type == pafs.FileType.File
            and i.base_name.endswith(".parquet")
            and not i.base_name.endswith(IMAGES_SUFFIX)
            and not i.base_name.startswith(".")
        ]

    def _latest(self) -> dict[str, pafs.FileInfo]:
        """Per spec_id its newest file: after a forced rerun fails, the error shows
        rather than the older ok result (which stays on disk)."""
        latest: dict[str, pafs.FileInfo] = {}
        for info in self._files():
            sid = info.base_name.removesuffix(".parquet").removesuffix(".error")
            seen = latest.get(sid)
            if seen is None or (info.mtime_ns or 0) > (seen.mtime_ns or 0):
                latest[sid] = info
        return latest

    def finished_ids(self) -> set[str]:
        """spec_ids whose newest result is ok: a rerun skips these."""
        return {
            sid
            for sid, info in self._latest().items()
            if not info.base_name.endswith(".error.parquet")
        }

    def failed_ids(self) -> set[str]:
        return set(self._latest()) - self.finished_ids()

    def load(self, spec_ids: Iterable[str] | None = None) -> pd.DataFrame:
        """The newest rows of every stored experiment (or of ``spec_ids``) as one DataFrame."""
        wanted = set(spec_ids) if spec_ids is not None else None
        paths = [
            info.path for sid, info in self._latest().items() if wanted is None or sid in wanted
        ]
        if not paths:
            return SCHEMA.empty_table().to_pandas()
        return pads.dataset(sorted(paths), schema=SCHEMA, filesystem=self.fs).to_table().to_pandas()

    def image_ids(self) -> set[str]:
        """spec_ids that have sample thumbnails."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return {
            i.base_name.removesuffix(IMAGES_SUFFIX)
            for i in infos
            if i.type == pafs.FileType.File and i.base_name.endswith(IMAGES_SUFFIX)
        }

    def read_images(self, spec_id: str) -> dict[str, list[bytes]]:
        """An experiment's thumbnails, kind -> PNG bytes in order; empty when it has none."""
        check_name(spec_id, "spec_id")
        path = f"{self.root}/{spec_id}{IMAGES_SUFFIX}"
        try:
            with self.fs.open_input_file(path) as source:
                table = pq.read_table(source, schema=IMAGES_SCHEMA)
        except FileNotFoundError:
            return {}
        out: dict[str, list[bytes]] = {}
        for record in sorted(table.to_pylist(), key=lambda r: (r["kind"], r["index"])):
            out.setdefault(record["kind"], []).append(record["png"])
        return out

    def sweep_temporary(self, older_than_s: float = 3600.0) -> int:
        """Remove temporary files that a killed writer left (old enough that no live
        writer can still own them); returns how many."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        now = time.time()
        removed = 0
        for info in infos:
            stale = info.mtime is not None and now - info.mtime.timestamp() >= older_than_s
            if info.base_name.startswith(".tmp-") and stale:
                self._delete(info.path)
                removed += 1
        return removed
