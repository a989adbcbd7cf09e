"""`memoryformer-lm-eval`: lm-eval's own command line with the `memoryformer` model registered.

lm-eval has no plugin entry points, so `lm_eval --model memoryformer` cannot find our adapter by itself.
This wrapper imports it (which registers the model) and then runs lm-eval's CLI unchanged:

    memoryformer-lm-eval --model memoryformer --model_args checkpoint=PATH --tasks piqa --device cuda
    memoryformer-lm-eval --model memoryformer --model_args checkpoint=PATH --tasks piqa \\
        --include_path "$(python -c 'import memoryformer.evaluation.data as d; print(d.TASKS_DIR)')" \\
        --metadata '{"data_dir": "/data/lm_eval"}'          # offline tasks read from DIR/<task>/<split>.jsonl

`--data_dir DIR` is a shortcut for the last two flags.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str] | None = None) -> None:
    """Register the memoryformer model, expand `--data_dir DIR`, then call `lm_eval.__main__.cli_evaluate`."""
    from lm_eval.__main__ import cli_evaluate

    import memoryformer.evaluation.lm_adapter  # noqa: F401 - registers the "memoryformer" lm-eval model
    from memoryformer.evaluation.data import TASKS_DIR

    args = list(sys.argv[1:] if argv is None else argv)
    if "--data_dir" in args:
        i = args.index("--data_dir")
        if i + 1 >= len(args):
            raise SystemExit("error: --data_dir needs a directory (DIR/<task>/<split>.jsonl).")
        data_dir = args[i + 1]
        del args[i : i + 2]
        if "--metadata" in args:
            raise SystemExit(
                "error: give the data directory either as --data_dir or inside --metadata, not both."
            )
        args += ["--include_path", str(TASKS_DIR), "--metadata", json.dumps({"data_dir": data_dir})]
    sys.argv = [sys.argv[0], *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
