"""Zero-shot evaluation of a MemoryFormer checkpoint or a Pythia baseline through lm-evaluation-harness.

    python evaluate.py checkpoint=PATH                        # the paper's six tasks (eval.tasks=paper)
    python evaluate.py checkpoint=PATH eval.tasks=[piqa,arc_easy] eval.limit=200 eval.device=cuda
    python evaluate.py checkpoint=PATH eval.data_dir=/data/lm_eval  # offline: download_eval_data.py
    python evaluate.py baseline=hf model_path=/models/pythia-70m-deduped
    python evaluate.py checkpoint=PATH eval.tasks=sample eval.data_dir=DIR  # held-out perplexity, bundled
        # corpus; DIR from `python -m memoryformer.data.sample --export-eval DIR` (what `make train` runs)

Writes results.json (lm-eval's output), results.md and run_info.json into the Hydra run directory; render
several runs as the paper's Tables 1-6 with `python -m memoryformer.evaluation.report RUN_DIR...`.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from memoryformer.conf_schema import register_configs
from memoryformer.errors import exit_on_user_error, reports_user_errors
from memoryformer.evaluation.config import EvaluateConfig

register_configs()  # evaluate_defaults / generate_defaults: the options and their defaults


# reports_user_errors: a bad option, checkpoint or task directory ends in one sentence and exit status 2
@reports_user_errors
@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    """Validate the config, run lm-eval, write the results; returns the average of the chosen accuracy
    metrics (or, when only perplexity tasks ran, their average word perplexity) for Hydra sweepers."""
    from memoryformer.evaluation.runner import run_evaluation
    from memoryformer.evaluation.scores import task_scores

    with exit_on_user_error():
        config = EvaluateConfig.from_mapping(cfg)
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        results = run_evaluation(config, out_dir)
    rows = task_scores(results, config.eval) if results else []
    print((out_dir / "results.md").read_text() if results else "")
    print(f"results written to {out_dir}")
    acc = [r["value"] for r in rows if r["kind"] == "accuracy"] or [r["value"] for r in rows]
    return sum(acc) / len(acc) if acc else 0.0


if __name__ == "__main__":
    main()
