"""What the scoring service reads from a request, every limit checked on the way:
the bearer token, the body (streamed with a cap), the multipart fields, each photo
(format and pixels from its header, before it is decoded in full) and the options.
A refusal is ``Refused``: its HTTP status and a message naming the field and limit."""

from __future__ import annotations

import hmac
import io
import json
from typing import Any

import torch
from fastapi import Request

from antipers import robustness
from antipers.cluster.client_options import Limits, OptionError, check_countermeasures
from antipers.images import from_pil

FORMATS = ("PNG", "JPEG", "MPO", "WEBP")  # MPO: a camera's JPEG with extra frames
FIELDS = ("protected", "clean", "references")


class Refused(Exception):
    """A request the service turns down with ``status``; the replica goes on."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def authorized(request: Request, token: str | None) -> bool:
    """The request's bearer token, compared in constant time (no token: all pass)."""
    if token is None:
        return True
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), token.encode())


def decode_photo(field: str, index: int, data: bytes, limits: Limits, size: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    where = f"{field}[{index}]"
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Refused(415, f"{where}: not an image; send PNG, JPEG or WebP") from None
    except Image.DecompressionBombError as exc:
        raise Refused(413, f"{where}: {exc}") from None
    if img.format not in FORMATS:
        raise Refused(415, f"{where}: {img.format} is not accepted; send PNG, JPEG or WebP")
    width, height = img.size
    if width * height > limits.max_pixels:
        raise Refused(
            413, f"{where}: {width}x{height} pixels exceeds the limit of {limits.max_pixels}"
        )
    try:
        img.load()
    except (OSError, ValueError) as exc:
        raise Refused(422, f"{where}: the {img.format} data is damaged ({exc})") from None
    return from_pil(img, size)


def parse_options(raw: str | None, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise Refused(422, f"options: not valid JSON ({exc.msg})") from None
    if not isinstance(options, dict):
        raise Refused(422, "options: expected a JSON object")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise Refused(422, f"options.{unknown[0]}: unknown; use {', '.join(allowed)}")
    return options


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"request of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"request exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_upload(
    request: Request, limits: Limits, resolution: int, allowed: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor | None], dict[str, Any], list[bytes]]:
    """The photos of each field (decoded, at the service's resolution), the options,
    and the raw file bytes; every limit checked on the way."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request as StarletteRequest

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise Refused(415, "send multipart/form-data with files in 'protected'")
    body = await read_body(request, limits.max_bytes)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    replay = StarletteRequest(request.scope, receive)
    max_files = limits.max_images * len(FIELDS)
    try:
        form = await replay.form(max_files=max_files + 1, max_fields=8)
    except MultiPartException as exc:
        raise Refused(422, f"unreadable multipart body: {exc}") from None
    unknown = sorted(set(form.keys()) - {*FIELDS, "options"})
    if unknown:
        raise Refused(422, f"{unknown[0]}: unknown field; use {', '.join(FIELDS)}, options")
    sets: dict[str, torch.Tensor | None] = {}
    raw: list[bytes] = []
    for field in FIELDS:
        files = [f for f in form.getlist(field) if isinstance(f, UploadFile)]
        if len(files) > limits.max_images:
            raise Refused(
                413,
                f"{field}: {len(files)} images exceeds the limit of {limits.max_images}",
            )
        images = []
        for i, f in enumerate(files):
            data = await f.read()
            raw.append(field.encode() + data)
            images.append(decode_photo(field, i, data, limits, resolution))
        sets[field] = torch.cat(images) if images else None
    if sets["protected"] is None:
        raise Refused(422, "protected: at least one photo is required")
    text = form.get("options")
    options = parse_options(text if isinstance(text, str) else None, allowed)
    return sets, options, raw


def score_request(
    sets: dict[str, torch.Tensor | None], options: dict[str, Any], base_model: str, limits: Limits
) -> tuple[robustness.Upload, tuple[Any, ...] | None]:
    """A /v1/score upload and its countermeasures (None: the default ones)."""
    if options.get("base_model", base_model) != base_model:
        raise Refused(422, f"options.base_model: this service scores with {base_model!r}")
    countermeasures = None
    if "countermeasures" in options:
        entries = options["countermeasures"]
        if not isinstance(entries, list):
            raise Refused(422, "options.countermeasures: expected a list")
        try:
            check_countermeasures(entries, limits, "options.countermeasures")
            countermeasures = robustness.countermeasure_specs(entries)
        except OptionError as exc:
            raise Refused(422, str(exc)) from None
        except ValueError as exc:
            raise Refused(422, f"options.{exc}") from None
    try:
        upload = robustness.Upload(sets["protected"], sets["clean"], sets["references"])
    except ValueError as exc:
        raise Refused(422, str(exc)) from None
    return upload, countermeasures
