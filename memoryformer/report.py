"""`python -m memoryformer.report RUN_OR_FOLDER ... --out report/`: the paper's Tables 1-6 from finished runs.

The same command as `python -m memoryformer.evaluation.report` (one tool, a shorter name); see that module.
"""

from __future__ import annotations

import sys

from memoryformer.evaluation.report import main, render

__all__ = ["main", "render"]

if __name__ == "__main__":
    sys.exit(main())
