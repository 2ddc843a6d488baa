"""The online robustness-scoring endpoint: a Ray Serve deployment with FastAPI ingress.
(No `from __future__ import annotations` here: FastAPI reads the handlers' types.)

``serve run serve/scoring.yaml`` (``import_path: antipers.cluster.scoring:app``) or
``antipers serve``. Each replica keeps its base model and face backend resident.
Every limit is checked at the boundary, before any photo is decoded in full
(``uploads.py``), and every refusal is a JSON ``{"error": ...}`` with a 4xx status;
the replica goes on. Concurrent /v1/score requests are pooled (``batching.py``).
"""

import asyncio
import inspect
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from antipers import robustness
from antipers.cluster.batching import Batching, check_batching
from antipers.cluster.client_options import (
    Limits,
    OptionError,
    check_evaluation_options,
    check_work,
)
from antipers.cluster.uploads import Refused, authorized, read_upload, score_request

log = logging.getLogger(__name__)
TOKEN_ENV = "ANTIPERS_TOKEN"

api = FastAPI(
    title="antipers robustness scoring",
    version="1",
    description=(
        "Send protected photos (and optionally their clean originals and other clean "
        "photos of the person); get back the budget used, the protection strength (the "
        "base model's diffusion-loss gain at fixed timesteps and noise), what survives "
        "each countermeasure, face checks, and one score in [0, 1]:\n\n"
        "    strength = gain / (gain + 0.05)    (0 when gain <= 0)\n"
        "    survival = clip(worst_gain / gain, 0, 1)\n"
        "    score    = strength * (1 + survival) / 2\n\n"
        "The gain is over the clean originals when given, else over purified copies."
    ),
)


@serve.deployment
@serve.ingress(api)
class ScoringService:
    def __init__(
        self,
        base_model: str = "tiny",
        resolution: int = 64,
        face_backend: str | None = "offline",
        limits: dict[str, int] | None = None,
        token: str | None = None,
        store: str = "antipers-serve",
        work_dir: str | None = None,
        evaluation_defaults: dict[str, Any] | None = None,
        batching: dict[str, Any] | None = None,
    ) -> None:
        from antipers.attacks.class_images import cache_root
        from antipers.device import pick_device
        from antipers.registry import BASE_MODELS
        from antipers.results import ResultStore

        self.base_model = base_model
        self.resolution = resolution
        self.limits = Limits.parse(limits)
        self.bundle = BASE_MODELS.build(base_model).load(pick_device())
        self.faces = None
        if face_backend:
            from antipers.metrics.faces import face_backend as load_backend

            self.faces = load_backend(face_backend)
        self._token = token or os.environ.get(TOKEN_ENV) or None
        try:
            self.batching = Batching(**(batching or {})).resolved(self.bundle.device)
        except TypeError as exc:
            raise ValueError(f"batching: {exc}; use max_requests, wait_s, micro_batch") from None
        self._score_batch.set_max_batch_size(self.batching.max_requests)
        self._score_batch.set_batch_wait_timeout_s(self.batching.wait_s)
        self.scored = {"requests": 0, "batches": 0}
        self.store = ResultStore(store)
        self.work_dir = Path(work_dir or cache_root() / "uploads").expanduser()
        self.evaluation_defaults = dict(evaluation_defaults or {})
        self._running: dict[str, Any] = {}  # spec_id -> Ray task of this replica

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "base_model": self.base_model,
            "limits": asdict(self.limits),
            "batching": asdict(self.batching),
            "scored": dict(self.scored),
        }

    @api.post("/v1/score")
    async def score(self, request: Request) -> JSONResponse:
        try:
            if not authorized(request, self._token):
                raise Refused(401, "missing or wrong bearer token")
            allowed = ("base_model", "countermeasures")
            sets, options, _ = await read_upload(request, self.limits, self.resolution, allowed)
            upload, countermeasures = score_request(sets, options, self.base_model, self.limits)
            result = await self._score_batch((upload, countermeasures))
            if isinstance(result, Exception):
                raise Refused(422, f"options.countermeasures: {result}")
        except Refused as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        result["base_model"] = self.base_model
        result["resolution"] = self.resolution
        return JSONResponse(result)

    @serve.batch(max_concurrent_batches=1)  # sizes set from the config in __init__
    async def _score_batch(
        self, jobs: list[tuple[robustness.Upload, tuple[Any, ...] | None]]
    ) -> list[dict[str, Any] | Exception]:
        """Runs off the event loop, so /healthz and uploads stay responsive."""
        self.scored["requests"] += len(jobs)
        self.scored["batches"] += 1
        return await asyncio.to_thread(
            robustness.score_uploads,
            self.bundle,
            jobs,
            self.faces,
            micro_batch=self.batching.micro_batch,
        )

    @api.post("/v1/evaluations", status_code=202)
    async def submit_evaluation(self, request: Request) -> JSONResponse:
        """A full evaluation of the uploaded (already protected) photos: personalize on
        them, sample, score. ``references``: clean photos of the person (required)."""
        from antipers.cluster import evaluations

        try:
            if not authorized(request, self._token):
                raise Refused(401, "missing or wrong bearer token")
            sets, options, raw = await read_upload(
                request, self.limits, self.resolution, evaluations.OPTIONS
            )
            protected, references = sets["protected"], sets["references"]
            if references is None:
                raise Refused(
                    422,
                    "references: clean photos of the person are required "
                    "(the identity metrics compare the generated images with them)",
                )
            if sets["clean"] is not None:
                raise Refused(422, "clean: not used by evaluations; send references")
            root = self.work_dir / evaluations.upload_id(raw, options)
            try:
                check_evaluation_options(options, self.limits)
                spec = evaluations.evaluation_spec(
                    options, self.evaluation_defaults, root, self.base_model, self.resolution
                )
                check_work(spec, self.limits)
            except ValueError as exc:  # SpecError and OptionError included
                raise Refused(422, str(exc)) from None
            await asyncio.to_thread(evaluations.write_upload, root, protected, references)
        except Refused as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        known = evaluations.status(spec.spec_id, self.store, self._running)
        if known is None or known["status"] == "failed":
            self._running[spec.spec_id] = evaluations.submit(spec, self.store.uri)
            known = {"id": spec.spec_id, "status": "queued"}
        known.pop("rows", None)
        return JSONResponse(known, status_code=202)

    def _refuse_evaluation(self, evaluation_id: str, request: Request) -> JSONResponse | None:
        """401 without the token, 422 for what cannot be an id; None when both hold."""
        if not authorized(request, self._token):
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)
        if len(evaluation_id) != 16 or any(c not in "0123456789abcdef" for c in evaluation_id):
            return JSONResponse(
                {"error": f"{evaluation_id!r}: an evaluation id is 16 hex digits"},
                status_code=422,
            )
        return None

    @api.get("/v1/evaluations/{evaluation_id}")
    async def get_evaluation(self, evaluation_id: str, request: Request) -> JSONResponse:
        from antipers.cluster import evaluations

        refused = self._refuse_evaluation(evaluation_id, request)
        if refused is not None:
            return refused
        body = await asyncio.to_thread(evaluations.status, evaluation_id, self.store, self._running)
        if body is None:
            return JSONResponse({"error": f"no evaluation {evaluation_id}"}, status_code=404)
        if body["status"] == "done":  # the generated images, as this service serves them
            samples = await asyncio.to_thread(self.store.read_images, evaluation_id)
            base = request.url.path.rstrip("/")
            body["images"] = [
                f"{base}/images/{k}.png" for k in range(len(samples.get("generated", [])))
            ]
        return JSONResponse(body)

    @api.get("/v1/evaluations/{evaluation_id}/images/{name}")
    async def get_evaluation_image(
        self, evaluation_id: str, name: str, request: Request
    ) -> Response:
        refused = self._refuse_evaluation(evaluation_id, request)
        if refused is not None:
            return refused
        k = name.removesuffix(".png")
        if not name.endswith(".png") or not (k.isascii() and k.isdigit()) or len(k) > 3:
            return JSONResponse({"error": f"{name!r}: images are K.png"}, status_code=404)
        samples = await asyncio.to_thread(self.store.read_images, evaluation_id)
        generated = samples.get("generated", [])
        if int(k) >= len(generated):
            return JSONResponse(
                {"error": f"evaluation {evaluation_id} has no image {name}"}, status_code=404
            )
        return Response(generated[int(k)], media_type="image/png")


def check_args(args: dict[str, Any]) -> None:
    """The Serve config's ``args``, checked before any replica starts: an error in a
    replica's constructor would surface only as Serve's deployment failure."""
    from antipers.cluster import evaluations
    from antipers.registry import BASE_MODELS

    known = [p for p in inspect.signature(ScoringService.func_or_class).parameters]
    for key in args:
        if key not in known:
            raise OptionError(f"args.{key}: unknown; use {', '.join(known)}")
    Limits.parse(args.get("limits"))
    check_batching(args.get("batching") or {})
    resolution = args.get("resolution", 64)
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise OptionError(f"args.resolution: expected a whole number >= 8, got {resolution!r}")
    unknown = sorted(set(args.get("evaluation_defaults") or {}) - set(evaluations.OPTIONS))
    if unknown:
        raise OptionError(
            f"evaluation_defaults.{unknown[0]}: unknown; use {', '.join(evaluations.OPTIONS)}"
        )
    try:
        model = BASE_MODELS.build(args.get("base_model", "tiny"))
    except (KeyError, ValueError) as exc:
        raise OptionError(f"args.base_model: {exc}") from None
    check = getattr(model, "check", None)
    if check is not None:
        check()  # a missing or incomplete model folder, named


def app(args: dict[str, Any] | None = None) -> Any:
    """The application builder ``serve run`` calls with the config's ``args``."""
    return ScoringService.bind(**(args or {}))
