"""Shared fixtures: the tiny base model, built once; the real sample photos where present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(
    os.environ.get("ANTIPERS_SAMPLE_DATA", REPO.parent / "shared" / "data" / "vggface2-sample")
)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Class images and other caches go to a per-session folder, never ~/.cache."""
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("ANTIPERS_CACHE_DIR")
    os.environ["ANTIPERS_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("ANTIPERS_CACHE_DIR", None)
    else:
        os.environ["ANTIPERS_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_bundle():
    from antipers.models.tiny import TinyModel

    return TinyModel(seed=0).load(torch.device("cpu"))


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    if not (SAMPLE / "n000050" / "set_A").is_dir():
        pytest.skip(
            f"real sample photos not found at {SAMPLE} (they exist only on the build machines)"
        )
    return SAMPLE


@pytest.fixture
def unet_passes(monkeypatch):
    """Images in each training pass (``training._chunked_loss``), in order."""
    from antipers.attacks import training

    passes: list[int] = []
    real = training._chunked_loss

    def spy(bundle, chunks, *args):
        passes.append(sum(len(c.latents) for c in chunks))
        return real(bundle, chunks, *args)

    monkeypatch.setattr(training, "_chunked_loss", spy)
    return passes


def eval_loss(bundle, images, draws=8, seed=1234, prompt="a photo of sks person"):
    """The denoising loss on ``images`` averaged over fixed noise and timesteps."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        embeds = bundle.prompt_embeds([prompt] * len(images))
        latents = bundle.encode(images)
        return sum(float(bundle.training_loss(latents, embeds, gen)) for _ in range(draws)) / draws


def tiny_spec_dict(**overrides):
    """A fast experiment: tiny model, synthetic people, a few LoRA and DDIM steps."""
    base = {
        "suite": "test",
        "base_model": "tiny",
        "dataset": {"name": "synthetic", "n_identities": 2},
        "identity": "synth-0001",
        "attack": {"name": "lora", "steps": 3, "prior_weight": 0.0},
        "sampling": {"name": "cfg", "steps": 3, "images_per_prompt": 1},
        "resolution": 64,
    }
    base.update(overrides)
    return base


_RAY: dict[str, str] = {}  # the address of the instance ray_address started


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray instance (4 logical CPUs, a small object store), kept for the next
    module that needs one (a start costs about 10 s on 2 cores; Ray shuts it down at
    exit); its GCS address, for drivers run as subprocesses. Started again where a test
    shut it down or joined another instance."""
    import ray

    from antipers.cluster.runtime import connect

    if ray.is_initialized() and ray.get_runtime_context().gcs_address != _RAY.get("address"):
        ray.shutdown()
    if not ray.is_initialized():
        connect(num_cpus=4, object_store_memory=150 * 2**20)
        _RAY["address"] = ray.get_runtime_context().gcs_address
    return _RAY["address"]
