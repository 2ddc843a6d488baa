"""Noisy Upscaling (Hönig et al., ICLR 2025), the robust-mimicry countermeasure that
undid every protection they tested: Gaussian noise on the photo, then a diffusion
upscaler, which re-synthesizes the fine detail the perturbation lives in. The
upscaled photo is resized back to the size the attacker trains at.

The upscaler is a diffusers folder in the layout of Stable Diffusion's x4 upscaler
(``StableDiffusionUpscalePipeline``: ``unet/`` with 7 input channels, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``low_res_scheduler/``), loaded
from ``path`` with local files only. Without one, the experiment is stored as
``unavailable`` with the reason, as a metric without weights is.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F

from antipers.attacks.countermeasures import NOISE_SIGMA, AttackEnv, Noise
from antipers.errors import ComponentUnavailable
from antipers.ranges import Checked, Range

REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "low_res_scheduler")


@functools.lru_cache(maxsize=1)
def load_upscaler(path: str, device: str) -> Any:
    from diffusers import StableDiffusionUpscalePipeline

    pipe = StableDiffusionUpscalePipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def check_folder(path: str) -> Path:
    if not path:
        raise ComponentUnavailable(
            "upscale: no upscaler configured; set path to a diffusers folder in the SD x4 "
            "upscaler layout (stabilityai/stable-diffusion-x4-upscaler)"
        )
    folder = Path(path).expanduser()
    missing = [part for part in REQUIRED if not (folder / part).is_dir()]
    if not (folder / "model_index.json").is_file():
        missing.insert(0, "model_index.json")
    if missing:
        raise ComponentUnavailable(
            f"upscale: {folder} is not an SD x4 upscaler folder (missing {', '.join(missing)})"
        )
    return folder


@dataclass(frozen=True)
class Upscale(Checked):
    """Noise of ``sigma`` (pixel units over 255; 0: none), then the upscaler from
    ``path`` (``steps`` denoising steps, ``noise_level`` its own low-res noise, guidance
    ``guidance`` on ``prompt``), then back to the photo's size."""

    path: str = ""
    sigma: Annotated[float, NOISE_SIGMA] = 12.75
    steps: Annotated[int, Range(ge=1)] = 20
    noise_level: Annotated[int, Range(ge=0, le=350, note="the upscaler's range")] = 20
    guidance: float = 9.0
    prompt: str = ""

    def apply(self, images: torch.Tensor, env: AttackEnv) -> torch.Tensor:
        folder = check_folder(self.path)
        noisy = Noise(self.sigma).apply(images, env)
        device = env.bundle.device
        pipe = load_upscaler(str(folder.resolve()), str(device))
        seed = int(torch.randint(2**31 - 1, (1,), generator=env.generator))
        with torch.no_grad():
            out = pipe(
                prompt=[self.prompt] * len(noisy),
                image=noisy.to(device),
                num_inference_steps=self.steps,
                guidance_scale=self.guidance,
                noise_level=self.noise_level,
                generator=torch.Generator(device="cpu").manual_seed(seed),
                output_type="pt",
            ).images
        size = images.shape[-2:]
        down = F.interpolate(out.float(), size=size, mode="bicubic", antialias=True)
        return down.clamp(0, 1).to(images.device)
