"""The scoring endpoint over real HTTP on 127.0.0.1 (Ray Serve + FastAPI)."""

from __future__ import annotations

import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

requests = pytest.importorskip("requests")
TOKEN = "s3cret-token-value"
LIMITS = {"max_images": 4, "max_bytes": 1_000_000, "max_pixels": 256 * 256}


def png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def as_png(images: torch.Tensor) -> list[bytes]:
    from antipers.images import to_uint8

    return [png(a) for a in to_uint8(images)]


@pytest.fixture(scope="module")
def photos():
    """Clean photos of one synthetic person and their ASPL-protected versions."""
    from antipers.models.tiny import TinyModel
    from antipers.registry import DATASETS, DEFENSES

    bundle = TinyModel(seed=0).load(torch.device("cpu"))
    person = DATASETS.build("synthetic", {"n_identities": 1}).load("synth-0000", 64)
    settings = {"eps": 16, "iterations": 6, "pgd_steps": 6, "num_class_images": 4, "class_steps": 4}
    aspl = DEFENSES.build("aspl", settings)
    protected = aspl.protect(person, bundle, torch.Generator().manual_seed(0)).images
    return {"clean": as_png(person.set_B), "protected": as_png(protected)}


@pytest.fixture(scope="module")
def service(ray_address, tmp_path_factory):
    from ray import serve

    from antipers.cluster.scoring import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    store = tmp_path_factory.mktemp("serve-store")
    common = {"resolution": 64, "limits": LIMITS, "store": str(store)}
    # batched on a CPU too (its default there is one request at a time), to test it
    serve.run(app({**common, "batching": {"max_requests": 8}}), name="open", route_prefix="/")
    serve.run(app({**common, "token": TOKEN}), name="secure", route_prefix="/secure")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def post(url, files, options=None, headers=None):
    data = {"options": json.dumps(options)} if options is not None else None
    return requests.post(url, files=files, data=data, headers=headers, timeout=120)


def files_of(photos, fields=("protected", "clean")):
    return [(f, (f"{f}{i}.png", b, "image/png")) for f in fields for i, b in enumerate(photos[f])]


FAST = {"countermeasures": ["jpeg", "blur"]}


def healthy(service):
    return requests.get(f"{service}/healthz", timeout=30).json()["status"] == "ok"


def test_scoring_is_repeatable_and_ranks_protected_above_clean(service, photos):
    first = post(f"{service}/v1/score", files_of(photos), FAST)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["reference"] == "clean originals" and body["countermeasures"] == ["jpeg", "blur"]
    assert len(body["photos"]) == len(photos["protected"])
    photo = body["photos"][0]
    assert {"loss_gain", "survives", "worst_gain", "score", "budget", "face"} <= set(photo)
    assert 0 < photo["budget"]["linf_255"] <= 16.0 and photo["face"]["found"]  # eps 16
    assert 0.0 <= body["set"]["score"] <= 1.0
    again = post(f"{service}/v1/score", files_of(photos), FAST).json()
    assert again == body  # fixed timesteps, noise and countermeasure seeds
    clean = {"protected": photos["clean"], "clean": photos["clean"]}
    unprotected = post(f"{service}/v1/score", files_of(clean), FAST).json()
    assert unprotected["set"]["loss_gain"] == 0.0 and unprotected["set"]["score"] == 0.0
    assert body["set"]["loss_gain"] > 0 and body["set"]["score"] > unprotected["set"]["score"]
    assert (
        "strength * (1 + survival) / 2" in requests.get(f"{service}/openapi.json", timeout=30).text
    )


def test_without_originals_the_gain_is_over_purified_copies(service, photos):
    response = post(
        f"{service}/v1/score", files_of(photos, ("protected",)), {"countermeasures": []}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["reference"] == "purified copies" and "budget" not in body["photos"][0]


def damaged_png(photos) -> bytes:
    data = photos["protected"][0]
    return data[: len(data) // 2]


BAD = [
    (
        "text instead of an image",
        lambda p: [("protected", ("a.txt", b"hello", "text/plain"))],
        None,
        415,
        "protected[0]: not an image",
    ),
    (
        "a GIF",
        lambda p: [
            ("protected", ("a.gif", png(np.zeros((8, 8, 3), np.uint8), "GIF"), "image/gif"))
        ],
        None,
        415,
        "GIF is not accepted",
    ),
    (
        "too many photos",
        lambda p: [("protected", (f"{i}.png", p["protected"][0], "image/png")) for i in range(5)],
        None,
        413,
        "5 images exceeds the limit of 4",
    ),
    (
        "too many bytes",
        lambda p: [("protected", ("big.png", b"\0" * 1_100_000, "image/png"))],
        None,
        413,
        "exceeds the limit of 1000000",
    ),
    (
        "too many pixels",
        lambda p: [
            ("protected", ("huge.png", png(np.zeros((300, 300, 3), np.uint8)), "image/png"))
        ],
        None,
        413,
        "300x300 pixels",
    ),
    (
        "damaged PNG",
        lambda p: [("protected", ("cut.png", damaged_png(p), "image/png"))],
        None,
        422,
        "data is damaged",
    ),
    (
        "no protected photo",
        lambda p: [("clean", ("c.png", p["clean"][0], "image/png"))],
        None,
        422,
        "protected: at least one photo",
    ),
    ("originals that do not pair up", lambda p: files_of(p)[:-1], None, 422, "must pair up"),
    (
        "an unknown field",
        lambda p: [
            ("protected", ("a.png", p["protected"][0], "image/png")),
            ("photos", ("b.png", p["clean"][0], "image/png")),
        ],
        None,
        422,
        "photos: unknown field",
    ),
    (
        "an unknown countermeasure",
        lambda p: files_of(p),
        {"countermeasures": ["sharpen"]},
        422,
        "options.countermeasures[0]: 'sharpen' is not offered over HTTP",
    ),
    (
        "another base model",
        lambda p: files_of(p),
        {"base_model": "sd15"},
        422,
        "options.base_model",
    ),
]


@pytest.mark.parametrize("label,files,options,status,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_with_a_named_problem(
    service, photos, label, files, options, status, message
):
    response = post(f"{service}/v1/score", files(photos), options)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert healthy(service)


def test_bad_options_json_and_a_non_multipart_body(service, photos):
    response = requests.post(
        f"{service}/v1/score", files=files_of(photos), data={"options": "{not json"}, timeout=60
    )
    assert response.status_code == 422 and "options: not valid JSON" in response.json()["error"]
    response = requests.post(f"{service}/v1/score", json={"protected": []}, timeout=60)
    assert response.status_code == 415 and "multipart/form-data" in response.json()["error"]


def test_token_is_required_when_configured_and_never_echoed(service, photos):
    url = f"{service}/secure/v1/score"
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = post(url, files_of(photos), FAST, headers=headers)
        assert response.status_code == 401 and TOKEN not in response.text
    ok = post(url, files_of(photos), FAST, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and TOKEN not in ok.text
    assert post(f"{service}/v1/score", files_of(photos), FAST).status_code == 200  # open app


def test_fifty_concurrent_requests_are_all_answered(service, photos):
    one = [("protected", ("p.png", photos["protected"][0], "image/png"))]
    bad = [("protected", ("a.txt", b"nope", "text/plain"))]

    def call(i):
        return post(f"{service}/v1/score", bad if i % 5 == 0 else one, {"countermeasures": []})

    before = requests.get(f"{service}/healthz", timeout=30).json()["scored"]
    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(call, range(50)))
    codes = [r.status_code for r in answers]
    assert len(codes) == 50 and all(c < 500 for c in codes)
    assert codes.count(415) == 10 and codes.count(200) == 40
    assert healthy(service)
    # requests were scored together (serve.batch), and batching never changed a number
    after = requests.get(f"{service}/healthz", timeout=30).json()["scored"]
    assert after["requests"] - before["requests"] == 40
    assert after["batches"] - before["batches"] < 40
    bodies = [r.json()["photos"] for r in answers if r.status_code == 200]

    assert all(body == bodies[0] for body in bodies)


EVALUATION = {
    "attack": {"name": "lora", "steps": 2, "prior_weight": 0},
    "sampling": {"name": "cfg", "steps": 2, "images_per_prompt": 1},
    "metrics": ["fdfr", "psnr"],
}


def test_evaluation_lifecycle_submit_poll_done_rows(service, photos):
    files = files_of(photos, ("protected",)) + [
        ("references", (f"r{i}.png", b, "image/png")) for i, b in enumerate(photos["clean"])
    ]
    submitted = post(f"{service}/v1/evaluations", files, EVALUATION)
    assert submitted.status_code == 202, submitted.text
    evaluation = submitted.json()["id"]
    assert submitted.json()["status"] in ("queued", "running", "done")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        body = requests.get(f"{service}/v1/evaluations/{evaluation}", timeout=30).json()
        if body["status"] not in ("queued", "running"):
            break
        time.sleep(1)
    assert body["status"] == "done", body
    rows = {r["metric"]: r for r in body["rows"]}
    assert {"fdfr", "psnr"} <= set(rows) and rows["fdfr"]["spec_id"] == evaluation
    assert rows["fdfr"]["defense"] == "none" and rows["fdfr"]["dataset"] == "uploads"
    again = post(f"{service}/v1/evaluations", files, EVALUATION).json()
    assert again == {"id": evaluation, "status": "done"}  # same upload, same id, no rerun
    # its generated images, served as PNG (2 prompts x 1 image), behind the same token
    assert body["images"] == [f"/v1/evaluations/{evaluation}/images/{k}.png" for k in (0, 1)]
    first = requests.get(f"{service}{body['images'][0]}", timeout=30)
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(first.content)).size == (64, 64)
    images = f"{service}/v1/evaluations/{evaluation}/images"
    for missing in ("2.png", "x.png", "0.jpg", "-1.png", "\u00b2.png"):
        assert requests.get(f"{images}/{missing}", timeout=30).status_code == 404, missing
    unknown = f"{service}/v1/evaluations/0123456789abcdef/images/0.png"
    assert requests.get(unknown, timeout=30).status_code == 404
    assert (
        requests.get(f"{service}/v1/evaluations/nope/images/0.png", timeout=30).status_code == 422
    )
    secure = f"{service}/secure/v1/evaluations/{evaluation}/images/0.png"
    assert requests.get(secure, timeout=30).status_code == 401
    allowed = requests.get(secure, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert allowed.status_code == 200 and allowed.content == first.content


def test_evaluation_requests_are_checked(service, photos):
    only_protected = files_of(photos, ("protected",))
    response = post(f"{service}/v1/evaluations", only_protected, EVALUATION)
    assert response.status_code == 422 and "references: clean photos" in response.json()["error"]
    with_refs = only_protected + [("references", ("r.png", photos["clean"][0], "image/png"))]
    response = post(
        f"{service}/v1/evaluations", with_refs, {"attack": {"name": "lora", "stepz": 1}}
    )
    assert response.status_code == 422 and "stepz" in response.json()["error"]
    response = post(f"{service}/v1/evaluations", with_refs, {"defense": "aspl"})
    assert response.status_code == 422 and "options.defense: unknown" in response.json()["error"]
    assert requests.get(f"{service}/v1/evaluations/0123456789abcdef", timeout=30).status_code == 404
    assert requests.get(f"{service}/v1/evaluations/nope", timeout=30).status_code == 422
    assert healthy(service)


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"max_requests": 0}, "max_requests"),
        ({"micro_batch": 2.5}, "micro_batch"),
        ({"wait_s": -1}, "wait_s"),
    ],
)
def test_bad_batching_settings_are_named(settings, field):
    from antipers.cluster.batching import Batching

    with pytest.raises(ValueError, match=f"batching.{field}"):
        Batching(**settings)
    resolved = Batching().resolved(torch.device("cpu"))
    assert (resolved.max_requests, resolved.micro_batch) == (1, 4)
    assert Batching().resolved(torch.device("cuda")).max_requests == 8
