"""Trains the runs of a reproduction plan, a few at a time, and measures each one once.

Each run lives in `<out>/runs/<key>/`: `train.py` writes its Hydra run there (checkpoints, `csv/metrics.csv`,
the exported `model/`), its output goes to `train.log`, and `result.json` is written last, atomically. A run
with a `result.json` is finished and never rerun; a folder without one is an interrupted run and is trained
again from scratch (runs are minutes long; restarting keeps every validation curve from one process).

A run that has no folder here but is published in the committed `docs/reproduction.json` with the same
`train.py` argv is taken from there (`published_results`): its final loss, cost and held-out bits/byte, not
its validation curve or bucket histograms, so figures that need those keep their committed files.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from memoryformer.atomic_io import atomic_write_text
from reproduction.protocol import Pending, Plan, Row, Run, Scale

ROOT = Path(__file__).resolve().parents[1]
RESULT = "result.json"

#: trains `argv` into `run_dir` (raises on failure)
Executor = Callable[[tuple[str, ...], Path], None]


def subprocess_executor(threads: int = 1) -> Executor:
    """`python train.py <argv> hydra.run.dir=<run_dir>`, output to `<run_dir>/train.log`.

    Workers run side by side with `threads` intra-op threads each (OMP_NUM_THREADS): on a 2-core CPU two
    single-threaded runs finish more rows per hour than one run on both cores.
    """

    def execute(argv: tuple[str, ...], run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        with open(run_dir / "train.log", "w") as log:
            rc = subprocess.run(
                [sys.executable, "train.py", *argv, f"hydra.run.dir={run_dir}"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            ).returncode
        if rc != 0:
            tail = (run_dir / "train.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"train.py failed (exit {rc}) in {run_dir}: {' '.join(tail)}")

    return execute


def in_process_executor() -> Executor:
    """Compose `argv` with Hydra's API and call `memoryformer.training.run.train` in this process (tests)."""
    from hydra import compose, initialize_config_dir

    from memoryformer.conf_schema import register_configs
    from memoryformer.training.run import train

    register_configs()

    def execute(argv: tuple[str, ...], run_dir: Path) -> None:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(
                "config", overrides=[*argv, f"paths.output_dir={run_dir}", f"paths.runs_root={run_dir}"]
            )
        train(cfg)

    return execute


# --------------------------------------------------------------------------- measuring one run
def published_results(path: Path) -> dict[str, dict[str, Any]]:
    """`{run key: result}` of a `docs/reproduction.json` written by `report.write_json` (empty when absent):
    the fields it keeps, marked `"published": True`; `Runner` adopts one only if its argv is the run's."""
    if not path.is_file():
        return {}
    out: dict[str, dict[str, Any]] = {}
    for row in json.loads(path.read_text())["rows"]:
        res = out.setdefault(row["run"], {"key": row["run"], "published": True})
        for k, v in row.items():
            if k == "heldout_bits_per_byte":
                res["heldout"] = {"bits_per_byte": v}
            elif k.startswith(("hash_", "buckets_")):
                names = {"hash_weight_mean": "weight_mean", "buckets_used_mean": "used_mean"}
                res.setdefault("hash", {})[names.get(k, "used_min")] = v
            elif k not in ("table", "row", "run"):
                res[k] = v
    return out


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """`(optimizer steps done, val/loss)` pairs of the run's CSV log, in order (`val/at_step`: the logger's
    own `step` column is one less, Lightning's index of the last training batch)."""
    rows = csv.DictReader((run_dir / "csv" / "metrics.csv").read_text().splitlines())
    return [(int(float(r["val/at_step"])), float(r["val/loss"])) for r in rows if r.get("val/loss")]


def model_config(run_dir: Path):
    """The run's `ModelConfig`, from the config train.py saved beside its checkpoints."""
    from memoryformer.config import ModelConfig

    saved = OmegaConf.to_container(OmegaConf.load(run_dir / "checkpoints" / "config.yaml"), resolve=True)
    return ModelConfig.from_dict(saved["model"])


def cost(run_dir: Path, seq_len: int) -> dict[str, float]:
    """Parameters (embeddings and head included) and training FLOPs per token (forward + backward,
    one multiply-add = one FLOP as in the paper's tables) of the run's model."""
    from memoryformer.flops import build_on_meta, training_flops_per_token

    config = model_config(run_dir)
    params = sum(p.numel() for p in build_on_meta(config).parameters())
    return {"params": params, "flops_per_token": training_flops_per_token(config, seq_len)}


def measure(run: Run, run_dir: Path, scale: Scale, seconds: float) -> dict[str, Any]:
    """The result of a finished run: final validation loss and perplexity, its curve, cost and time."""
    curve = val_curve(run_dir)
    steps = scale.steps * run.budget
    if not curve or curve[-1][0] != steps:
        raise RuntimeError(f"{run_dir} has no val/loss at step {steps}; see {run_dir / 'train.log'}.")
    val_loss = curve[-1][1]
    result = {
        "key": run.key,
        "argv": list(run.argv),
        "seed": run.seed,
        "lr": run.lr,
        "model": run.model,
        "steps": steps,
        "tokens": scale.tokens * run.budget,
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "val_curve": curve,
        "train_seconds": round(seconds, 1),
        **cost(run_dir, scale.seq_len),
    }
    if run.memoryformer:
        from reproduction.hash_stats import hash_stats

        result["hash"] = hash_stats(run_dir / "model", scale.seq_len)
    return result


# --------------------------------------------------------------------------- the scheduler
class Runner:
    """Trains the plan's runs, `workers` at a time, resolving Table 1's best-lr rows once they can be."""

    def __init__(
        self,
        out_dir: Path,
        scale: Scale,
        executor: Executor,
        workers: int = 2,
        log: Callable[[str], None] = print,
        published: dict[str, dict[str, Any]] | None = None,
        train: bool = True,
    ) -> None:
        self.out_dir, self.scale, self.executor, self.workers, self.log = (
            out_dir,
            scale,
            executor,
            workers,
            log,
        )
        self.published = published or {}
        self.results: dict[str, dict[str, Any]] = {}
        self.trained: list[str] = []  # keys trained by this call (not found finished on disk)
        self._lock = threading.Condition()
        self._queue: list[Run] = []
        self._in_flight: set[str] = set()  # keys of the runs being trained now
        self._failed: list[str] = []
        self.train = train  # False: train nothing, settle what the finished runs allow (`execute_plan`)
        self.unfinished: list[str] = []  # with train=False: the rows that still lack runs, by label

    def run_dir(self, run: Run) -> Path:
        return self.out_dir / "runs" / run.key

    def load_finished(self, run: Run) -> dict[str, Any] | None:
        """The run's `result.json`; else its published result when the argv is identical; else None."""
        f = self.run_dir(run) / RESULT
        if f.is_file():
            return json.loads(f.read_text())
        if self.run_dir(run).exists():
            return None  # interrupted here: train it again
        pub = self.published.get(run.key)
        return pub if pub is not None and pub.get("argv") == list(run.argv) else None

    def execute_plan(self, plan: Plan) -> list[Row]:
        """Every row of `plan` with every run finished (resolving pending rows); raises if a run failed.

        With `train=False` nothing is trained: searches settle as far as the finished runs (on disk or
        published) take them, each row is returned with its finished seeds, and the rows and searches still
        missing runs are named in `unfinished` (what a stopped invocation can publish)."""
        runs = plan.runs()
        pending = list(plan.pending)
        rows = list(plan.rows)
        self._queue = [r for r in runs if not self._adopt(r)]
        self._total = len(self._queue) + len(self.results)
        self._start = time.perf_counter()
        self.log(
            f"reproduction: {len(self.results)} runs finished earlier, {len(self._queue)} to train "
            f"({self.workers} at a time)"
        )
        workers = self.workers if self.train else 0
        threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(workers)]
        for t in threads:
            t.start()
        while True:
            with self._lock:
                for p in list(pending):
                    if all(r.key in self.results for r in p.sweep):
                        self._settle(p, pending, rows, plan)
                if not self.train:
                    if not any(all(r.key in self.results for r in p.sweep) for p in pending):
                        break
                    continue
                idle = not self._queue and not self._in_flight
                if idle and (not pending or self._failed):
                    break
                self._lock.wait(timeout=1.0)
        for _ in threads:
            with self._lock:
                self._queue.append(None)  # type: ignore[arg-type]  # stop signal
                self._lock.notify_all()
        for t in threads:
            t.join()
        if self._failed:
            raise RuntimeError("reproduction: these runs failed: " + "; ".join(self._failed))
        if not self.train:  # each row with the seeds that finished; the rest named
            kept, self.unfinished = [], []
            for row in rows:
                runs = [run for run in row.runs if run.key in self.results]
                if len(runs) < len(row.runs):
                    self.unfinished.append(f"{row.label} ({len(runs)} of {len(row.runs)} seeds)")
                if runs:
                    kept.append(dataclasses.replace(row, runs=runs))
            self.unfinished += [f"{p.label} (its search)" for p in pending]
            rows = kept

        def position(row: Row) -> tuple:
            """Plan order; resolved rows after, by their tag ("(b)".."(e)"), width 128 before the second
            width, budget 1 before larger ones, the dense model before the MemoryFormer (not in the order
            their searches ended)."""
            if row in plan.rows:
                return row.table, plan.rows.index(row)
            model = row.runs[0].model
            return (
                row.table,
                len(plan.rows),
                row.label.split()[0],
                model.endswith("_w2"),
                row.runs[0].budget,
                model.startswith("mf"),
            )

        return sorted(rows, key=position)

    def _enqueue(self, runs: list[Run]) -> int:
        """Queue the runs not finished, queued or being trained yet (two rows may resolve to the same run
        while it trains); returns how many were queued (lock held)."""
        busy = self._in_flight | {r.key for r in self._queue if r is not None}
        unseen = [r for r in runs if r.key not in self.results and r.key not in busy]
        new = [r for r in unseen if not self._adopt(r)]
        self._queue += new
        self._total += len(unseen)  # adopted ones count as done, as at the start
        self._lock.notify_all()
        return len(new)

    def _settle(self, p: Pending, pending: list[Pending], rows: list[Row], plan: Plan) -> None:
        """`p`'s sweep has finished: grow it, or resolve it into its row and start what follows (lock
        held)."""
        val_loss = lambda r: self.results[r.key]["val_loss"]  # noqa: E731
        best = p.best(val_loss)
        grown = p.grow(best, self.scale)
        if grown:
            n = self._enqueue(grown)
            self.log(f"  {p.label}: best {best.key} on the grid edge: {len(grown)} more points ({n} new)")
            return
        pending.remove(p)
        if p.seeds:
            row = p.resolve(val_loss, self.scale)
            rows.append(row)
            n = self._enqueue(row.runs)
            self.log(f"  {row.label}: its {len(row.runs)} seeds ({n} new runs)")
        for q in p.follow(best, self.scale):
            pending.append(q)
            plan.sweeps[q.name] = q.sweep
            n = self._enqueue(q.sweep)
            self.log(f"  {q.label or q.name}: from {best.key}, {len(q.sweep)} points ({n} new runs)")

    def _adopt(self, run: Run) -> bool:
        """Take a finished run's result from disk; True when there was one."""
        done = self.load_finished(run)
        if done is not None:
            self.results[run.key] = done
        return done is not None

    def train_again(self, run: Run) -> dict[str, Any]:
        """Train `run` here although a published result was adopted (its model is needed, e.g. for the
        held-out score of a sweep point that became a row run); the new result replaces the published one."""
        self.log(f"  {run.key}: published without a model here: training it again")
        result = self._train(run)
        self.results[run.key] = result
        self.trained.append(run.key)
        before = self.published[run.key]["val_loss"]
        self.log(f"  {run.key}: val/loss {result['val_loss']:.4f} (published: {before:.4f})")
        return result

    def _worker(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    self._lock.wait()
                run = self._queue.pop(self._next_index())
                if run is None:
                    return
                self._in_flight.add(run.key)
            try:
                result = self._train(run)
                with self._lock:
                    self.results[run.key] = result
                    self.trained.append(run.key)
                    self._progress(run, result)
            except Exception as err:  # one failed run must not hide the others' results
                with self._lock:
                    self._failed.append(f"{run.key}: {err}")
                    self.log(f"  FAILED {run.key}: {err}")
            finally:
                with self._lock:
                    self._in_flight.discard(run.key)
                    self._lock.notify_all()

    def _next_index(self) -> int:
        """The queued run to train next (lock held): the stop signal when one is queued; else a search
        point (seed 0) before another seed, as its result may start more runs; among those, the costliest
        first (budget x a rough width and model factor), so that an hour-long run does not start last."""
        if None in self._queue:
            return self._queue.index(None)  # type: ignore[arg-type]

        def priority(i: int) -> tuple:
            run = self._queue[i]
            cost = run.budget * (3 if run.model.endswith("_w2") else 1) * (1.5 if run.memoryformer else 1)
            return run.seed == 0, cost, -i

        return max(range(len(self._queue)), key=priority)

    def _train(self, run: Run) -> dict[str, Any]:
        run_dir = self.run_dir(run)
        if run_dir.exists():  # an interrupted run: train it again from scratch
            shutil.rmtree(run_dir)
        start = time.perf_counter()
        self.executor(run.argv, run_dir)
        result = measure(run, run_dir, self.scale, time.perf_counter() - start)
        atomic_write_text(run_dir / RESULT, json.dumps(result, indent=1) + "\n")
        return result

    def _progress(self, run: Run, result: dict[str, Any]) -> None:
        done = len(self.results)
        elapsed = time.perf_counter() - self._start
        fresh = len(self.trained)
        eta = elapsed / fresh * (self._total - done) / 1 if fresh else float("nan")
        self.log(
            f"[{done}/{self._total}] {run.key}: val/loss {result['val_loss']:.4f} "
            f"({result['train_seconds']:.0f} s); elapsed {elapsed / 60:.1f} min, "
            f"about {eta / 60:.0f} min left"
        )


# --------------------------------------------------------------------------- held-out bits per byte
def export_heldout_docs(out_dir: Path, run_dir: Path) -> Path:
    """The corpus's validation documents as the lm-eval task `sample_heldout` reads them (written once)."""
    from memoryformer.data.sample import export_heldout

    data_dir = out_dir / "eval_data"
    if not (data_dir / "sample_heldout" / "validation.jsonl").is_file():
        data = OmegaConf.load(run_dir / "checkpoints" / "config.yaml").data
        export_heldout(data_dir, int(data.sample_max_bytes), int(data.sample_val_every))
    return data_dir


def heldout_scores(run_dir: Path, data_dir: Path, in_process: bool = False) -> dict[str, float]:
    """bits/byte, byte and word perplexity of the run's exported model on the held-out documents, through
    `evaluate.py eval.tasks=sample` (lm-evaluation-harness; `in_process`: its `run_evaluation` in this
    process, for tests); cached in `<run_dir>/heldout.json`."""
    cached = run_dir / "heldout.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    eval_dir = run_dir / "eval"
    if in_process:
        from memoryformer.evaluation.config import EvalSettings, EvaluateConfig
        from memoryformer.evaluation.runner import run_evaluation

        settings = EvalSettings(tasks=["sample"], data_dir=str(data_dir), bootstrap_iters=0)
        run_evaluation(EvaluateConfig(checkpoint=str(run_dir / "model"), eval=settings), eval_dir)
    else:
        _evaluate_py(run_dir, data_dir, eval_dir)
    res = json.loads((eval_dir / "results.json").read_text())["results"]["sample_heldout"]
    scores = {m: float(res[f"{m},none"]) for m in ("bits_per_byte", "byte_perplexity", "word_perplexity")}
    cached.write_text(json.dumps(scores) + "\n")
    return scores


def _evaluate_py(run_dir: Path, data_dir: Path, eval_dir: Path) -> None:
    """`python evaluate.py checkpoint=<run>/model eval.tasks=sample ...`, output to `<run>/eval.log`."""
    with open(run_dir / "eval.log", "w") as log:
        rc = subprocess.run(
            [
                sys.executable,
                "evaluate.py",
                f"checkpoint={run_dir / 'model'}",
                "eval.tasks=sample",
                f"eval.data_dir={data_dir}",
                f"hydra.run.dir={eval_dir}",
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        ).returncode
    if rc != 0:
        raise RuntimeError(f"evaluate.py failed (exit {rc}) for {run_dir}; see {run_dir / 'eval.log'}.")
