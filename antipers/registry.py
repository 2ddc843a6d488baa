"""Name -> lazy ``"module:attr"`` target.

Importing antipers imports no heavy framework: a component's module is imported
only when its name is resolved. Components are frozen dataclasses whose fields are
their parameters, so a spec can be validated (names, types, defaults) from the
class alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from antipers.errors import UserError
from antipers.ranges import Range, check_ranges, field_ranges

T = TypeVar("T")


class RegistryError(UserError, KeyError):
    """An unknown or duplicate name; ``str()`` is the readable message."""

    def __str__(self) -> str:
        return str(self.args[0])


class SpecError(UserError, ValueError):
    """A spec that cannot describe an experiment; the message names the field, and
    ``field`` is the spec's top-level field it concerns (``defense``, ``seed``, ...) where
    known, so a campaign can point at the line that set it."""

    field: str | None = None


@dataclass(frozen=True)
class Param:
    """One accepted parameter of a component: its name, type, default and range."""

    name: str
    type: Any
    default: Any
    doc: str = ""
    range: Range | None = None

    @property
    def type_name(self) -> str:
        return type_name(self.type)


class Registry(Generic[T]):
    """A small registry of components of one kind (defenses, metrics, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._targets: dict[str, str] = {}
        self._loaded: dict[str, type[T]] = {}

    def register(self, name: str, target: str) -> None:
        if name in self._targets:
            raise RegistryError(
                f"{self.kind} {name!r} is already registered (as {self._targets[name]})"
            )
        if ":" not in target:
            raise ValueError(
                f"target for {self.kind} {name!r} must be 'module:attr', got {target!r}"
            )
        self._targets[name] = target

    def names(self) -> list[str]:
        return sorted(self._targets)

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def get(self, name: str) -> type[T]:
        """The component class for ``name``, imported on first use."""
        if name not in self._targets:
            raise RegistryError(self.unknown_message(name))
        if name not in self._loaded:
            module_name, attr = self._targets[name].split(":", 1)
            self._loaded[name] = getattr(importlib.import_module(module_name), attr)
        return self._loaded[name]

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self._targets, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names())}"

    def params(self, name: str) -> list[Param]:
        return component_params(self.get(name))

    def build(self, name: str, params: dict[str, Any] | None = None) -> T:
        """An instance of ``name`` with ``params`` (validated and normalized)."""
        cls = self.get(name)
        full = validate_params(self.kind, name, cls, params or {})
        try:  # the component's own checks (across fields), named like the ones above
            return cls(**full)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"{self.kind} {name!r}: {exc}") from None


def component_params(cls: type) -> list[Param]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__qualname__} must be a dataclass to be registered")
    hints = typing.get_type_hints(cls)
    ranges = field_ranges(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        out.append(
            Param(f.name, hints[f.name], default, f.metadata.get("doc", ""), ranges.get(f.name))
        )
    return out


def validate_params(kind: str, name: str, cls: type, params: dict[str, Any]) -> dict[str, Any]:
    """Check names and types against ``cls``; fill defaults; coerce to canonical types.

    Canonical types keep ``spec_id`` stable: ``eps: 6`` and ``eps: 6.0`` are the same
    experiment, lists become tuples.
    """
    accepted = {p.name: p for p in component_params(cls)}
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        listing = ", ".join(f"{p.name}: {p.type_name}" for p in accepted.values()) or "none"
        raise SpecError(
            f"{kind} {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"accepted parameters: {listing}"
        )
    out: dict[str, Any] = {}
    for pname, p in accepted.items():
        if pname in params:
            out[pname] = coerce(params[pname], p.type, f"{kind}.{pname}")
        elif p.default is dataclasses.MISSING:
            raise SpecError(f"{kind} {name!r} needs parameter {pname!r} ({p.type_name})")
        else:
            out[pname] = p.default
    try:
        check_ranges(cls, out)
    except ValueError as exc:
        raise SpecError(f"{kind} {name!r}: {exc}") from None
    return out


def type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _float_or_none(value: Any) -> float | None:
    """Numbers, and numeric strings such as ``"5e-7"`` (YAML 1.1 reads that as a string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    return None


class Params(dict):  # type: ignore[type-arg]
    """A mapping-valued parameter (an EOT entry's settings): read-only and hashable, as
    the frozen components that hold it are."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(json.dumps(self, sort_keys=True, default=str))

    def __reduce__(self) -> tuple[Any, ...]:  # pickle and deepcopy (Ray) without setitem
        return (Params, (dict(self),))

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("component parameters are read-only")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _read_only  # type: ignore[assignment]


def coerce(value: Any, tp: Any, field: str) -> Any:
    """``value`` as type ``tp`` or a SpecError naming ``field`` and the expected type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, field)
            except SpecError:
                continue
        raise SpecError(f"{field}: expected {type_name(tp)}, got {value!r}")
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise SpecError(f"{field}: expected a mapping ({type_name(tp)}), got {value!r}")
        return Params(value)
    if origin is typing.Literal:
        if value in args:
            return value
        raise SpecError(f"{field}: expected one of {', '.join(map(repr, args))}, got {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise SpecError(f"{field}: expected a list ({type_name(tp)}), got {value!r}")
        item = args[0] if args else Any
        if origin is tuple and len(args) >= 2 and args[1] is not Ellipsis:
            if len(value) != len(args):
                raise SpecError(f"{field}: expected {len(args)} items, got {len(value)}")
            return tuple(
                coerce(v, a, f"{field}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        return tuple(coerce(v, item, f"{field}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        number = _float_or_none(value)
        if number is not None:
            if not math.isfinite(number):
                raise SpecError(f"{field}: expected a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise SpecError(f"{field}: expected {type_name(tp)}, got {value!r} ({type(value).__name__})")


BASE_MODELS: Registry[Any] = Registry("base model")
DATASETS: Registry[Any] = Registry("dataset")
DEFENSES: Registry[Any] = Registry("defense")
COUNTERMEASURES: Registry[Any] = Registry("countermeasure")
ATTACKS: Registry[Any] = Registry("attack")
SAMPLERS: Registry[Any] = Registry("sampler")
METRICS: Registry[Any] = Registry("metric")
TRACKS: Registry[Any] = Registry("track")

REGISTRIES: dict[str, Registry[Any]] = {
    "base-models": BASE_MODELS,
    "datasets": DATASETS,
    "defenses": DEFENSES,
    "countermeasures": COUNTERMEASURES,
    "attacks": ATTACKS,
    "samplers": SAMPLERS,
    "metrics": METRICS,
    "tracks": TRACKS,
}

for _name, _target in [
    ("tiny", "antipers.models.tiny:TinyModel"),
    ("mini-faces", "antipers.models.mini_faces:MiniFaces"),
    ("sd15-arch", "antipers.models.arch:SD15Arch"),
    ("sd21-arch", "antipers.models.arch:SD21Arch"),
    ("diffusers", "antipers.models.local:DiffusersFolder"),
    ("sd15", "antipers.models.local:SD15"),
    ("sd21-base", "antipers.models.local:SD21Base"),
]:
    BASE_MODELS.register(_name, _target)

for _name, _target in [
    ("synthetic", "antipers.data.synthetic:SyntheticDataset"),
    ("celeba-hq", "antipers.data.folders:CelebAHQ"),
    ("vggface2", "antipers.data.folders:VGGFace2"),
    ("folder", "antipers.data.folders:PlainFolders"),
    ("uploads", "antipers.data.folders:Uploads"),
]:
    DATASETS.register(_name, _target)

for _name, _target in [
    ("none", "antipers.defenses.none:NoDefense"),
    ("aspl", "antipers.defenses.aspl:ASPL"),
    ("fsmg", "antipers.defenses.fsmg:FSMG"),
    ("simac", "antipers.defenses.simac:SimAC"),
    ("cap-aspl", "antipers.defenses.cap:CAPASPL"),
    ("cap-simac", "antipers.defenses.cap:CAPSimAC"),
    ("cap-fsmg", "antipers.defenses.cap:CAPFSMG"),
    ("apdm", "antipers.defenses.apdm:APDM"),
    ("persguard", "antipers.defenses.persguard:PersGuard"),
    ("iddm", "antipers.defenses.iddm:IDDM"),
]:
    DEFENSES.register(_name, _target)
for _name, _target in [
    ("none", "antipers.attacks.countermeasures:NoCountermeasure"),
    ("jpeg", "antipers.attacks.countermeasures:JPEG"),
    ("resize", "antipers.attacks.countermeasures:Resize"),
    ("blur", "antipers.attacks.countermeasures:Blur"),
    ("flip", "antipers.attacks.countermeasures:Flip"),
    ("purify", "antipers.attacks.countermeasures:Purify"),
    ("noise", "antipers.attacks.countermeasures:Noise"),
    ("impress", "antipers.attacks.impress:Impress"),
    ("upscale", "antipers.attacks.upscale:Upscale"),
    ("mix", "antipers.attacks.countermeasures:Mix"),
]:
    COUNTERMEASURES.register(_name, _target)
ATTACKS.register("dreambooth", "antipers.attacks.dreambooth:DreamBooth")
ATTACKS.register("lora", "antipers.attacks.lora:LoRADreamBooth")
SAMPLERS.register("cfg", "antipers.attacks.sampling:GuidedSampler")
for _name, _target in [
    ("fdfr", "antipers.metrics.identity:FDFR"),
    ("ism", "antipers.metrics.identity:ISM"),
    ("linkability", "antipers.metrics.identity:Linkability"),
    ("embedder-ism", "antipers.metrics.embedder:EmbedderISM"),
    ("brisque", "antipers.metrics.quality:Brisque"),
    ("piqe", "antipers.metrics.quality:PIQE"),
    ("clipiqa", "antipers.metrics.quality:CLIPIQA"),
    ("liqe", "antipers.metrics.quality:LIQE"),
    ("topiq-face", "antipers.metrics.quality:TOPIQFace"),
    ("serfiq", "antipers.metrics.serfiq:SERFIQ"),
    ("linf", "antipers.metrics.budget:Linf"),
    ("psnr", "antipers.metrics.budget:PSNR"),
    ("ssim", "antipers.metrics.budget:SSIM"),
    ("lpips", "antipers.metrics.budget:LPIPS"),
    ("clip-i", "antipers.metrics.fidelity:CLIPImage"),
    ("clip-t", "antipers.metrics.fidelity:CLIPText"),
    ("dino", "antipers.metrics.fidelity:DINO"),
    ("fid", "antipers.metrics.fidelity:FID"),
]:
    METRICS.register(_name, _target)
for _name, _target in [
    ("image", "antipers.tracks.image:ImageTrack"),
    ("model", "antipers.tracks.model:ModelTrack"),
    ("immunization", "antipers.tracks.immunization:ImmunizationTrack"),
]:
    TRACKS.register(_name, _target)
