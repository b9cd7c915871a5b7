"""The installed stack, constraints.txt and the README's "Tested versions" agree."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The packages the README names, as it names them.
NAMED = {
    "torch": "torch",
    "transformers": "transformers",
    "safetensors": "safetensors",
    "accelerate": "accelerate",
    "peft": "HF PEFT",
    "bitsandbytes": "bitsandbytes",
    "torchao": "torchao",
    "trl": "TRL",
    "datasets": "datasets",
    "tensorboard": "tensorboard",
}


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f"constraints.txt: {line!r} is not pinned with =="
            pins[name.lower().replace("_", "-")] = pinned
    return pins


def test_constraints_pin_what_the_readme_names_and_the_versions_it_says():
    pins, readme = _pins(), (ROOT / "README.md").read_text()
    tested = readme[readme.index("## Tested versions") : readme.index("## Performance")]
    for package, named in NAMED.items():
        assert package in pins, f"constraints.txt does not pin {package}"
        assert f"{named} {pins[package]}" in tested, f"README's Tested versions should say '{named} {pins[package]}'"


@pytest.mark.parametrize("package", sorted(NAMED))
def test_the_installed_version_is_the_pinned_one(package):
    try:
        installed = version(package)
    except PackageNotFoundError:
        pytest.skip(f"{package} is not installed here")
    pinned = _pins()[package]
    assert re.sub(r"\+.*", "", installed) == pinned, f"{package} {installed} installed, constraints.txt pins {pinned}"
