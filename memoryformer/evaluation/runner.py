"""One evaluation run: build the lm-eval model and tasks, call `lm_eval.simple_evaluate`, write the results.

`run_evaluation(cfg, out_dir)` writes into `out_dir`:
- `results.json`: lm-eval's own result dict (as `simple_evaluate` returns it, samples left out);
- `results.md`: the scores per task, rendered by `evaluation.scores.results_markdown`;
- `run_info.json`: what was evaluated (model config, label, settings), read by `evaluation.report`.
"""

from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path
from typing import Any

from memoryformer.config import ConfigError
from memoryformer.evaluation.config import TASK_SETS, EvaluateConfig
from memoryformer.evaluation.data import TASKS_DIR, split_file
from memoryformer.evaluation.scores import results_markdown

log = logging.getLogger(__name__)


def build_task_manager(data_dir: str | None):
    """lm-eval `TaskManager`: our offline task YAMLs only when `data_dir` is set, else lm-eval's hub tasks."""
    from lm_eval.tasks import TaskManager

    if data_dir:
        # Only our YAMLs are indexed: fast, and no task can silently fall back to the hub.
        return TaskManager(
            include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(data_dir)}
        )
    return TaskManager()


def check_tasks(tasks: list[str], task_manager: Any, data_dir: str | None) -> None:
    """Raise `ConfigError` for a task lm-eval does not know, or whose local data file is missing."""
    known = set(task_manager.all_tasks)
    for task in tasks:
        if task not in known:
            near = difflib.get_close_matches(task, sorted(known), n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            where = "the offline task set (memoryformer/evaluation/tasks)" if data_dir else "lm-eval"
            raise ConfigError(
                f"eval.tasks: unknown task {task!r} in {where}{hint}; use a task name or a named set "
                f"({', '.join(TASK_SETS)})."
            )
        if data_dir:
            split_file(data_dir, task)  # raises DataError naming the missing file


def build_lm(cfg: EvaluateConfig) -> tuple[Any, dict[str, Any]]:
    """`(lm-eval model, run info)` for our checkpoint or, with `baseline=hf`, lm-eval's `hf` model."""
    s = cfg.eval
    if cfg.baseline == "hf":
        try:
            from lm_eval.models.huggingface import HFLM
        except ImportError as err:  # lm-eval's hf model needs accelerate, which plain lm-eval does not pull
            raise ConfigError(
                f"baseline=hf needs lm-eval's Hugging Face model, which failed to import ({err}); "
                "run `pip install accelerate` (or `pip install memoryformer[eval]`)."
            ) from err
        from transformers import AutoConfig

        from memoryformer.models.convert import config_from_hf

        path = Path(cfg.model_path).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model_path={path} has no config.json; point it at a local Hugging Face model directory."
            )
        meta = json.loads((path / "config.json").read_text(encoding="utf-8"))
        # Our exported MemoryFormer directories carry their modeling code: lm-eval must be allowed to run it.
        remote_code = meta.get("model_type") == "memoryformer"
        if remote_code:
            from memoryformer.hf.config_map import from_hf_config

            model_config = from_hf_config(meta)
        else:
            model_config = config_from_hf(AutoConfig.from_pretrained(str(path)))
        lm = HFLM(
            pretrained=str(path),
            dtype=s.dtype,
            device=s.device,
            batch_size=s.batch_size,
            max_length=s.max_length,
            trust_remote_code=remote_code,
        )
        return lm, {"kind": "hf", "model_path": str(path), "model": model_config.to_dict()}
    from memoryformer.evaluation.lm_adapter import MemoryFormerLM

    lm = MemoryFormerLM(
        checkpoint=cfg.checkpoint,
        trust_checkpoint=cfg.trust_checkpoint,
        tokenizer=cfg.tokenizer,
        batch_size=s.batch_size,
        device=s.device,
        dtype=s.dtype,
        max_length=s.max_length,
    )
    return lm, {"kind": "memoryformer", "checkpoint": str(cfg.checkpoint), "model": lm.model.config.to_dict()}


def run_evaluation(cfg: EvaluateConfig, out_dir: str | Path, lm: Any = None) -> dict[str, Any]:
    """Evaluate `cfg.eval.tasks` zero-shot; write results.json, results.md and run_info.json; return results.

    `lm` (an lm-eval `LM`) replaces the model built from `cfg` (used by tests with scripted scorers).
    """
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    s = cfg.eval
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task_manager = build_task_manager(s.data_dir)
    check_tasks(s.tasks, task_manager, s.data_dir)
    info: dict[str, Any] = {"kind": "custom"}
    if lm is None:
        lm, info = build_lm(cfg)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(s.tasks),
        num_fewshot=s.num_fewshot,
        limit=s.limit,
        bootstrap_iters=s.bootstrap_iters,
        task_manager=task_manager,
        log_samples=False,
        random_seed=s.seed,
        numpy_random_seed=s.seed,
        torch_random_seed=s.seed,
        fewshot_random_seed=s.seed,
    )
    if results is None:  # non-zero rank of a distributed run
        return {}
    model_cfg = info.get("model")
    info.update(
        label=cfg.label or (model_cfg or {}).get("name") or "model",
        settings=cfg.to_dict(),
        lm_eval_version=lm_eval.__version__,
    )
    (out / "results.json").write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    (out / "run_info.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    (out / "results.md").write_text(results_markdown(results, s, info))
    return results
