"""Every `train.py` / `evaluate.py` / `generate.py` command written in README.md and docs/*.md composes.

The docs are run, not pinned: a command line that stops composing (a renamed key, a removed config option, a
value the schema refuses) fails here, whatever the prose around it says. Each command is composed in-process
through Hydra's compose API (what `python train.py ... --cfg job` prints) and then checked the way the entry
point checks it before doing any work: `check_config` for train.py, `EvaluateConfig.from_mapping` for
evaluate.py, `GenerateConfig.from_mapping` for generate.py. Nothing is trained, loaded or downloaded.

Where a command is found: fenced code lines (joined across trailing backslashes) and `inline code` spans. The
script's part is taken out of any wrapper (`PILE_DIR=... python`, `python -m` multirun, `torchrun ...`,
`srun ... python`, `docker run ... memoryformer:latest [evaluate]`). Placeholders are substituted by
`PLACEHOLDERS`; a command with a whole-word placeholder such as `<argv>` is a template and is not composed.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import open_dict

from memoryformer.conf_schema import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
register_configs()

#: Where the docs keep the Pile; the test composes against a folder of empty files with the same names.
PILE = "/data/pile"
PILE_FILES = ("pile_0.87_deduped_text_document.bin", "pile_0.87_deduped_text_document.idx", "document.bin",
              "document.idx", "pile_text_document.bin", "pile_text_document.idx", "20B_tokenizer.json",
              "train/00.jsonl.zst", "val.jsonl.zst")
#: Placeholder -> what the test composes instead. Paths need not exist: composing reads no file, except
#: train.py's ckpt_path (see `_train_overrides`).
PLACEHOLDERS = {
    "<time>": "2026-01-01_00-00-00",
    "$PILE_DIR": PILE,
    "$HEAD": "localhost",
    "$PWD": str(ROOT),
}
SCRIPTS = ("train", "evaluate", "generate")
SHELL_FENCES = ("bash", "sh", "shell", "console")  # other fenced blocks are output, listings or Python
_SCRIPT_RE = re.compile(r"(?:^|[\s/])(train|evaluate|generate)\.py(?=\s|$)")
_DOCKER_RE = re.compile(r"memoryformer:latest(?:\s+(evaluate))?\s+(.*)$")
_ENV_RE = re.compile(r"^([A-Z_][A-Z0-9_]*)=(\S+)$")
_COMMAND_START = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S+\s+)*(?:python|torchrun|srun|docker)\s")


@dataclass(frozen=True)
class DocCommand:
    where: str  # file:line
    script: str  # train | evaluate | generate
    args: tuple[str, ...]  # the script's arguments, placeholders substituted
    env: tuple[tuple[str, str], ...]  # VAR=value written before the command

    @property
    def keys(self) -> set[str]:
        return {a.lstrip("+~").split("=", 1)[0] for a in self.args if "=" in a}


def _code_texts(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every shell code line (backslash continuations joined) and inline span."""
    out: list[tuple[int, str]] = []
    fenced, shell, pending, start = False, False, "", 0
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced, shell = not fenced, line.strip()[3:] in SHELL_FENCES
            continue
        if fenced and shell:
            if not pending:
                start = n
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            out.append((start, pending + line))
            pending = ""
        elif not fenced:  # an inline span counts when it reads as a command, not as a file name in a sentence
            out.extend((n, span) for span in re.findall(r"`([^`]+)`", line) if _COMMAND_START.match(span))
    return out


def _parse(where: str, text: str) -> DocCommand | None:
    """The script command in `text`, or None when there is none (or it is a template)."""
    text = text.split(" #", 1)[0]  # a shell comment
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    docker = _DOCKER_RE.search(text)
    match = _SCRIPT_RE.search(text)
    if docker:
        script, rest, before = docker.group(1) or "train", docker.group(2), ""
    elif match:
        script, rest, before = match.group(1), text[match.end() :], text[: match.start()]
    else:
        return None
    try:
        args = shlex.split(rest)
        words = shlex.split(before)
    except ValueError:
        return None  # not a shell line (prose quoting a fragment)
    for stop in ("&&", ";", "|", ">", "2>&1"):
        if stop in args:
            args = args[: args.index(stop)]
    if re.search(r"<[^>]+>|\.\.\.", " ".join(args)):
        return None  # a template such as `python train.py <argv>` or `checkpoint=...`
    env = tuple(m.groups() for w in words if (m := _ENV_RE.match(w)))
    args = [a for a in args if a != "-m"]  # multirun: composed one job at a time
    return DocCommand(where, script, tuple(args), env)


def doc_commands() -> list[DocCommand]:
    """Every script command of README.md and docs/*.md, in file order."""
    found = []
    for path in DOCS:
        for n, text in _code_texts(path):
            cmd = _parse(f"{path.relative_to(ROOT)}:{n}", text)
            if cmd is not None:
                found.append(cmd)
    return found


def _jobs(args: tuple[str, ...]) -> list[list[str]]:
    """The override lists a sweep (`a=1,2 b=x,y`) runs, one value changed at a time from the first job."""
    parsed = OverridesParser.create().parse_overrides(list(args))
    sweeps = {i: list(o.sweep_string_iterator()) for i, o in enumerate(parsed) if o.is_sweep_override()}
    first = [f"{o.get_key_element()}={sweeps[i][0]}" if i in sweeps else a
             for i, (o, a) in enumerate(zip(parsed, args, strict=True))]
    jobs = [first]
    for i, values in sweeps.items():
        for value in values[1:]:
            job = list(first)
            job[i] = f"{parsed[i].get_key_element()}={value}"
            jobs.append(job)
    return jobs


def _train_overrides(job: list[str], tmp_path: Path) -> list[str]:
    """Run folders under `tmp_path`; a path given to ckpt_path (checked to exist) -> an empty file."""
    out = str(tmp_path / "out")
    given = tmp_path / "given.ckpt"
    given.touch()
    fixed = [f"ckpt_path={given}" if a.startswith("ckpt_path=") and a.split("=", 1)[1] not in
             ("last", "auto", "null") else a for a in job]
    return [f"paths.output_dir={out}", f"paths.runs_root={out}", *fixed]


def _fake_pile(tmp_path: Path) -> str:
    """A folder holding empty files named as the Pile files the docs use (the config checks they exist)."""
    pile = tmp_path / "pile"
    for name in PILE_FILES:
        (pile / name).parent.mkdir(parents=True, exist_ok=True)
        (pile / name).touch()
    return str(pile)


def _compose_and_check(cmd: DocCommand, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # doc commands may ask for cuda
    # ... on the 80 GB GPU the docs plan for (micro_batch_size=auto reads the device's memory)
    gpu = SimpleNamespace(total_memory=80 * 10**9, name="80 GB GPU (doc test)")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: gpu)
    pile = _fake_pile(tmp_path)
    monkeypatch.setenv("PILE_DIR", pile)
    for name, value in cmd.env:
        monkeypatch.setenv(name, value.replace(PILE, pile))
    config_name = {"train": "config", "evaluate": "evaluate", "generate": "generate"}[cmd.script]
    for job in _jobs(tuple(a.replace(PILE, pile) for a in cmd.args)):
        if cmd.script == "train":
            job = _train_overrides(job, tmp_path)
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name, overrides=job, return_hydra_config=True)
        with open_dict(cfg):
            del cfg["hydra"]  # composed (so hydra/... and hydra.* overrides are checked), not needed after
        if cmd.script == "train":
            from memoryformer.training.settings import check_config

            check_config(cfg)
        elif cmd.script == "evaluate":
            from memoryformer.evaluation.config import EvaluateConfig

            EvaluateConfig.from_mapping(cfg)
        else:
            from memoryformer.generation import GenerateConfig

            GenerateConfig.from_mapping(cfg)


COMMANDS = doc_commands()


@pytest.mark.parametrize(
    "cmd", [pytest.param(c, id=c.where) for c in COMMANDS]
)
def test_doc_command_composes(cmd: DocCommand, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _compose_and_check(cmd, tmp_path, monkeypatch)


def test_the_extractor_finds_the_wrapped_forms(tmp_path: Path):
    # The extractor itself, on the wrappers the docs use (so a doc rewrite cannot silently hide commands).
    def parse(text: str) -> tuple[str, tuple[str, ...], tuple]:
        cmd = _parse("x:1", text)
        assert cmd is not None, text
        return cmd.script, cmd.args, cmd.env

    assert parse("PILE_DIR=/d python train.py experiment=mf_tiny data=pile_pythia") == (
        "train", ("experiment=mf_tiny", "data=pile_pythia"), (("PILE_DIR", "/d"),))
    assert parse("torchrun --nnodes 4 --rdzv-endpoint $HEAD:29500  train.py trainer.num_nodes=4")[1] == (
        "trainer.num_nodes=4",)
    assert parse("srun --nodes 4 python train.py a=1 # comment")[1] == ("a=1",)
    assert parse("python train.py -m optim.lr=1e-3,2e-3")[1] == ("optim.lr=1e-3,2e-3",)
    assert parse("docker run --gpus all memoryformer:latest experiment=mf_tiny")[:2] == (
        "train", ("experiment=mf_tiny",))
    assert parse("docker run memoryformer:latest evaluate checkpoint=/m")[:2] == (
        "evaluate", ("checkpoint=/m",))
    assert parse("python evaluate.py checkpoint=outputs/x/<time>/last.ckpt")[1] == (
        "checkpoint=outputs/x/2026-01-01_00-00-00/last.ckpt",)
    assert _parse("x:1", "python train.py <argv>") is None
    text = "```bash\npython train.py a=1 \\\n    b=2\n```\n`python generate.py prompt=x` and `make train`\n"
    path = tmp_path / "probe.md"
    path.write_text(text)
    assert [(n, t.split()) for n, t in _code_texts(path)] == [
        (2, ["python", "train.py", "a=1", "b=2"]), (5, ["python", "generate.py", "prompt=x"])]
    assert [len(_jobs(("a=1,2,3", "b=x,y")))] == [4]  # first job, then 2 more a's and 1 more b
    # and the docs hold commands of all three scripts
    assert {c.script for c in COMMANDS} == set(SCRIPTS)
