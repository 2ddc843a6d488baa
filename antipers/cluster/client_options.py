"""What an HTTP client may ask of the scoring service, and how much work.

A client names components and parameters in ``options``; only those listed in
``ALLOWED`` are accepted. None of them names a file or folder (``path``,
``weights``, ``root``, ``target_image``, ``paired_dir``, ``save_to``, ...): which
files the service reads is the operator's choice, made in the Serve config. The work
one request can start is bounded by ``Limits`` (the config's ``limits:``), and every
refusal names the option and the limit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from antipers.errors import UserError
from antipers.spec import ExperimentSpec

_TRAINING = frozenset(
    {
        "steps",
        "lr",
        "batch_size",
        "lr_schedule",
        "warmup_steps",
        "max_grad_norm",
        "prior_weight",
        "train_text_encoder",
        "gradient_checkpointing",
        "instance_prompt",
        "class_prompt",
        "num_class_images",
        "class_seed",
        "class_steps",
    }
)
_FACES = frozenset({"backend"})

# kind -> component -> the parameters a client may set
ALLOWED: dict[str, dict[str, frozenset[str]]] = {
    "attacks": {
        "dreambooth": _TRAINING,
        "lora": _TRAINING | {"rank", "alpha", "target_modules", "text_target_modules"},
    },
    "countermeasures": {
        "none": frozenset(),
        "blur": frozenset({"kernel", "sigma"}),
        "flip": frozenset({"p"}),
        "jpeg": frozenset({"quality"}),
        "resize": frozenset({"factor", "mode"}),
        "purify": frozenset({"t", "steps"}),
    },
    "samplers": {
        "cfg": frozenset({"prompts", "images_per_prompt", "steps", "guidance", "scheduler"}),
    },
    # metrics whose weights come from a path take none here: the service's defaults
    "metrics": {
        "fdfr": _FACES,
        "ism": _FACES,
        "serfiq": _FACES,
        "brisque": frozenset({"implementation"}),
        "piqe": frozenset(),
        "clipiqa": frozenset(),
        "liqe": frozenset(),
        "topiq-face": frozenset(),
        "psnr": frozenset(),
        "ssim": frozenset(),
        "linf": frozenset(),
        "lpips": frozenset(),
        "clip-i": frozenset(),
        "clip-t": frozenset(),
        "dino": frozenset(),
        "fid": frozenset(),
    },
}


class OptionError(UserError, ValueError):
    """A request option the service does not accept; the message names it."""


@dataclass(frozen=True)
class Limits:
    """Per request. The defaults fit the default service (a small model on a CPU);
    raise them in the Serve config's ``limits:`` for a GPU replica."""

    max_images: int = 16  # per upload field
    max_bytes: int = 32 * 2**20
    max_pixels: int = 4096 * 4096  # per image, read from the header before decoding
    max_attack_steps: int = 400
    max_class_images: int = 50  # prior preservation's generated class images
    max_sampling_steps: int = 100  # per generated image (class images included)
    max_sampling_images: int = 32  # generated for scoring
    max_countermeasures: int = 3  # in a chain (/v1/evaluations) or a list (/v1/score)
    max_purify_steps: int = 50
    max_lora_rank: int = 64
    max_batch_size: int = 8

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> Limits:
        """From the Serve config's ``limits:``; errors name the key."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise OptionError(f"limits: expected a mapping, got {type(raw).__name__}")
        fields = [f.name for f in dataclasses.fields(cls)]
        for key, value in raw.items():
            if key not in fields:
                raise OptionError(f"limits.{key}: unknown; use {', '.join(fields)}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"limits.{key}: expected a whole number >= 1, got {value!r}")
        return cls(**raw)


def check_component(kind: str, value: Any, where: str) -> None:
    """``value`` is a name or ``{name: ..., **params}`` as a client sent it."""
    offered = ALLOWED[kind]
    if isinstance(value, str):
        name, params = value, {}
    elif isinstance(value, Mapping):
        params = {k: v for k, v in value.items() if k != "name"}
        name = value.get("name")
    else:
        raise OptionError(f"{where}: expected a name or an object with 'name'")
    if not isinstance(name, str) or name not in offered:
        raise OptionError(
            f"{where}: {name!r} is not offered over HTTP; use {', '.join(sorted(offered))}"
        )
    refused = sorted(set(params) - offered[name])
    if refused:
        allowed = ", ".join(sorted(offered[name])) or "none"
        raise OptionError(f"{where}.{refused[0]}: not accepted over HTTP; {name} accepts {allowed}")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def check_evaluation_options(options: Mapping[str, Any], limits: Limits) -> None:
    """The options of ``/v1/evaluations`` (attack, countermeasure, sampling, metrics)."""
    if "attack" in options:
        check_component("attacks", options["attack"], "options.attack")
    if "countermeasure" in options:
        chain = options["countermeasure"]
        check_countermeasures(_as_list(chain), limits, "options.countermeasure")
    if "sampling" in options:
        check_component("samplers", options["sampling"], "options.sampling")
    if "metrics" in options:
        metrics = options["metrics"]
        if not isinstance(metrics, list):
            raise OptionError("options.metrics: expected a list of metric names")
        for i, metric in enumerate(metrics):
            check_component("metrics", metric, f"options.metrics[{i}]")


def check_countermeasures(
    entries: Sequence[Any], limits: Limits, where: str, offered_only: bool = True
) -> None:
    if len(entries) > limits.max_countermeasures:
        raise OptionError(
            f"{where}: {len(entries)} countermeasures exceed this service's limit of "
            f"{limits.max_countermeasures} (limits.max_countermeasures)"
        )
    for i, entry in enumerate(entries):
        if offered_only:
            check_component("countermeasures", entry, f"{where}[{i}]")
        if isinstance(entry, Mapping) and entry.get("name") == "purify":
            _at_most(
                entry.get("steps", 0),
                limits.max_purify_steps,
                f"{where}[{i}].steps",
                "max_purify_steps",
            )


def _at_most(value: Any, limit: int, where: str, name: str) -> None:
    if isinstance(value, int | float) and value > limit:
        raise OptionError(
            f"{where}: {value:g} exceeds this service's limit of {limit} (limits.{name})"
        )


def check_work(spec: ExperimentSpec, limits: Limits) -> None:
    """The work one evaluation starts, with every default filled in."""
    attack = spec.attack.kwargs
    _at_most(attack.get("rank", 0), limits.max_lora_rank, "options.attack.rank", "max_lora_rank")
    _at_most(
        attack.get("batch_size", 0) * attack.get("grad_accum", 1),
        limits.max_batch_size,
        "options.attack.batch_size",
        "max_batch_size",
    )
    _at_most(
        attack.get("steps", 0), limits.max_attack_steps, "options.attack.steps", "max_attack_steps"
    )
    if attack.get("prior_weight", 0) > 0:
        _at_most(
            attack.get("num_class_images", 0),
            limits.max_class_images,
            "options.attack.num_class_images",
            "max_class_images",
        )
        _at_most(
            attack.get("class_steps", 0),
            limits.max_sampling_steps,
            "options.attack.class_steps",
            "max_sampling_steps",
        )
    sampling = spec.sampling.kwargs
    _at_most(
        sampling.get("steps", 0),
        limits.max_sampling_steps,
        "options.sampling.steps",
        "max_sampling_steps",
    )
    images = len(sampling.get("prompts", ())) * sampling.get("images_per_prompt", 0)
    _at_most(
        images,
        limits.max_sampling_images,
        "options.sampling (prompts x images_per_prompt)",
        "max_sampling_images",
    )
    chain = [c.to_dict() for c in spec.countermeasure]
    check_countermeasures(chain, limits, "options.countermeasure", offered_only=False)
