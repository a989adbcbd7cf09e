"""Regenerate the generated tables of the docs: the model table of docs/models.md (from the FLOPs tool) and
the cost table of docs/costs.md (from `benchmarks/compute_budget.py` and the measurements in
docs/throughput.json).

    python scripts/update_docs.py          # rewrite the pages in place
    python scripts/update_docs.py --check  # exit 1 if a page is out of date (used by the tests)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def model_table(seq_len: int = 2048) -> str:
    """The model table of docs/models.md: `python benchmarks/paper_flops.py` columns for every preset."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import paper_flops

    names = tuple(paper_flops.PRESETS)  # every model preset, in memoryformer.config.PRESETS' order
    costs = [paper_flops.model_cost(name, seq_len) for name in names]
    table = paper_flops.format_table1(costs)
    # readers pick configs by their `model=` name, so show it beside the paper's label.
    for name in names:
        label = paper_flops.PAPER_LABELS.get(name, name)
        shown = f"`{name}` ({label})" if label != name else f"`{name}`"
        table = table.replace(f"| {label} |", f"| {shown} |", 1)
    return table


def cost_table() -> str:
    """The table of docs/costs.md: tokens, FLOPs and device-hours per paper row (measured,
    published or estimated; see `benchmarks/compute_budget.py`)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compute_budget

    return compute_budget.format_cost_table(compute_budget.load_measurements())


#: The generated blocks (`<!-- NAME:begin -->` ... `<!-- NAME:end -->`): the page of each, what fills it.
BLOCKS = {"model-table": ("docs/models.md", model_table), "cost-table": ("docs/costs.md", cost_table)}


def render(text: str, blocks: dict = BLOCKS) -> str:
    """`text` with each of `blocks` replaced by a fresh one."""
    for block, (page, make) in blocks.items():
        begin, end = f"<!-- {block}:begin -->", f"<!-- {block}:end -->"
        pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise SystemExit(f"{page} has no {begin} ... {end} block to fill.")
        fresh = f"{begin}\n{make()}\n{end}"
        text = pattern.sub(lambda _, fresh=fresh: fresh, text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a page is not up to date")
    args = parser.parse_args()
    stale = []
    for block, (page, make) in BLOCKS.items():
        path = ROOT / page
        text = path.read_text()
        fresh = render(text, {block: (page, make)})
        if fresh != text:
            stale.append(page)
            if not args.check:
                path.write_text(fresh)
    if args.check and stale:
        print(f"{', '.join(stale)} out of date: run python scripts/update_docs.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
