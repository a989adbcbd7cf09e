"""What a paper row costs to train: tokens from its experiment config, FLOPs from the FLOPs tool, and
device-hours from a throughput that is measured, published, or (where neither exists yet) estimated.

    python benchmarks/compute_budget.py                          # the cost table (docs/costs.md)
    python benchmarks/compute_budget.py --all                    # ... with CPU measurements too
    python benchmarks/compute_budget.py record --experiment mf_tiny --device "NVIDIA H100 80GB HBM3" \\
        --tokens-per-s 123456 --devices 8 --dtype bf16 --micro-batch 16   # a number read off your own run

Method:
- tokens of a row = `trainer.max_steps` x `global_batch_size` x `data.seq_len` of `conf/experiment/ROW.yaml`,
  the way `train.py` plans it (`check_config`); Pythia's 143,000 x 1024 x 2048 = 299,892,736,000 tokens.
- device-hours = tokens / (tokens/s per device) / 3600; days on n devices = device-hours / n / 24 if data
  parallelism scales linearly (it does not quite across nodes: read it as a lower bound there).
- MFU = 2 x `training_flops_per_token` x tokens/s / peak FLOP/s (two FLOPs per multiply-add, as datasheets
  count); it says how far the speed is from what the FLOPs alone would allow.
- Where the tokens/s come from, best first: (1) measurements in `docs/throughput.json`, written by
  `benchmarks/bench_throughput.py --record` or by `record` above from a real run's `train/tokens_per_s`;
  (2) published measurements: EleutherAI's A100 GPU-hours of the Pythia rows (`PYTHIA_A100_40GB_HOURS`);
  (3) for a MemoryFormer row on a device where nothing is measured, `estimate_tokens_per_s`: attention and LM
  head (the only dense work left) at the MFU that GPT-NeoX reached on the Pythia row of the same width,
  plus the memory traffic of the table lookups and of AdamW at the device's datasheet bandwidth. A lookup
  moves a 2- or 4-byte table entry per multiply-add, so FLOPs alone say nothing about its time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from dataclasses import asdict, dataclass, fields
from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(HERE), str(ROOT)):  # run as `python benchmarks/compute_budget.py`, or imported by scripts
    if _p not in sys.path:
        sys.path.insert(0, _p)

from memoryformer.config import PAPER_MODELS, PAPER_ROWS, ConfigError  # noqa: E402
from memoryformer.flops import FLOPS_PER_MAC, PEAK_BF16_TFLOPS  # noqa: E402

CONF_DIR = ROOT / "conf"
MEASUREMENTS = ROOT / "docs" / "throughput.json"
SECONDS_PER_HOUR = 3600.0

#: EleutherAI's measured cost of the Pythia rows: A100-40GB GPU-hours per model for 299,892,736,000 tokens
#: on 32 GPUs with GPT-NeoX in fp16 (Biderman et al. 2023, "Pythia", arXiv 2304.01373, appendix table of
#: GPU hours; the suite's total is 136,070).
PYTHIA_A100_40GB_HOURS = {"pythia_70m": 510.0, "pythia_160m": 1030.0, "pythia_410m": 2540.0}
PYTHIA_SOURCE = "EleutherAI, Pythia paper (arXiv 2304.01373): 32 x A100-40GB, GPT-NeoX, fp16"

#: The Pythia row of the same width as each MemoryFormer row (the paper's Table 1 pairs).
SAME_WIDTH_PYTHIA = {row.name: row.baseline for row in PAPER_ROWS if row.baseline}

#: Passes over the table entries a training step makes per entry read in the forward: the forward gather;
#: in the backward, the row again (gradient of the hash weight) and the output gradient once per (token,
#: table) pair, accumulated into the table gradient. `F.embedding_bag`, our CUDA path, makes all three.
LOOKUP_PASSES = 3
#: Bytes a fused AdamW step moves per fp32 parameter: reads weight, gradient and both moments, writes
#: weight and moments.
ADAMW_BYTES_PER_PARAM = 28
#: Bytes of one table entry in the recommended multi-GPU run (`trainer=deepspeed_zero2`, bf16-mixed):
#: Lightning has DeepSpeed cast the weights to bf16, the fp32 master copies living in the sharded
#: optimizer. Without DeepSpeed (`trainer=gpu` / `ddp`) bf16-mixed keeps fp32 weights: 4 bytes, twice the
#: table term.
TABLE_BYTES = 2




@dataclass(frozen=True)
class DeviceSpec:
    """Datasheet numbers of one accelerator, for estimates: dense fp16/bf16 tensor peak in TFLOP/s (two
    FLOPs per multiply-add, no sparsity) and memory bandwidth in TB/s."""

    name: str
    peak_tflops: float
    memory_tb_per_s: float


A100_40GB = DeviceSpec("NVIDIA A100-SXM4-40GB", peak_tflops=PEAK_BF16_TFLOPS["A100"], memory_tb_per_s=1.555)


@dataclass(frozen=True)
class RowBudget:
    """One paper row's training run as its experiment config plans it, and what one token costs.

    FLOPs are in multiply-adds per token of a training step (the paper's convention; forward + backward = 3x
    forward): `flops_per_token` counts everything (`flops.training_flops_per_token`),
    `dense_flops_per_token` only attention, `nn.Linear`s and the LM head, and `lookup_reads_per_token` is the
    number of table entries the forward pass reads per token, so that
    `flops_per_token = dense_flops_per_token + 3 * lookup_reads_per_token`.
    """

    experiment: str
    model: str
    steps: int
    global_batch_size: int
    seq_len: int
    flops_per_token: float
    dense_flops_per_token: float
    lookup_reads_per_token: float
    params: int

    @property
    def tokens(self) -> int:
        return self.steps * self.global_batch_size * self.seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    @property
    def total_flops(self) -> float:
        """FLOPs of the whole run, two per multiply-add."""
        return FLOPS_PER_MAC * self.flops_per_token * self.tokens


@dataclass(frozen=True)
class Measurement:
    """A measured training throughput of one model on one kind of device.

    `tokens_per_s` is per device (a run's total divided by `devices`). `source` says how it was taken
    (`bench_throughput` or `training run`); `peak_tflops` is the device's dense peak in the same precision,
    two FLOPs per multiply-add, when known (for MFU).
    """

    model: str
    device: str
    tokens_per_s: float
    dtype: str
    seq_len: int
    micro_batch: int
    devices: int = 1
    source: str = "bench_throughput"
    measured_on: str = ""
    commit: str = ""
    peak_tflops: float | None = None
    note: str = ""

    def key(self) -> tuple:
        """Measurements with the same key replace each other when recorded."""
        return (self.model, self.device, self.dtype, self.seq_len, self.source)


@cache
def row_budget(experiment: str) -> RowBudget:
    """Compose `experiment=NAME` through Hydra as `train.py` would and read its token budget."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from memoryformer.conf_schema import register_configs
    from memoryformer.config import ModelConfig
    from memoryformer.flops import model_cost, training_flops_per_token

    if not (CONF_DIR / "experiment" / f"{experiment}.yaml").exists():
        known = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
        raise ConfigError(f"experiment={experiment} does not exist; pick one of {known}.")
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}", "paths.output_dir=/tmp/mf_budget"])
    # Not `check_config`: that also checks the data files exist, which a cost estimate must not need.
    model = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    gbs, seq_len = int(cfg.global_batch_size), int(cfg.data.seq_len)
    steps = cfg.trainer.get("max_steps")
    if cfg.max_tokens is not None:
        steps = -(-int(cfg.max_tokens) // (gbs * seq_len))
    if steps is None or int(steps) <= 0:
        raise ConfigError(f"experiment={experiment} sets no trainer.max_steps or max_tokens; "
                          "it has no budget.")
    cost = model_cost(model, seq_len)
    lookups = cost.layers * cost.block.lookups / seq_len
    total = training_flops_per_token(model, seq_len)
    return RowBudget(
        experiment=experiment,
        model=model.name,
        steps=int(steps),
        global_batch_size=gbs,
        seq_len=seq_len,
        flops_per_token=total,
        dense_flops_per_token=total - 3.0 * lookups,
        lookup_reads_per_token=lookups,
        params=cost.params_total,
    )


def device_hours(tokens: float, tokens_per_s_per_device: float) -> float:
    """Device-hours to process `tokens` at a per-device throughput."""
    if tokens_per_s_per_device <= 0:
        raise ValueError(f"tokens_per_s must be > 0, got {tokens_per_s_per_device}.")
    return tokens / tokens_per_s_per_device / SECONDS_PER_HOUR


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak_tflops: float) -> float:
    """Model FLOPs utilization: achieved FLOP/s (2 per multiply-add of `flops_per_token`) / peak."""
    return FLOPS_PER_MAC * flops_per_token * tokens_per_s_per_device / (peak_tflops * 1e12)


def published_tokens_per_s(experiment: str) -> float:
    """Per-GPU training tokens/s of a Pythia row on A100-40GB, from EleutherAI's published GPU-hours."""
    if experiment not in PYTHIA_A100_40GB_HOURS:
        raise KeyError(f"no published measurement for experiment={experiment}; "
                       f"known: {sorted(PYTHIA_A100_40GB_HOURS)}.")
    return row_budget(experiment).tokens / (PYTHIA_A100_40GB_HOURS[experiment] * SECONDS_PER_HOUR)


def memory_traffic_per_token(row: RowBudget, table_bytes: int = TABLE_BYTES,
                             tokens_per_step: int | None = None) -> float:
    """Bytes a training step moves per token for the tables and the optimizer: `LOOKUP_PASSES` passes over
    the entries read, plus a fused AdamW step over every parameter once per `tokens_per_step` tokens (the
    row's global batch by default: ZeRO shards the step and the batch alike, so the per-token share does not
    depend on the device count)."""
    lookups = LOOKUP_PASSES * row.lookup_reads_per_token * table_bytes
    return lookups + ADAMW_BYTES_PER_PARAM * row.params / (tokens_per_step or row.tokens_per_step)


def estimate_tokens_per_s(row: RowBudget, device: DeviceSpec, dense_mfu: float,
                          table_bytes: int = TABLE_BYTES, tokens_per_step: int | None = None) -> float:
    """Per-device training tokens/s of `row` on `device`, estimated as two costs that do not overlap:

    dense work (attention, linears, LM head: `2 * dense_flops_per_token` FLOPs) at `dense_mfu` of the peak,
    plus `memory_traffic_per_token` bytes at the full memory bandwidth. The second term is a floor for a
    kernel that reads table rows from memory per token, as `F.embedding_bag` does on CUDA; a kernel that
    reused rows from on-chip memory could beat it. Data loading and gradient communication are left out.
    """
    if not 0 < dense_mfu <= 1:
        raise ValueError(f"dense_mfu must be in (0, 1], got {dense_mfu}.")
    dense_s = FLOPS_PER_MAC * row.dense_flops_per_token / (dense_mfu * device.peak_tflops * 1e12)
    memory_s = memory_traffic_per_token(row, table_bytes, tokens_per_step) / (device.memory_tb_per_s * 1e12)
    return 1.0 / (dense_s + memory_s)


def method_check(measurements: list[Measurement], device: str, memory_bytes_per_s: float,
                 table_bytes: int = 4) -> tuple[float, float] | None:
    """(estimated, measured) tokens/s of MF-tiny on a device where both it and Pythia-70M were measured:
    the estimate's method, run where it can be checked. Pythia-70M's measured speed stands for the dense
    rate (as `peak` at MFU 1), the measured `memory_bytes_per_s` for the bandwidth, and AdamW runs once per
    measured micro-batch. None when either measurement is missing."""
    found = {m.model: m for m in measurements if m.device == device}
    ref, mf = found.get("pythia_70m"), found.get("mf_tiny")
    if ref is None or mf is None:
        return None
    dense_rate = FLOPS_PER_MAC * row_budget("pythia_70m").flops_per_token * ref.tokens_per_s
    spec = DeviceSpec(device, peak_tflops=dense_rate / 1e12, memory_tb_per_s=memory_bytes_per_s / 1e12)
    estimate = estimate_tokens_per_s(row_budget("mf_tiny"), spec, dense_mfu=1.0, table_bytes=table_bytes,
                                     tokens_per_step=mf.micro_batch * mf.seq_len)
    return estimate, mf.tokens_per_s


@dataclass(frozen=True)
class CostLine:
    """One line of the cost table: a paper row on one device at one per-device throughput, and where
    that throughput comes from (`basis`: "measured", "published" or "estimate") with a short account."""

    row: RowBudget
    device: str
    dtype: str
    tokens_per_s: float
    basis: str
    how: str
    peak_tflops: float | None = None

    @property
    def device_hours(self) -> float:
        return device_hours(self.row.tokens, self.tokens_per_s)

    @property
    def mfu(self) -> float | None:
        if not self.peak_tflops:
            return None
        return mfu(self.row.flops_per_token, self.tokens_per_s, self.peak_tflops)


def cost_lines(measurements: list[Measurement], experiments: tuple[str, ...] = PAPER_MODELS,
               include_cpu: bool = False) -> list[CostLine]:
    """Every known cost of every row: our measurements at the row's sequence length (CPU ones only with
    `include_cpu`), then EleutherAI's published A100 measurement of a Pythia row, and for a MemoryFormer
    row without an A100 measurement of its own the estimate from its same-width Pythia row."""
    lines: list[CostLine] = []
    for exp in experiments:
        row = row_budget(exp)
        # Attention's share grows with s: a measurement at another length does not stand for the row.
        mine = [m for m in measurements if m.model == row.model and m.seq_len == row.seq_len
                and (include_cpu or not m.device.startswith("CPU"))]
        for m in sorted(mine, key=lambda m: (m.device, m.dtype)):
            how = f"{m.source}, {m.measured_on}, micro-batch {m.micro_batch}"
            how += f"; {m.note}" if m.note else ""
            lines.append(CostLine(row, m.device, m.dtype, m.tokens_per_s, "measured", how, m.peak_tflops))
        if exp in PYTHIA_A100_40GB_HOURS:
            lines.append(CostLine(row, A100_40GB.name, "fp16", published_tokens_per_s(exp), "published",
                                  PYTHIA_SOURCE, A100_40GB.peak_tflops))
        pythia = SAME_WIDTH_PYTHIA.get(exp)
        if pythia and not any("A100" in m.device for m in mine):
            ref = row_budget(pythia)
            ref_mfu = mfu(ref.flops_per_token, published_tokens_per_s(pythia), A100_40GB.peak_tflops)
            traffic = memory_traffic_per_token(row) / 1e6
            how = (f"attention + head at {pythia}'s {ref_mfu:.0%} MFU, then {traffic:,.1f} MB/token of bf16 "
                   f"table and AdamW traffic at {A100_40GB.memory_tb_per_s} TB/s")
            lines.append(CostLine(row, A100_40GB.name, "bf16 (DeepSpeed)",
                                  estimate_tokens_per_s(row, A100_40GB, ref_mfu), "estimate", how,
                                  A100_40GB.peak_tflops))
    return lines


# ----------------------------------------------------------------------------------- the record file
def load_measurements(path: Path | str = MEASUREMENTS) -> list[Measurement]:
    """Every measurement in `path` (a JSON list); [] when the file does not exist.

    A malformed file is refused with the file name and what is wrong, never half-read.
    """
    path = Path(path)
    if not path.exists():
        return []
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); fix or delete it and measure again.") from None
    if not isinstance(raw, list):
        raise ConfigError(f"{path} must hold a JSON list of measurements, got {type(raw).__name__}.")
    known = {f.name for f in fields(Measurement)}
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ConfigError(f"{path}: entry {i} is not an object.")
        unknown = sorted(set(item) - known)
        if unknown:
            raise ConfigError(f"{path}: entry {i} has unknown keys {unknown}; "
                              f"known keys are {sorted(known)}.")
        try:
            m = Measurement(**item)
        except TypeError as e:
            raise ConfigError(f"{path}: entry {i} is incomplete ({e}).") from None
        if not (isinstance(m.tokens_per_s, int | float) and m.tokens_per_s > 0):
            raise ConfigError(f"{path}: entry {i} has tokens_per_s={m.tokens_per_s!r}; it must be > 0.")
        out.append(m)
    return out


def save_measurement(measurement: Measurement, path: Path | str = MEASUREMENTS) -> list[Measurement]:
    """Add `measurement` to `path`, replacing one with the same key; the file is rewritten atomically."""
    path = Path(path)
    kept = [m for m in load_measurements(path) if m.key() != measurement.key()]
    kept.append(measurement)
    kept.sort(key=lambda m: (m.device, m.model, m.dtype, m.seq_len, m.source))
    tmp = path.with_suffix(path.suffix + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps([asdict(m) for m in kept], indent=2) + "\n")
    tmp.replace(path)
    return kept


# ----------------------------------------------------------------------------------------- the table
def _human_tokens(n: float) -> str:
    return f"{n / 1e9:,.1f}B"


def _hours(h: float) -> str:
    return f"{h:,.0f}" if h >= 10 else f"{h:,.1f}"


def format_cost_table(measurements: list[Measurement], experiments: tuple[str, ...] = PAPER_MODELS,
                      include_cpu: bool = False, devices: int = 32) -> str:
    """Markdown: one line per `cost_lines` entry, with device-hours, days on `devices` devices (the paper's
    and Pythia's 32 GPUs by default) and MFU where the device's peak is known."""
    from paper_flops import PAPER_LABELS

    lines = [f"| Row | Tokens | Train GFLOPs/token | Device | Tokens/s per device | Device-hours "
             f"| Days on {devices} | MFU | Basis |", "|---|---|---|---|---|---|---|---|---|"]
    for line in cost_lines(measurements, experiments, include_cpu):
        row = line.row
        util = f"{line.mfu:.0%}" if line.mfu is not None else ""
        lines.append("| " + " | ".join([
            f"`{row.experiment}` ({PAPER_LABELS.get(row.model, row.model)})",
            _human_tokens(row.tokens),
            f"{FLOPS_PER_MAC * row.flops_per_token / 1e9:.2f}",
            f"{line.device}, {line.dtype}",
            f"{line.tokens_per_s:,.0f}",
            _hours(line.device_hours),
            f"{line.device_hours / devices / 24:,.1f}",
            util,
            f"**{line.basis}**: {line.how}",
        ]) + " |")
    return "\n".join(lines)


def git_commit() -> str:
    """Short hash of the checkout's HEAD, "" outside a git checkout."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def today() -> str:
    """ISO date of today, stamped on new measurements."""
    return _dt.date.today().isoformat()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/compute_budget.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--measurements", default=str(MEASUREMENTS), help="JSON file of measurements")
    parser.add_argument("--all", action="store_true", help="also list measurements taken on CPUs")
    sub = parser.add_subparsers(dest="command")
    rec = sub.add_parser("record", help="record a throughput read off a real training run")
    rec.add_argument("--experiment", required=True, help="conf/experiment name of the run, e.g. mf_tiny")
    rec.add_argument("--device", required=True, help='device name, e.g. "NVIDIA H100 80GB HBM3"')
    rec.add_argument("--tokens-per-s", type=float, required=True, help="train/tokens_per_s of the whole run")
    rec.add_argument("--devices", type=int, default=1, help="devices of that run (tokens/s is divided by it)")
    rec.add_argument("--dtype", default="bf16")
    rec.add_argument("--micro-batch", type=int, required=True)
    rec.add_argument("--peak-tflops", type=float, default=None, help="dense peak per device, for MFU")
    rec.add_argument("--note", default="")
    args = parser.parse_args(argv)
    try:
        if args.command == "record":
            if args.devices < 1:
                raise ConfigError(f"--devices={args.devices} must be >= 1.")
            row = row_budget(args.experiment)
            m = Measurement(
                model=row.model, device=args.device, tokens_per_s=args.tokens_per_s / args.devices,
                dtype=args.dtype, seq_len=row.seq_len, micro_batch=args.micro_batch, devices=args.devices,
                source="training run", measured_on=today(), commit=git_commit(),
                peak_tflops=args.peak_tflops, note=args.note,
            )
            save_measurement(m, args.measurements)
            print(f"recorded {m.model} on {m.device}: {m.tokens_per_s:,.0f} tokens/s per device "
                  f"-> {args.measurements}; run `python scripts/update_docs.py` to refresh docs/costs.md.")
        print(format_cost_table(load_measurements(args.measurements), include_cpu=args.all))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
