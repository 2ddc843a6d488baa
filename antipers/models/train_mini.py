"""Training ``mini-faces``: ``antipers models train-mini --out DIR`` reproduces the weights.

Stages, each resumable: a pool of generator faces (``training_faces``: a numpy
stream of its own, so no person of any ``synthetic`` dataset), the VAE on those faces,
the pool's latents, the UNet on them with the protocol's class prompts and prompt
dropout, then the export (a diffusers folder with a manifest, a model card
and its loss curves). Every step's randomness comes from a generator seeded by (seed,
stage, step), so a run resumed from a checkpoint continues exactly as an uninterrupted
one would. Here the stages run in order; ``mini_recipe`` holds them, ``mini_card`` the
export, ``training_loop`` and ``training_run`` what train-embedder shares.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from antipers.models.mini_card import evaluate, export
from antipers.models.mini_faces import MINI_TEXT, MINI_UNET, MINI_VAE
from antipers.models.mini_recipe import (
    MiniTrainConfig,
    face_pool,
    pool_latents,
    train_unet,
    train_vae,
)
from antipers.models.random_init import build_random_bundle
from antipers.models.training_run import check_same_run, read_json, timed_stage


def train_mini(
    out: Path, config: MiniTrainConfig | None = None, device: torch.device | None = None
) -> Path:
    """Train (or resume) into ``out/work`` and export ``out/mini-faces`` (default
    settings: the shipped weights')."""
    config = config or MiniTrainConfig()
    device = device or torch.device("cpu")
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    check_same_run(work / "config.json", config)
    (work / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
    timings: dict[str, float] = read_json(work / "timings.json")

    def timed(stage: str, fn: Callable[[], Any]) -> Any:
        return timed_stage(work, timings, stage, fn)

    torch.manual_seed(config.seed)
    bundle = build_random_bundle(
        "mini-faces", unet=MINI_UNET, vae=MINI_VAE, text=MINI_TEXT, seed=config.seed
    ).to(device)
    bundle.mixed_precision = False  # fp32 masters and fp32 numbers, on any device
    pool = timed("pool", lambda: face_pool(work, config))
    timed("vae", lambda: train_vae(bundle, pool, work, config))
    mean, std = timed("latents", lambda: pool_latents(bundle, pool, work, config))
    bundle.vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    timed("unet", lambda: train_unet(bundle, mean, std, work, config))
    cpu = bundle.to(torch.device("cpu"))
    report = timed("evaluate", lambda: evaluate(cpu, config.eval_identities, config.eval_samples))
    report["posterior"] = {  # SD's VAE: posterior std small against the latents' spread
        "latent_std_over_pool": float(mean.std()),
        "mean_posterior_std": float(std.mean()),
    }
    return export(cpu, out / "mini-faces", config, timings, report, work)
