import subprocess
import sys
from dataclasses import dataclass

import pytest

from antipers.registry import REGISTRIES, Registry, RegistryError
from tests.conftest import REPO


@dataclass(frozen=True)
class Widget:
    size: int = 3


def test_lazy_target_resolves_and_builds():
    reg: Registry = Registry("widget")
    reg.register("w", "tests.test_registry:Widget")
    assert reg.build("w", {"size": 5}) == Widget(5)
    assert [p.name for p in reg.params("w")] == ["size"]


def test_duplicates_rejected():
    reg: Registry = Registry("widget")
    reg.register("w", "tests.test_registry:Widget")
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("w", "tests.test_registry:Widget")


def test_did_you_mean():
    with pytest.raises(RegistryError, match="Did you mean 'synthetic'"):
        REGISTRIES["datasets"].get("synthetc")


def test_every_registered_name_resolves_to_a_dataclass():
    for kind, registry in REGISTRIES.items():
        for name in registry.names():
            params = registry.params(name)  # raises unless a dataclass
            assert all(p.name for p in params), (kind, name)


def test_import_antipers_pulls_no_heavy_framework():
    code = (
        "import sys, antipers, antipers.registry, antipers.spec, antipers.cli; "
        "heavy = [m for m in ('torch', 'diffusers', 'peft', 'ray', 'pyiqa', 'insightface', "
        "'transformers', 'dlib') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
