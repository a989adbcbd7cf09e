"""Zero-shot evaluation through lm-evaluation-harness: the `memoryformer` lm-eval model (`lm_adapter`),
offline task data (`data`, `tasks/`), one run (`runner`, used by evaluate.py), its scores and results.md
(`scores`) and the paper's tables (`report`; its rows, titles and figures in `tables` and `figures`, which
the CPU reproduction lays out too)."""

from memoryformer.evaluation.config import TASK_SETS, EvalSettings, EvaluateConfig

__all__ = ["TASK_SETS", "EvalSettings", "EvaluateConfig"]
