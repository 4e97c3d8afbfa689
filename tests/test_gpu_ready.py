"""The GPU session stays ready as the project grows (issue 41): every runtime dependency is in the card's image
(benchmarks/gpu/image_packages.txt), carried there as a wheel (benchmarks/gpu/wheels.txt), or named as not needed
on the card, and what the carried wheels need is there too. A dependency added without this fails here, on CPU,
instead of on the card's few minutes."""

from __future__ import annotations

import importlib.util
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def image_env():
    spec = importlib.util.spec_from_file_location("image_env", ROOT / "benchmarks" / "gpu" / "image_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_dependency_is_on_the_card_or_carried_at_a_version_the_project_accepts():
    env = image_env()
    image = set(env.listed(env.HERE / "image_packages.txt"))
    pins = env.listed(env.HERE / "wheels.txt")
    assert len(image) > 150 and "torch" in image and "onnxruntime-gpu" not in image
    requirements = [Requirement(text) for text in
                    tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    missing = [r.name for r in requirements if env.canonical(r.name) not in image | set(pins) | set(env.NOT_ON_CARD)]
    assert not missing, f"add {missing} to benchmarks/gpu/wheels.txt (the card's image lacks them)"
    for requirement in requirements:
        pin = pins.get(env.canonical(requirement.name))
        assert pin is None or requirement.specifier.contains(pin), (requirement, pin)
    assert all(pin is not None for pin in pins.values())  # the card gets exactly what was rehearsed


def test_what_a_carried_wheel_needs_is_on_the_card_or_carried():
    """Read from this .venv's metadata where it has the pinned version (how fastapi's own need of
    opentelemetry-api was found)."""
    env = image_env()
    image, pins = set(env.listed(env.HERE / "image_packages.txt")), env.listed(env.HERE / "wheels.txt")
    checked, unmet = 0, []
    for name, pin in pins.items():
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        if dist.version != pin:
            continue
        checked += 1
        for text in dist.requires or []:
            need = Requirement(text)
            if (need.marker is None or need.marker.evaluate({"extra": ""})) and \
                    env.canonical(need.name) not in image | set(pins):
                unmet.append(f"{name} needs {need.name}")
    assert checked >= len(pins) // 2, f"only {checked} of {len(pins)} pinned versions are installed here"
    assert not unmet, unmet
