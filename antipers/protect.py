"""``antipers protect``: protect a folder of one person's photos before publishing them.

Every photo is centre-cropped and resized to the working resolution, protected as one
set (the clean photos serve as the surrogate's references too), and written as an
8-bit PNG whose every pixel is within the budget of the resized original. A
``protect.json`` beside them records the defense spec and the measured L-inf, PSNR and
SSIM per photo.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from antipers import __version__
from antipers.data.folders import list_photos
from antipers.data.identity import DatasetError, IdentitySet
from antipers.errors import UserError
from antipers.images import read_images, write_png
from antipers.metrics.budget import linf_255, psnr, ssim
from antipers.registry import BASE_MODELS, DEFENSES
from antipers.spec import ComponentSpec

REPORT = "protect.json"
log = logging.getLogger(__name__)


class ProtectError(UserError, ValueError):
    """Bad input to ``protect``: the message names the path or parameter."""


@dataclass
class ProtectPlan:
    photos: list[Path]
    outputs: list[Path]
    defense: ComponentSpec
    base_model: ComponentSpec


def plan(
    in_dir: Path,
    out_dir: Path,
    defense: str,
    params: dict[str, Any],
    base_model: str,
    overwrite: bool,
) -> ProtectPlan:
    """Check everything before any work: folders, photos, names, parameters, outputs."""
    in_dir, out_dir = in_dir.expanduser().resolve(), out_dir.expanduser().resolve()
    if out_dir == in_dir or in_dir in out_dir.parents:
        raise ProtectError(f"{out_dir}: refusing to write into the input folder {in_dir}")
    try:
        photos = list_photos(in_dir, "input")
    except DatasetError as exc:
        raise ProtectError(str(exc)) from None
    outputs = [out_dir / f"{p.stem}.png" for p in photos]
    if len({o.name for o in outputs}) != len(outputs):
        raise ProtectError(f"{in_dir}: two photos share a name stem (e.g. a.jpg and a.png)")
    existing = [o for o in [*outputs, out_dir / REPORT] if o.exists()]
    if existing and not overwrite:
        raise ProtectError(f"{existing[0]} exists (and {len(existing) - 1} more); use --overwrite")
    tracks = getattr(DEFENSES.get(defense) if defense in DEFENSES else None, "TRACKS", ("image",))
    if "image" not in tracks:
        raise ProtectError(
            f"defense {defense!r} does not change photos (it runs on the {' or '.join(tracks)} "
            "track); protect your photos with an image defense: aspl, simac, cap-aspl, ..."
        )
    try:
        defense_spec = ComponentSpec.parse({"name": defense, **params}, DEFENSES, "defense")
    except ValueError as exc:
        raise ProtectError(str(exc)) from None
    model = {"name": "diffusers", "path": base_model} if Path(base_model).is_dir() else base_model
    try:
        model_spec = ComponentSpec.parse(model, BASE_MODELS, "base_model")
    except ValueError as exc:
        raise ProtectError(f"{exc} (or give the path of a diffusers folder)") from None
    return ProtectPlan(photos, outputs, defense_spec, model_spec)


def protect_folder(
    p: ProtectPlan, out_dir: Path, resolution: int, seed: int, device: torch.device
) -> dict[str, Any]:
    """Run the plan; returns the report that was written."""
    clean = read_images(p.photos, resolution)
    person = IdentitySet(
        dataset="folder",
        identity=p.photos[0].parent.name,
        set_A=clean,
        set_B=clean,
        set_C=clean[:0],
        sources={"set_B": tuple(map(str, p.photos))},
    )
    bundle = p.base_model.build(BASE_MODELS).load(device)
    log.info("protecting %d photos with %s on %s", len(p.photos), p.defense.name, bundle.name)
    protected = p.defense.build(DEFENSES).protect(
        person, bundle, torch.Generator().manual_seed(seed)
    )
    images = protected.images.cpu()
    write_png(images, p.outputs)
    report = {
        "defense": p.defense.to_dict(),
        "base_model": p.base_model.to_dict(),
        "resolution": resolution,
        "seed": seed,
        "antipers_version": __version__,
        "created_at": datetime.now(UTC).isoformat(),
        "photos": [
            {"source": str(src), "output": str(out), "linf_255": li, "psnr_db": ps, "ssim": ss}
            for src, out, li, ps, ss in zip(
                p.photos,
                p.outputs,
                linf_255(images, clean).tolist(),
                psnr(images, clean).tolist(),
                ssim(images, clean).tolist(),
                strict=True,
            )
        ],
    }
    tmp = out_dir / f".{REPORT}.tmp"
    tmp.write_text(json.dumps(report, indent=2, allow_nan=True))
    tmp.replace(out_dir / REPORT)
    return report
