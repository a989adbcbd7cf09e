"""Regenerate the generated parts of README.md: the model table (from the FLOPs tool) and the cost table
of the paper's rows (from `benchmarks/compute_budget.py` and the measurements in docs/throughput.json).

    python scripts/update_readme.py          # rewrite README.md in place
    python scripts/update_readme.py --check  # exit 1 if README.md is out of date (used by the tests)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def model_table(seq_len: int = 2048) -> str:
    """The README's model table: `python benchmarks/paper_flops.py` columns for every model preset."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import paper_flops

    names = tuple(paper_flops.PRESETS)  # every model preset, in memoryformer.config.PRESETS' order
    costs = [paper_flops.model_cost(name, seq_len) for name in names]
    table = paper_flops.format_table1(costs)
    # README readers pick configs by their `model=` name, so show it beside the paper's label.
    for name in names:
        label = paper_flops.PAPER_LABELS.get(name, name)
        shown = f"`{name}` ({label})" if label != name else f"`{name}`"
        table = table.replace(f"| {label} |", f"| {shown} |", 1)
    return table


def cost_table() -> str:
    """The README's "What a row costs" table: tokens, FLOPs and device-hours per paper row (measured,
    published or estimated; see `benchmarks/compute_budget.py`)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compute_budget

    return compute_budget.format_cost_table(compute_budget.load_measurements())


#: The README's generated blocks (`<!-- NAME:begin -->` ... `<!-- NAME:end -->`) and what fills each.
BLOCKS = {"model-table": model_table, "cost-table": cost_table}


def render(text: str) -> str:
    """README text with every generated block replaced by a fresh one."""
    for block, make in BLOCKS.items():
        begin, end = f"<!-- {block}:begin -->", f"<!-- {block}:end -->"
        pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no {begin} ... {end} block to fill.")
        fresh = f"{begin}\n{make()}\n{end}"
        text = pattern.sub(lambda _, fresh=fresh: fresh, text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if README.md is not up to date")
    args = parser.parse_args()
    text = README.read_text()
    fresh = render(text)
    if args.check:
        if fresh != text:
            print("README.md is out of date: run python scripts/update_readme.py")
            return 1
        return 0
    README.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
