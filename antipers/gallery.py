"""The report's galleries: what each defense did to a person's photo and to what the
attacker generates, from the thumbnails stored beside the rows (``antipers.samples``).

Per board, one or two identities, chosen the same way for the same store: the ones
with thumbnails for the most configurations (then by name). For each configuration, in
the board's rank order: the protected photo, its perturbation amplified around
mid-gray, the attack's generations, and the generations after the countermeasure that
is the configuration's worst case. The thumbnails become files under ``images/`` next
to ``index.html``, so the page stays small and loads them lazily.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from antipers.board_labels import NO_COUNTERMEASURE, dataset_settings
from antipers.leaderboard import Board
from antipers.registry import TRACKS
from antipers.results import ResultStore
from antipers.samples import amplified

IMAGES = "images"
PER_BOARD = 2  # identities shown per board


@dataclass(frozen=True)
class Thumb:
    src: str  # relative to index.html
    width: int
    height: int


@dataclass
class ConfigRow:
    config: str
    protected: list[Thumb] = field(default_factory=list)
    perturbation: list[Thumb] = field(default_factory=list)
    generated: list[Thumb] = field(default_factory=list)
    worst_countermeasure: str | None = None
    worst_generated: list[Thumb] = field(default_factory=list)


@dataclass
class Gallery:
    identity: str
    seed: int
    clean: list[Thumb]
    rows: list[ConfigRow]
    photos_changed: bool = True  # False: the defense is not in the photos (model track)
    dataset: str = ""  # the identity's dataset and its settings, as people read them


class _Writer:
    """Writes each thumbnail once into the report's ``images/`` folder."""

    def __init__(self, store: ResultStore, out: Path) -> None:
        self.store, self.folder = store, out / IMAGES
        self._read: dict[str, dict[str, list[bytes]]] = {}

    def samples(self, spec_id: str) -> dict[str, list[bytes]]:
        if spec_id not in self._read:
            self._read[spec_id] = self.store.read_images(spec_id)
        return self._read[spec_id]

    def put(self, name: str, png: bytes) -> Thumb:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / name).write_bytes(png)
        with Image.open(io.BytesIO(png)) as image:
            width, height = image.size
        return Thumb(f"{IMAGES}/{name}", width, height)

    def thumbs(self, spec_id: str, kind: str, limit: int | None = None) -> list[Thumb]:
        pngs = self.samples(spec_id).get(kind, [])[:limit]
        return [self.put(f"{spec_id}-{kind}-{i}.png", png) for i, png in enumerate(pngs)]

    def perturbation(self, spec_id: str, limit: int | None = None) -> list[Thumb]:
        samples = self.samples(spec_id)
        pairs = list(zip(samples.get("protected", []), samples.get("clean", []), strict=False))
        pairs = pairs[:limit]
        return [
            self.put(f"{spec_id}-perturbation-{i}.png", amplified(p, c))
            for i, (p, c) in enumerate(pairs)
        ]


def _dataset_label(raw: str) -> str:
    """``synthetic (n_identities=8, seed=3)`` from the spec's dataset JSON."""
    name, settings = dataset_settings(raw)
    return f"{name} ({settings})" if settings else name


def chosen_people(board: Board, with_images: set[str], count: int = PER_BOARD) -> list[tuple]:
    """(person, seed) pairs, one seed per person (the smallest), with thumbnails for the
    most configurations, then by name."""
    runs = board.experiments[board.experiments["spec_id"].isin(with_images)]
    if runs.empty:
        return []
    plain = runs[runs["countermeasure"] == NO_COUNTERMEASURE]
    runs = plain if not plain.empty else runs
    first_seed = runs.groupby("person")["seed"].min()
    runs = runs[runs["seed"] == runs["person"].map(first_seed)]
    covered = runs.groupby(["person", "seed"])["config"].nunique()
    ranked = sorted(covered.items(), key=lambda item: (-item[1], str(item[0][0]), item[0][1]))
    return [person for person, _ in ranked[:count]]


def board_galleries(
    board: Board, store: ResultStore, out: Path, with_images: set[str]
) -> list[Gallery]:
    """The board's galleries, their thumbnails written under ``out/images``. Photos
    are shown only on a track whose defenses change them (the image track): elsewhere (a
    protected model, IDDM's own perturbation inside its personalization) the photos
    column would show clean photos as protected."""
    if board.experiments.empty:
        return []
    track = board.key.get("track", "image")
    photos_changed = track in TRACKS and TRACKS.get(track).changes_photos
    writer = _Writer(store, out)
    worst_column = f"worst_{board.primary}_countermeasure"
    galleries = []
    for person, seed in chosen_people(board, with_images):
        mine = board.experiments[
            (board.experiments["person"] == person)
            & (board.experiments["seed"] == seed)
            & board.experiments["spec_id"].isin(with_images)
        ].sort_values("spec_id")
        # one experiment per configuration and countermeasure (a rerun with other
        # settings, or two strengths of one countermeasure, would make several)
        mine = mine.drop_duplicates(["config", "countermeasure"])
        identity = str(mine["identity"].iloc[0])
        clean: list[Thumb] = []
        rows = []
        for _, line in board.table.iterrows():
            config = line["config"]
            runs = mine[mine["config"] == config].set_index("countermeasure")["spec_id"].to_dict()
            plain = runs.get(NO_COUNTERMEASURE)
            row = ConfigRow(config)
            if plain is not None:
                if not clean:
                    clean = writer.thumbs(plain, "clean", 1)
                if photos_changed:
                    row.protected = writer.thumbs(plain, "protected", 1)
                    row.perturbation = writer.perturbation(plain, 1)
                row.generated = writer.thumbs(plain, "generated")
            worst = line.get(worst_column)
            if isinstance(worst, str) and worst != NO_COUNTERMEASURE and worst in runs:
                row.worst_countermeasure = worst
                row.worst_generated = writer.thumbs(runs[worst], "generated")
            if row.generated or row.worst_generated or row.protected:
                rows.append(row)
        if rows:
            dataset = _dataset_label(str(person).removesuffix(f"/{identity}"))
            galleries.append(Gallery(identity, int(seed), clean, rows, photos_changed, dataset))
    return galleries
