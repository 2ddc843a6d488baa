"""LoRA DreamBooth: the cheap attacker. Low-rank adapters (peft) on the attention
projections of copies of the UNet and, optionally, the text encoder."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Annotated

import torch

from antipers.attacks.personalize import Personalization
from antipers.models.bundle import DiffusionBundle
from antipers.ranges import Range

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class LoRADreamBooth(Personalization):
    """LoRA DreamBooth (protocol: rank 4+, lr 1e-4, 1000-2000 steps); base weights untouched."""

    lr: float = 1e-4
    train_text_encoder: bool = False
    rank: Annotated[int, Range(ge=1)] = 4
    alpha: Annotated[float, Range(gt=0)] = 4.0
    target_modules: tuple[str, ...] = UNET_TARGETS
    text_target_modules: tuple[str, ...] = TEXT_TARGETS

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.target_modules:
            raise ValueError("target_modules: name at least one UNet module")

    def trainable(
        self, bundle: DiffusionBundle, generator: torch.Generator
    ) -> tuple[DiffusionBundle, list[torch.nn.Parameter]]:
        copies = {name: copy.deepcopy(getattr(bundle, name)) for name in self.parts()}
        return bundle.replace(**copies), self.add_adapters(copies, generator)

    def parts(self) -> dict[str, tuple[str, ...]]:
        """The modules that get adapters, by bundle part, and their target layers."""
        parts = {"unet": self.target_modules}
        if self.train_text_encoder:
            parts["text_encoder"] = self.text_target_modules
        return parts

    def add_adapters(
        self, modules: dict[str, torch.nn.Module], generator: torch.Generator
    ) -> list[torch.nn.Parameter]:
        """Adapters on ``modules`` (by part, in ``parts()`` order) in place; returns
        their weights. The same ``generator`` state gives the same adapters whether
        ``modules`` are copies (the attack) or the resident model (a surrogate)."""
        from peft import LoraConfig

        # peft initialises adapters from the global RNG: seed it from ours, locally.
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for name, targets in self.parts().items():
                config = LoraConfig(
                    r=self.rank,
                    lora_alpha=self.alpha,
                    init_lora_weights="gaussian",
                    target_modules=list(targets),
                )
                try:
                    modules[name].add_adapter(config)
                except ValueError as exc:
                    raise ValueError(f"lora on {name}: {exc}") from exc
        return [p for m in modules.values() for p in m.parameters() if p.requires_grad]


def remove_adapters(module: torch.nn.Module) -> None:
    """Every adapter layer back to the layer it wraps (the same module object, so the
    weights are the originals bit for bit), and the module's adapter bookkeeping gone."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(module)
    if hasattr(module, "peft_config"):
        del module.peft_config
    if hasattr(module, "_hf_peft_config_loaded"):
        module._hf_peft_config_loaded = False
