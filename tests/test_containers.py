"""The container recipes: parseable, and carrying what a lab deploying them relies on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.container


def test_singularity_recipe_passes_spython():
    parsers = pytest.importorskip("spython.main.parse.parsers")
    stages = parsers.SingularityParser(str(ROOT / "Singularity.def")).recipe
    (recipe,) = stages.values()
    assert recipe.fromHeader.startswith("ghcr.io/bids-denoise/bids-denoise:")
    assert recipe.cmd.strip() == 'exec bids-denoise "$@"'
    environment = dict(item.split("=", 1) for item in recipe.environ)
    assert environment["NIPYPE_NO_ET"] == "1"
    assert environment["BIDS_DENOISE_CONTAINER"] == "singularity"
    assert any(label.startswith("Version ") for label in recipe.labels)
    # and it converts to a Dockerfile, as spython's round trip does
    writers = pytest.importorskip("spython.main.parse.writers")
    converted = writers.DockerWriter(stages).convert()
    assert "FROM ghcr.io/bids-denoise/bids-denoise:" in converted
    assert "apptainer run --nv" in (ROOT / "Singularity.def").read_text()


def test_dockerfile_has_what_the_runtime_needs():
    text = (ROOT / "Dockerfile").read_text()
    parsers = pytest.importorskip("spython.main.parse.parsers")
    parsed = parsers.DockerParser(str(ROOT / "Dockerfile")).recipe
    assert parsed  # spython reads it
    assert 'ENTRYPOINT ["bids-denoise"]' in text
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users and users[-1] not in ("root", "0")
    for label in ("version", "revision", "source", "licenses"):
        assert f"org.opencontainers.image.{label}=" in text
    for variable in ("NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "NIPYPE_NO_ET=1", "HOME=/tmp",
                     "MPLCONFIGDIR", "OMP_NUM_THREADS=1"):
        assert variable in text
    assert re.search(r"^ARG BASE_IMAGE=", text, flags=re.M) and "TORCH_SPEC" in text
    assert "--find-links /tmp/wheels" in text and "id=ca,required=false" in text
    assert (ROOT / "wheels" / ".keep").exists()


def test_dockerignore_keeps_the_context_small():
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[1] == "*" or "*" in ignored
    for kept in ("!bids_denoise/", "!pyproject.toml", "!wheels/"):
        assert kept in ignored
