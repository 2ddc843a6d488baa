"""Training ``mini-faces``: ``antipers models train-mini --out DIR`` reproduces the weights.

Stages, each resumable: a pool of generator faces (``training_faces``: a numpy
stream of its own, so no person of any ``synthetic`` dataset), the VAE on those faces,
the pool's latents, the UNet on them with the protocol's class prompts and prompt
dropout, then the export (a diffusers folder with a manifest, a model card
and its loss curves). Every step's randomness comes from a generator seeded by (seed,
stage, step), so a run resumed from a checkpoint continues exactly as an uninterrupted
one would.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from antipers.errors import UserError
from antipers.models.bundle import DiffusionBundle
from antipers.models.mini_faces import MINI_TEXT, MINI_UNET, MINI_VAE, write_manifest
from antipers.models.random_init import build_random_bundle

log = logging.getLogger(__name__)

CLASS_PROMPTS = ("a photo of person", "a dslr portrait of person")
STAGES = ("vae", "unet", "embedder")  # the index seeds each stage's draws
MODEL_STAGES = ("vae", "unet")  # mini-faces' own (its card's loss figure)


@dataclass(frozen=True)
class MiniTrainConfig:
    """Everything that determines the weights; recorded in the model card."""

    seed: int = 0
    pool: int = 24576  # training faces, one person each
    resolution: int = 64
    vae_steps: int = 1000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6  # on the KL summed over a latent, against the per-pixel L1
    unet_steps: int = 4800
    unet_batch: int = 32
    unet_lr: float = 4e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1
    checkpoint_every_s: float = 120.0
    eval_identities: int = 8  # for the model card's numbers
    eval_samples: int = 32

    def __post_init__(self) -> None:
        for name in ("pool", "vae_steps", "vae_batch", "unet_steps", "unet_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"train-mini: {name} must be >= 1, got {getattr(self, name)}")
        if self.resolution % 16:
            raise ValueError(f"train-mini: resolution must be a multiple of 16: {self.resolution}")
        if not 0 <= self.prompt_dropout < 1:
            raise ValueError(f"train-mini: prompt_dropout must be in [0, 1): {self.prompt_dropout}")


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 7_919 + STAGES.index(stage)) * 10_000_019 + step)


# ---- the pool ----------------------------------------------------------------------------
def face_pool(work: Path, config: MiniTrainConfig, chunk: int = 512) -> torch.Tensor:
    """``(pool, 3, R, R)`` uint8 training faces, generated once and cached in ``work``."""
    from antipers.data.synthetic import training_faces

    def build() -> torch.Tensor:
        parts = []
        for start in _progress(range(0, config.pool, chunk), "faces", unit_scale=chunk):
            n = min(chunk, config.pool - start)
            parts.append(to_uint8(training_faces(start, n, config.resolution)))
        return torch.cat(parts)

    return cached(work / f"pool-{config.pool}-{config.resolution}.pt", build)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round().to(torch.uint8)


def cached(path: Path, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Generating faces takes minutes: do it once per work folder, saved atomically."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    tensor = build()
    _atomic_save(tensor, path)
    return tensor


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0


# ---- the shared resumable loop -------------------------------------------------------------
@dataclass
class Loop:
    """One stage's trainable state; ``step_fn(step, generator) -> loss`` does the work."""

    stage: str
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any
    steps: int
    ema: Any = None


def run_loop(
    loop: Loop,
    step_fn: Callable[[int, torch.Generator], torch.Tensor],
    work: Path,
    config: Any,
    max_grad_norm: float = 1.0,
) -> None:
    """Train from the stage's last checkpoint to ``loop.steps``: checkpoint every
    ``checkpoint_every_s`` and at the end, one loss-log line per step. ``config``: any
    training configuration with ``seed`` and ``checkpoint_every_s``."""
    ckpt = work / f"{loop.stage}.ckpt"
    start = _restore(loop, ckpt)
    losses = _LossLog(work / "losses.csv", loop.stage, keep_until=start)
    last_save = time.monotonic()
    loop.module.train()
    bar = _progress(range(start, loop.steps), loop.stage, initial=start, total=loop.steps)
    for step in bar:
        loss = step_fn(step, step_generator(config.seed, loop.stage, step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(loop.module.parameters(), max_grad_norm)
        loop.optimizer.step()
        lr = loop.schedule.get_last_lr()[0]  # this step's, before the schedule moves on
        loop.schedule.step()
        loop.optimizer.zero_grad(set_to_none=True)
        if loop.ema is not None:
            loop.ema.step(loop.module.parameters())
        value = loss.item()
        losses.add(step, value, lr)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        if time.monotonic() - last_save > config.checkpoint_every_s or step + 1 == loop.steps:
            losses.flush()
            _checkpoint(loop, step + 1, ckpt)
            last_save = time.monotonic()
    losses.flush()
    loop.module.eval()


def _checkpoint(loop: Loop, step: int, path: Path) -> None:
    state = {
        "step": step,
        "module": loop.module.state_dict(),
        "optimizer": loop.optimizer.state_dict(),
        "schedule": loop.schedule.state_dict(),
        "ema": loop.ema.state_dict() if loop.ema is not None else None,
    }
    _atomic_save(state, path)


def _restore(loop: Loop, path: Path) -> int:
    if not path.is_file():
        return 0
    state = torch.load(path, weights_only=False, map_location="cpu")
    loop.module.load_state_dict(state["module"])
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.schedule.load_state_dict(state["schedule"])
    if loop.ema is not None and state["ema"] is not None:
        loop.ema.load_state_dict(state["ema"])
    log.info("%s: resumed at step %d from %s", loop.stage, state["step"], path)
    return int(state["step"])


class _LossLog:
    """``losses.csv`` (stage, step, loss, lr); lines past a restored checkpoint dropped."""

    FIELDS = ("stage", "step", "loss", "lr")

    def __init__(self, path: Path, stage: str, keep_until: int) -> None:
        self.path, self.stage = path, stage
        rows = _read_losses(path)
        kept = [r for r in rows if r["stage"] != stage or int(r["step"]) < keep_until]
        self._write(kept, "w")
        self._pending: list[dict[str, Any]] = []

    def add(self, step: int, loss: float, lr: float) -> None:
        self._pending.append({"stage": self.stage, "step": step, "loss": loss, "lr": lr})

    def flush(self) -> None:
        self._write(self._pending, "a")
        self._pending = []

    def _write(self, rows: list[dict[str, Any]], mode: str) -> None:
        new = mode == "w" or not self.path.is_file()
        with self.path.open(mode, newline="") as fh:
            writer = csv.DictWriter(fh, self.FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)


def _read_losses(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


# ---- the two models --------------------------------------------------------------------------
def _optimizer(module: torch.nn.Module, lr: float, steps: int, warmup: int) -> tuple[Any, Any]:
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=1e-2)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    return optimizer, schedule


def train_vae(bundle: DiffusionBundle, pool: torch.Tensor, work: Path, config: MiniTrainConfig):
    """L1 reconstruction of posterior samples plus a small KL (SD's recipe without the
    perceptual and adversarial terms, which need weights we do not have)."""
    vae = bundle.vae.requires_grad_(True)
    optimizer, schedule = _optimizer(vae, config.vae_lr, config.vae_steps, config.warmup_steps)

    def step(i: int, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(pool), (config.vae_batch,), generator=gen)
        x = _as_float(pool[idx]).to(bundle.device) * 2 - 1
        dist = vae.encode(x).latent_dist
        noise = torch.randn(dist.mean.shape, generator=gen).to(x.device)
        recon = vae.decode(dist.mean + dist.std * noise).sample
        return F.l1_loss(recon, x) + config.kl_weight * dist.kl().mean()

    run_loop(Loop("vae", vae, optimizer, schedule, config.vae_steps), step, work, config)
    vae.requires_grad_(False).eval()


@torch.no_grad()
def pool_latents(
    bundle: DiffusionBundle, pool: torch.Tensor, work: Path, config: MiniTrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and stds of the whole pool (cached), in unscaled VAE units."""
    path = work / "latents.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return saved["mean"], saved["std"]
    means, stds = [], []
    for start in _progress(range(0, len(pool), 256), "latents", unit_scale=256):
        x = _as_float(pool[start : start + 256]).to(bundle.device) * 2 - 1
        dist = bundle.vae.encode(x).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    _atomic_save({"mean": mean, "std": std}, path)
    return mean, std


def train_unet(
    bundle: DiffusionBundle,
    mean: torch.Tensor,
    std: torch.Tensor,
    work: Path,
    config: MiniTrainConfig,
) -> None:
    """Epsilon prediction on scaled latents with the class prompts, a share of them
    dropped to "" so classifier-free guidance works; the EMA weights are what ship."""
    from diffusers.training_utils import EMAModel

    unet = bundle.unet.requires_grad_(True)
    optimizer, schedule = _optimizer(unet, config.unet_lr, config.unet_steps, config.warmup_steps)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=0.75)
    with torch.no_grad():
        prompts = bundle.prompt_embeds(["", *CLASS_PROMPTS])  # (3, 77, D), text encoder frozen
    scale = bundle.scaling_factor

    def step(i: int, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(mean), (config.unet_batch,), generator=gen)
        noise = torch.randn(mean[idx].shape, generator=gen)
        latents = ((mean[idx] + std[idx] * noise) * scale).to(bundle.device)
        which = torch.randint(1, len(prompts), (len(idx),), generator=gen)
        dropped = torch.rand(len(idx), generator=gen) < config.prompt_dropout
        embeds = prompts[torch.where(dropped, 0, which)]
        return bundle.training_loss(latents, embeds, gen)

    loop = Loop("unet", unet, optimizer, schedule, config.unet_steps, ema=ema)
    run_loop(loop, step, work, config)
    ema.copy_to(unet.parameters())
    unet.requires_grad_(False).eval()


# ---- the whole run ---------------------------------------------------------------------------
def train_mini(
    out: Path, config: MiniTrainConfig = MiniTrainConfig(), device: torch.device | None = None
) -> Path:
    """Train (or resume) into ``out/work`` and export ``out/mini-faces``."""
    device = device or torch.device("cpu")
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    _check_same_run(work / "config.json", config)
    (work / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
    timings: dict[str, float] = _read_json(work / "timings.json")

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


def timed_stage(work: Path, timings: dict[str, float], stage: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; add its time to ``timings`` and ``work/timings.json``, so a resumed
    training reports the time of all its runs."""
    t0 = time.monotonic()
    value = fn()
    timings[stage] = timings.get(stage, 0.0) + time.monotonic() - t0
    (work / "timings.json").write_text(json.dumps(timings, indent=1))
    return value


# settings that do not change the weights: a resumed run may differ in them
_NOT_WEIGHTS = {"checkpoint_every_s", "eval_identities", "eval_samples"}


def _check_same_run(path: Path, config: Any, command: str = "train-mini") -> None:
    """Checkpoints in ``work`` belong to one configuration; resuming them under other
    settings would mix two trainings."""
    before = _read_json(path)
    now = dataclasses.asdict(config)
    changed = sorted(
        k for k in now if k not in _NOT_WEIGHTS and k in before and before[k] != now[k]
    )
    if changed:
        diff = ", ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in changed)
        raise UserError(
            f"{command}: {path.parent} holds a training with other settings ({diff}); "
            "give another --out, or the same settings to resume it"
        )


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
        "commit": _commit(),
        "evaluation": report,
        "text_encoder": "tiny CLIP text model frozen at its seeded init (seed = config.seed + 2)",
    }

    def write(staging: Path) -> None:
        bundle.save_pretrained(staging)
        (staging / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        _loss_figure(_read_losses(work / "losses.csv"), staging / "loss.png")
        (staging / "README.md").write_text(model_card(record))
        write_manifest(staging)

    return staged_export(folder, write)


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def staged_export(folder: Path, write: Callable[[Path], None]) -> Path:
    """``write`` fills a staging folder beside ``folder``, which then replaces it: a crash
    leaves the old export or none, never half of one."""
    staging = folder.with_name(f".{folder.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write(staging)
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        staging.rename(folder)
        shutil.rmtree(old)
    else:
        staging.rename(folder)
    return folder


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


# ---- small helpers ---------------------------------------------------------------------------
def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "antipers"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{sha}{' (uncommitted changes)' if dirty else ''}" if sha else "unknown"


def _progress(iterable: Any, desc: str, **kwargs: Any) -> Any:
    from tqdm import tqdm

    unit_scale = kwargs.pop("unit_scale", None)
    if unit_scale:
        kwargs["unit"] = f"x{unit_scale}"
    return tqdm(iterable, desc=desc, mininterval=5, **kwargs)
