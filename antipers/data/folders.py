"""Photos on disk: the Anti-DreamBooth layout (CelebA-HQ, VGGFace2) and plain folders.

Anti-DreamBooth layout: ``<root>/<identity>/set_A|set_B|set_C/<photos>``.
Plain folders: ``<root>/<identity>/<photos>``, split round-robin in name order
(photo 0 -> set_A, 1 -> set_B, 2 -> set_C, 3 -> set_A, ...).
Every problem found is reported at once, each with its path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image, UnidentifiedImageError

from antipers.data.identity import SETS, DatasetError, IdentitySet
from antipers.images import IMAGE_SUFFIXES, read_images

DATA_DIR_ENV = "ANTIPERS_DATA_DIR"


def data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or Path.home() / ".cache" / "antipers" / "data")


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def scan_photos(folder: Path, problems: list[str], verify: bool) -> list[Path]:
    """Image files in ``folder``; non-image and unreadable files go to ``problems``."""
    photos = []
    for path in _entries(folder):
        if path.is_dir():
            problems.append(f"{path}: unexpected folder (expected only photos here)")
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append(f"{path}: not an image (expected {', '.join(IMAGE_SUFFIXES)})")
        elif verify and not _readable(path, problems):
            continue
        else:
            photos.append(path)
    return photos


def list_photos(folder: Path, what: str) -> list[Path]:
    """The readable photos of one flat folder; a DatasetError names every problem."""
    if not folder.is_dir():
        raise DatasetError([f"{folder}: {what} folder does not exist"])
    problems: list[str] = []
    photos = scan_photos(folder, problems, verify=True)
    if not problems and not photos:
        problems.append(f"{folder}: no images in the {what} folder")
    if problems:
        raise DatasetError(problems)
    return photos


def _readable(path: Path, problems: list[str]) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        problems.append(f"{path}: unreadable image ({exc})")
        return False
    except Image.DecompressionBombError as exc:
        problems.append(f"{path}: {exc}")
        return False


def _too_few(folder: Path, found: int, need: int, why: str = "") -> list[str]:
    """The problem of a folder with fewer usable photos than its sets need (none if enough)."""
    return [f"{folder}: {found} usable photo(s), need at least {need}{why}"] if found < need else []


def _check_root(root: Path, label: str) -> None:
    if not root.is_dir():
        raise DatasetError([f"{root}: dataset {label!r} folder does not exist"])


def _identity_dirs(root: Path) -> list[Path]:
    return [p for p in _entries(root) if p.is_dir()]


def is_antidreambooth_layout(root: Path) -> bool:
    return any((d / s).is_dir() for d in _identity_dirs(root) for s in SETS)


class _IdentityFolders:
    """What every per-identity folder dataset shares: listing, finding and loading an
    identity, and checking the whole dataset."""

    label: ClassVar[str]

    @property
    def path(self) -> Path:
        raise NotImplementedError

    def identities(self) -> list[str]:
        _check_root(self.path, self.label)
        return [d.name for d in _identity_dirs(self.path)]

    def _folder(self, identity: str) -> Path:
        folder = self.path / identity
        if not folder.is_dir():
            _check_root(self.path, self.label)
            raise DatasetError([f"{folder}: no identity {identity!r} in dataset {self.label!r}"])
        return folder

    def photo_sets(self, identity: str, verify: bool = False) -> dict[str, list[Path]]:
        """An identity's photos per set; a DatasetError names every problem in its folder
        at once (``verify``: open each photo too)."""
        problems: list[str] = []
        sets = self._sets(self._folder(identity), problems, verify)
        if problems:
            raise DatasetError(problems)
        return sets

    def _sets(self, folder: Path, problems: list[str], verify: bool) -> dict[str, list[Path]]:
        """The layout's own part: split ``folder`` into sets, adding to ``problems``."""
        raise NotImplementedError

    def load(self, identity: str, resolution: int) -> IdentitySet:
        sets = self.photo_sets(identity)

        def batch(paths: list[Path]) -> torch.Tensor:  # a set may be empty (uploads)
            if not paths:
                return torch.zeros(0, 3, resolution, resolution)
            return read_images(paths, resolution)

        return IdentitySet(
            dataset=self.label,
            identity=identity,
            **{name: batch(paths) for name, paths in sets.items()},
            sources={name: tuple(map(str, paths)) for name, paths in sets.items()},
        )

    def check(self) -> list[str]:
        """Every problem in the whole dataset (empty when it is usable)."""
        return check_all(self)


@dataclass(frozen=True)
class AntiDreamBoothFolders(_IdentityFolders):
    """``<root>/<identity>/set_A|set_B|set_C``; ``root=""`` means ``$ANTIPERS_DATA_DIR/<name>``."""

    root: str = ""
    min_photos: int = 2
    label: ClassVar[str] = "anti-dreambooth"

    @property
    def path(self) -> Path:
        return Path(self.root).expanduser() if self.root else data_dir() / self.label

    def _sets(self, folder: Path, problems: list[str], verify: bool) -> dict[str, list[Path]]:
        sets: dict[str, list[Path]] = {}
        for name in SETS:
            sub = folder / name
            if not sub.is_dir():
                problems.append(f"{sub}: missing (each identity needs {', '.join(SETS)})")
                continue
            sets[name] = scan_photos(sub, problems, verify)
            problems += _too_few(sub, len(sets[name]), self.min_photos)
        extra = [p for p in _entries(folder) if p.name not in SETS]
        problems += [f"{p}: unexpected entry (expected only {', '.join(SETS)})" for p in extra]
        return sets


@dataclass(frozen=True)
class CelebAHQ(AntiDreamBoothFolders):
    """CelebA-HQ as prepared for Anti-DreamBooth (50 identities, 4 photos per set)."""

    label: ClassVar[str] = "celeba-hq"


@dataclass(frozen=True)
class VGGFace2(AntiDreamBoothFolders):
    """VGGFace2 as prepared for Anti-DreamBooth (50 identities, 4 photos per set)."""

    label: ClassVar[str] = "vggface2"


@dataclass(frozen=True)
class Uploads(AntiDreamBoothFolders):
    """Photos sent to the scoring service for a full evaluation (set_B: the protected
    photos; set_A and set_C: the clean ones), written in the Anti-DreamBooth layout."""

    label: ClassVar[str] = "uploads"


@dataclass(frozen=True)
class PlainFolders(_IdentityFolders):
    """``<root>/<identity>/<photos>``, split round-robin into set_A, set_B, set_C."""

    root: str
    min_photos: int = 2
    label: ClassVar[str] = "folder"

    @property
    def path(self) -> Path:
        return Path(self.root).expanduser()

    def _sets(self, folder: Path, problems: list[str], verify: bool) -> dict[str, list[Path]]:
        photos = scan_photos(folder, problems, verify)
        need = len(SETS) * self.min_photos  # split round-robin into the three sets
        problems += _too_few(
            folder,
            len(photos),
            need,
            f" ({self.min_photos} per set; they are split into {', '.join(SETS)})",
        )
        return {name: photos[i :: len(SETS)] for i, name in enumerate(SETS)}


def check_all(dataset: _IdentityFolders) -> list[str]:
    try:
        identities = dataset.identities()
    except DatasetError as exc:
        return exc.problems
    if not identities:
        return [f"{dataset.path}: no identity folders"]
    problems: list[str] = []
    for identity in identities:
        try:
            dataset.photo_sets(identity, verify=True)
        except DatasetError as exc:
            problems += exc.problems
    return problems


def open_folder(root: str | Path, min_photos: int = 2) -> AntiDreamBoothFolders | PlainFolders:
    """The right reader for a folder: Anti-DreamBooth layout if any identity has set_*."""
    path = Path(root)
    _check_root(path, str(path))
    if is_antidreambooth_layout(path):
        return AntiDreamBoothFolders(str(path), min_photos)
    return PlainFolders(str(path), min_photos)
