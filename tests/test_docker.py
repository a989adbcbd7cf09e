"""The Dockerfile's structure, checked without a Docker engine (none runs on CI machines).

What a cluster user relies on: a pinned official CUDA base image, pinned Python packages (torch must not be
swapped for another build), a non-root user, an executable entry point that forwards arguments to train.py,
and a .dockerignore that keeps the venv, runs and data out of the build context.
"""

import importlib.metadata as md
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_base_image_is_an_official_pinned_pytorch_cuda_image():
    froms = [args for word, args in _instructions() if word == "FROM"]
    assert len(froms) == 1
    image, _, tag = froms[0].partition(":")
    assert image == "pytorch/pytorch"
    assert re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-(devel|runtime)", tag), tag


def test_every_pip_install_is_pinned_by_the_constraints_file():
    constraints = ROOT / "docker" / "constraints.txt"
    pinned = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt line {line!r} is not pinned with =="
            pinned[name.lower().replace("_", "-")] = version
    for key in ("torch", "lightning", "hydra-core", "deepspeed", "lm-eval", "wandb", "transformers"):
        assert key in pinned, key
    runs = [args for word, args in _instructions() if word == "RUN"]
    pip_lines = [cmd for args in runs for cmd in args.split("&&") if "pip install" in cmd]
    assert pip_lines
    for cmd in pip_lines:
        words = shlex.split(cmd)
        assert "--constraint" in words or "-c" in words, f"unpinned pip install: {cmd.strip()}"


def test_apt_packages_are_version_pinned():
    for word, args in _instructions():
        if word == "RUN" and "apt-get install" in args:
            install = args.split("apt-get install", 1)[1].split("&&")[0]
            for pkg in shlex.split(install):
                if not pkg.startswith("-"):
                    assert "=" in pkg, f"apt package {pkg} is not pinned"


def test_runs_as_non_root_with_entrypoint_and_workdir():
    instructions = _instructions()
    users = [args for word, args in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(word == "WORKDIR" for word, _ in instructions)
    entry = [args for word, args in instructions if word == "ENTRYPOINT"]
    assert entry == ['["docker/entrypoint.sh"]']
    script = ROOT / "docker" / "entrypoint.sh"
    assert script.exists() and script.stat().st_mode & 0o111, "docker/entrypoint.sh must be executable"
    body = script.read_text()
    assert "python train.py" in body and "python evaluate.py" in body


def test_dockerignore_keeps_the_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "outputs", "data_cache", "wandb"):
        assert entry in ignored


# ------------------------------------------------------------------------- the pins hold together
# The image resolves `pip install --constraint constraints.txt -e .[deepspeed,eval,wandb,sweep]` with no
# network here to try it; what can be checked offline is that no pin contradicts another: every pinned
# package's declared requirements (read from its installed metadata: `make setup` installs the same pins)
# and our own pyproject's are satisfied by the pinned versions, torch 2.7.1 included.
IMAGE_PYTHON = {"python_version": "3.11", "python_full_version": "3.11.10", "sys_platform": "linux",
                "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                "implementation_name": "cpython", "platform_python_implementation": "CPython"}
#: Requirements the image takes from its base rather than from the pins.
FROM_BASE_IMAGE = {"setuptools"}
IMAGE_EXTRAS = ("deepspeed", "eval", "wandb", "sweep")


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _contradictions(requirements, pins, extras=("",)) -> list[str]:
    out = []
    for text in requirements:
        req = Requirement(text)
        if req.marker and not any(req.marker.evaluate({**IMAGE_PYTHON, "extra": e}) for e in extras):
            continue
        name = canonicalize_name(req.name)
        if name in FROM_BASE_IMAGE:
            continue
        if name not in pins:
            out.append(f"{req} is not pinned")
        elif not req.specifier.contains(pins[name], prereleases=True):
            out.append(f"{req} excludes the pin {name}=={pins[name]}")
    return out


def test_our_requirements_accept_the_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in IMAGE_EXTRAS:
        requirements += project["optional-dependencies"][extra]
    assert _contradictions(requirements, _pins()) == []


def test_every_pinned_package_accepts_the_other_pins():
    pins = _pins()
    problems, checked = [], 0
    for name, version in sorted(pins.items()):
        if name == "torch":  # CI runs the CPU wheel of another version; torch's own deps come with the image
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            problems.append(f"{name}=={version} is pinned but not installed (make setup installs the pins)")
            continue
        if Version(dist.version) != version:
            problems.append(f"{name} is {dist.version} here, pinned {version}: run make setup")
            continue
        checked += 1
        problems += [f"{name}=={version}: {p}" for p in _contradictions(dist.requires or [], pins)]
    assert problems == []
    assert checked == len(pins) - 1


def test_the_checker_catches_a_contradiction():
    pins = {"torch": Version("2.7.1"), "numpy": Version("2.4.6")}
    assert _contradictions(["torch>=2.8", "numpy<3", "scipy; python_version < '3.9'"], pins) == [
        "torch>=2.8 excludes the pin torch==2.7.1"]
    assert _contradictions(["einops"], pins) == ["einops is not pinned"]


# ------------------------------------------------------------------------ the entry point's dispatch
@pytest.fixture()
def entrypoint(tmp_path):
    """Run docker/entrypoint.sh with a `python` on PATH that prints its arguments instead of running."""
    shim = tmp_path / "python"
    shim.write_text('#!/usr/bin/env bash\necho "python $*"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}

    def run(*args: str) -> str:
        proc = subprocess.run(["bash", str(ROOT / "docker" / "entrypoint.sh"), *args], env=env,
                              capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    return run


def test_entrypoint_forwards_overrides_to_train_py(entrypoint):
    train = "python train.py hydra.run.dir=/outputs/train/${now:%Y-%m-%d_%H-%M-%S}"
    assert entrypoint("experiment=mf_tiny", "trainer=deepspeed_zero2") == (
        f"{train} experiment=mf_tiny trainer=deepspeed_zero2")
    assert entrypoint() == train
    assert entrypoint("--help") == f"{train} --help"  # the image's default CMD


def test_entrypoint_runs_evaluate_flops_and_other_commands(entrypoint):
    assert entrypoint("evaluate", "checkpoint=/outputs/x.ckpt") == (
        "python evaluate.py hydra.run.dir=/outputs/eval/${now:%Y-%m-%d_%H-%M-%S} checkpoint=/outputs/x.ckpt")
    assert entrypoint("flops", "--json") == "python benchmarks/paper_flops.py --json"
    assert entrypoint("echo", "hello") == "hello"
    # it runs from the repository root wherever it is called from, so train.py resolves
    assert entrypoint("pwd") == str(ROOT)
