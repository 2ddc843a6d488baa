"""``antipers protect``: protect a folder of one person's photos before publishing them.

Each photo keeps its own size. The set is protected at the working resolution (each
photo resized to the working square, so every part of it is protected; a non-square
photo is squashed for the defense), the perturbation is resized back to the photo's
size (bilinear: a weighted mean of values within the budget stays within it), added to
the original, and the budget is enforced again on the 8-bit output at full size. A
``protect.json`` beside them records the defense spec, both sizes and the measured
L-inf, PSNR and SSIM of each photo at full size; ``preview.png`` shows each photo, its
protected version and the difference amplified, side by side.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from antipers import __version__
from antipers.data.folders import list_photos
from antipers.data.identity import DatasetError, IdentitySet
from antipers.errors import UserError
from antipers.images import read_image, to_uint8, write_png
from antipers.metrics.budget import linf_255, psnr, ssim
from antipers.registry import BASE_MODELS, DEFENSES
from antipers.run_context import load_base_model
from antipers.samples import AMPLIFY
from antipers.spec import ComponentSpec

REPORT = "protect.json"
PREVIEW = "preview.png"
PREVIEW_SIDE = 192  # each tile's height in the preview
PREVIEW_ROWS = 24  # photos shown in the preview (a folder of hundreds stays viewable)
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
    if any(o.name == PREVIEW for o in outputs):
        raise ProtectError(
            f"{in_dir}: a photo named 'preview' would be overwritten by {PREVIEW}; rename it"
        )
    existing = [o for o in [*outputs, out_dir / REPORT, out_dir / PREVIEW] if o.exists()]
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


def to_working(original: torch.Tensor, resolution: int) -> torch.Tensor:
    """The whole photo at the working square (antialiased bicubic, aspect not kept)."""
    return F.interpolate(
        original, size=(resolution, resolution), mode="bicubic", antialias=True
    ).clamp(0, 1)


def at_full_size(
    original: torch.Tensor, working: torch.Tensor, protected: torch.Tensor, eps: float
) -> torch.Tensor:
    """The working-size perturbation on the full-size original, on the 8-bit grid within
    ``eps`` of it."""
    from antipers.defenses.pgd import project_png

    delta = F.interpolate(
        protected - working, size=original.shape[-2:], mode="bilinear", align_corners=False
    )
    return project_png(original + delta, original, eps)


def protect_folder(
    p: ProtectPlan, out_dir: Path, resolution: int, seed: int, device: torch.device
) -> dict[str, Any]:
    """Run the plan; returns the report that was written."""
    originals = [read_image(path) for path in p.photos]
    clean = torch.cat([to_working(o, resolution) for o in originals])
    person = IdentitySet(
        dataset="folder",
        identity=p.photos[0].parent.name,
        set_A=clean,
        set_B=clean,
        set_C=clean[:0],
        sources={"set_B": tuple(map(str, p.photos))},
    )
    bundle = load_base_model(p.base_model, device)  # fingerprinted: class images cached
    log.info("protecting %d photos with %s on %s", len(p.photos), p.defense.name, bundle.name)
    defense = p.defense.build(DEFENSES)
    protected = defense.protect(person, bundle, torch.Generator().manual_seed(seed)).images.cpu()
    eps = float(getattr(defense, "eps", 255.0))
    outputs = [
        at_full_size(o, clean[i : i + 1], protected[i : i + 1], eps)
        for i, o in enumerate(originals)
    ]
    for image, path in zip(outputs, p.outputs, strict=True):
        write_png(image, [path])
    report = {
        "defense": p.defense.to_dict(),
        "base_model": p.base_model.to_dict(),
        "resolution": resolution,
        "seed": seed,
        "antipers_version": __version__,
        "created_at": datetime.now(UTC).isoformat(),
        "photos": [
            photo_record(*row) for row in zip(p.photos, p.outputs, originals, outputs, strict=True)
        ],
    }
    tmp = out_dir / f".{PREVIEW}.tmp"
    preview(originals, outputs, report["photos"]).save(tmp, format="PNG")
    tmp.replace(out_dir / PREVIEW)
    tmp = out_dir / f".{REPORT}.tmp"
    tmp.write_text(json.dumps(report, indent=2, allow_nan=True))
    tmp.replace(out_dir / REPORT)
    return report


def preview(
    originals: list[torch.Tensor], outputs: list[torch.Tensor], records: list[dict[str, Any]]
) -> Image.Image:
    """One row per photo (the first ``PREVIEW_ROWS``): original | protected | the
    difference x``AMPLIFY`` around mid-gray (at full size, then scaled with the row),
    captioned with its L-inf and PSNR: what a person checks before publishing."""
    tiles, captions = [], []
    shown = list(zip(originals, outputs, records, strict=True))[:PREVIEW_ROWS]
    for original, output, record in shown:
        diff = (0.5 + AMPLIFY * (output - original)).clamp(0, 1)
        row = [Image.fromarray(a) for a in to_uint8(torch.cat([original, output, diff]))]
        width = max(1, round(row[0].width * PREVIEW_SIDE / row[0].height))
        tiles.append([t.resize((width, PREVIEW_SIDE), Image.Resampling.LANCZOS) for t in row])
        captions.append(
            f"{Path(record['source']).name}: L-inf {record['linf_255']:.0f}/255, "
            f"PSNR {record['psnr_db']:.1f} dB  (original | protected | difference x{AMPLIFY})"
        )
    if len(records) > PREVIEW_ROWS:
        captions[-1] += f"; {len(records) - PREVIEW_ROWS} more photo(s) not shown"
    font = ImageFont.load_default(size=13)
    pad, text_h = 6, 20
    width = max(sum(t.width for t in row) + pad * (len(row) + 1) for row in tiles)
    width = max(width, 560)
    canvas = Image.new("RGB", (width, len(tiles) * (PREVIEW_SIDE + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    for row, caption in zip(tiles, captions, strict=True):
        draw.text((pad, y), caption, fill=(26, 32, 44), font=font)
        x = pad
        for tile in row:
            canvas.paste(tile, (x, y + text_h))
            x += tile.width + pad
        y += PREVIEW_SIDE + text_h + pad
    return canvas


def photo_record(
    source: Path, output: Path, original: torch.Tensor, image: torch.Tensor
) -> dict[str, Any]:
    height, width = original.shape[-2:]
    return {
        "source": str(source),
        "output": str(output),
        "size": [int(width), int(height)],
        "linf_255": float(linf_255(image, original)[0]),
        "psnr_db": float(psnr(image, original)[0]),
        "ssim": float(ssim(image, original)[0]),
    }
