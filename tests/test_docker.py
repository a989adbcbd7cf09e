"""The Dockerfile's structure, checked without a Docker engine (none runs on CI machines).

What a cluster user relies on: a pinned official CUDA base image, pinned Python packages (torch must not be
swapped for another build), a non-root user, an executable entry point that forwards arguments to train.py,
and a .dockerignore that keeps the venv, runs and data out of the build context.
"""

import re
import shlex
from pathlib import Path

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
