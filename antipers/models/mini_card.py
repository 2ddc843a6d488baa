"""What the ``mini-faces`` export records: the model card's measurements
(``evaluate``), the card, the loss figure and the manifest, in a folder renamed into
place."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from antipers.models.bundle import DiffusionBundle
from antipers.models.mini_faces import MINI_UNET, MINI_VAE, write_manifest
from antipers.models.mini_recipe import CLASS_PROMPTS, MiniTrainConfig
from antipers.models.training_loop import read_losses
from antipers.models.training_run import git_commit, machine, staged_export

MODEL_STAGES = ("vae", "unet")  # mini-faces' own (its card's loss figure)


def evaluate(bundle: DiffusionBundle, identities: int = 8, samples: int = 32) -> dict[str, Any]:
    """What the model card reports: whether reconstructions keep the person (PSNR and
    the offline face backend's cosine, against same- and different-person cosines),
    and whether the base model's generations are faces (FDFR)."""
    import numpy as np

    from antipers.attacks.sampling import generate
    from antipers.data.synthetic import SyntheticDataset
    from antipers.metrics.budget import psnr
    from antipers.metrics.faces import face_backend

    backend = face_backend("offline")
    dataset = SyntheticDataset(n_identities=identities)
    photos = [dataset.faces(i, 64) for i in range(identities)]
    with torch.no_grad():
        recon = [bundle.decode(bundle.encode(p)) for p in photos]
    emb = [backend.embed(p) for p in photos]
    emb_rec = [backend.embed(r) for r in recon]
    pairs = zip(emb, emb_rec, strict=True)
    recon_cos = np.nanmean(np.concatenate([(a * b).sum(axis=1) for a, b in pairs]))
    same, other = [], []
    for i, a in enumerate(emb):
        for j, b in enumerate(emb):
            sims = a @ b.T
            if i == j:
                sims = sims[~np.eye(len(a), dtype=bool)]
            (same if i == j else other).append(np.nanmean(sims))
    gen = torch.Generator().manual_seed(0)
    images = generate(bundle, CLASS_PROMPTS[0], samples, 64, gen, steps=25, guidance=7.5)
    fdfr = float(np.mean([box is None for box in backend.detect(images)]))
    return {
        "vae_psnr_db": float(np.mean(np.concatenate(list(map(psnr, recon, photos))))),
        "face_cosine": {
            "reconstruction_vs_original": float(recon_cos),
            "same_person": float(np.mean(same)),
            "different_person": float(np.mean(other)),
        },
        "base_generations_fdfr": fdfr,
        "backend": backend.name,
        "identities": identities,
        "samples": samples,
    }


def export(
    bundle: DiffusionBundle,
    folder: Path,
    config: MiniTrainConfig,
    timings: dict[str, float],
    report: dict[str, Any],
    work: Path,
) -> Path:
    """The diffusers folder, the card, the loss figure and the manifest, renamed into place."""
    record = {
        "config": dataclasses.asdict(config),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "machine": machine(),
        "commit": git_commit(),
        "evaluation": report,
        "text_encoder": "tiny CLIP text model frozen at its seeded init (seed = config.seed + 2)",
    }

    def write(staging: Path) -> None:
        bundle.save_pretrained(staging)
        (staging / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        _loss_figure(read_losses(work / "losses.csv"), staging / "loss.png")
        (staging / "README.md").write_text(model_card(record))
        write_manifest(staging)

    return staged_export(folder, write)


def model_card(record: dict[str, Any]) -> str:
    ev, cfg = record["evaluation"], record["config"]
    cos, fdfr = ev["face_cosine"], ev["base_generations_fdfr"]
    post = ev["posterior"]
    spread, post_std = post["latent_std_over_pool"], post["mean_posterior_std"]
    hours = sum(record["timings_s"].values()) / 3600
    return f"""# mini-faces

A 64 px miniature Stable Diffusion trained by antipers on synthetic faces, so that
protection can be measured offline. It checks that the benchmark measures what it
should; it is no substitute for numbers on Stable Diffusion.

- VAE: `AutoencoderKL`, 4x down (64 px -> 16x16x4 latents), {MINI_VAE["block_out_channels"]}
  channels; L1 + KL (weight {cfg["kl_weight"]}), {cfg["vae_steps"]} steps of
  {cfg["vae_batch"]}, lr {cfg["vae_lr"]} (cosine).
- UNet: `UNet2DConditionModel`, {MINI_UNET["block_out_channels"]} channels, cross-attention
  at 8x8 and 4x4; epsilon prediction, SD's DDPM scheduler (scaled linear, 1000 steps);
  {cfg["unet_steps"]} steps of {cfg["unet_batch"]}, lr {cfg["unet_lr"]} (cosine, warm-up
  {cfg["warmup_steps"]}), EMA {cfg["ema_decay"]} (the shipped weights).
- Prompts: {", ".join(repr(p) for p in CLASS_PROMPTS)}, dropped to "" with probability
  {cfg["prompt_dropout"]} (classifier-free guidance).
- Text encoder: {record["text_encoder"]}, with the real CLIP tokenizer.
- Data: {cfg["pool"]} faces of the DCGAN generator that `gan-face-generate` ships, one
  person each: the un-nudged latent of person k of numpy's PCG64 under the
  SeedSequence `[TRAINING_STREAM, k]`, a generator no `synthetic` identity draws
  from (those are torch-seeded), so every evaluation identity is a person the model
  never saw (`antipers/data/synthetic.py`).
- Trained on {record["machine"]} in {hours:.2f} h
  ({", ".join(f"{k} {v:.0f} s" for k, v in record["timings_s"].items())}), training code at
  commit `{record["commit"]}`. Reproduce: `antipers models train-mini --out DIR`.

## Measured (offline face backend `{ev["backend"]}`, {ev["identities"]} synthetic identities)

| what | value |
|---|---|
| VAE reconstruction PSNR | {ev["vae_psnr_db"]:.1f} dB |
| face cosine, reconstruction vs its original | {cos["reconstruction_vs_original"]:.3f} |
| face cosine, two photos of one person | {cos["same_person"]:.3f} |
| face cosine, photos of two people | {cos["different_person"]:.3f} |
| FDFR of {ev["samples"]} base generations of "{CLASS_PROMPTS[0]}" | {fdfr:.3f} |
| latent std over the pool / mean posterior std | {spread:.3f} / {post_std:.4f} |

Generations for the FDFR: 25 DDIM steps, guidance 7.5.

What the numbers mean: the generator's photos of one identity are nearly the same face
in the same pose and light (nudge 0.15), so "learning the person" here is easier than
on CelebA-HQ, and same-person similarities are higher than real photos give. Different
synthetic people are clearly different to the face recognizer, so linkability against a
gallery of them is meaningful. Loss curves: `loss.png`.

![loss curves](loss.png)
"""


def _loss_figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(MODEL_STAGES), figsize=(9, 3))
    for ax, stage in zip(axes, MODEL_STAGES, strict=True):
        losses = np.array([float(r["loss"]) for r in rows if r["stage"] == stage])
        if len(losses):
            window = max(1, len(losses) // 50)
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(losses, alpha=0.25, lw=0.5)
            ax.plot(np.arange(len(smooth)) + window // 2, smooth)
        ax.set(title=f"{stage} loss", xlabel="step", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
