"""What `make reproduce-cpu` trains: the scale, the models, and the runs each of the paper's six tables needs.

A *run* is one `train.py` command (its argv) and is trained once; a *table row* names the runs (one per seed)
that fill it, so a run shared by several tables (the MemoryFormer at lr 3e-3 is Table 1's protocol row, Table
3's tau = 8 row, Table 4's 3e-3 row and Table 5's 2-bit row) costs its steps once.

Table 1 has rows whose learning rate is chosen from other runs (each model at the best lr of its sweep): those
rows are `Pending` until their sweep has finished, then `resolve()` turns them into runs. A `GridSearch` is a
pending row whose sweep is a grid over `optim.lr` x `optim.block_lr_scale` (Table 1 (d)): while its best
point sits on the grid's edge it `grow`s the grid one step beyond that edge, and once resolved it can start
further pending rows from its best point (`follow`: the second width's lr search, the embedding-lr search).
Those two are `LineSearch`es: one setting swept at seed 0, grown the same way past an end point.

A run's *budget* multiplies its steps (and so its training tokens and its lr schedule's horizon); Table 1
(e) is searched again at `Scale.budgets` (`follow` of the (e) searches: the lr around the 1x optimum, then
the best at its seeds; at the second width the largest budget takes the next one's best lr, unsearched).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

TABLES = ("1", "2", "3", "4", "5", "6")


@dataclass(frozen=True)
class Scale:
    """Training length and shapes shared by every run (the paper's MF-tiny protocol, scaled to a CPU).

    Every run trains `steps` optimizer steps of `batch` sequences of `seq_len` tokens on the bundled corpus,
    validates every `val_every` steps on `val_samples` held-out sequences, and keeps the optimizer recipe of
    `OptimConfig` (AdamW, cosine over the run, warmup `warmup_ratio`).
    """

    steps: int = 200
    seq_len: int = 128
    batch: int = 8
    val_every: int = 50
    val_samples: int = 128
    warmup_ratio: float = 0.03
    seeds_table1: tuple[int, ...] = (0, 1, 2)
    seeds_ablation: tuple[int, ...] = (0, 1)
    # Table 1 (b): each model's own lr sweep; the dense models also get the paper's protocol lr (1e-3)
    lrs_mf: tuple[float, ...] = (1e-3, 2e-3, 3e-3, 4e-3, 1e-2)  # contains Table 4's grid
    # the same grid, plus 2e-2: the dense twin's loss still fell at 1e-2, the grid's edge (first full run)
    lrs_dense: tuple[float, ...] = (1e-3, 2e-3, 3e-3, 4e-3, 1e-2, 2e-2)
    lrs_dense_wide: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    lr_dense_protocol: float = 1e-3  # Pythia-70M's lr, the paper's Table 4 baseline
    lr_mf_ratio: float = 3.0  # the paper: MemoryFormer lr = 3 x the matching Pythia lr
    lrs_table4: tuple[float, ...] = (1e-3, 2e-3, 3e-3, 4e-3)  # the paper's Table 4 grid
    # Table 1 (d): optim.lr x optim.block_lr_scale for both models, seed 0. Scale 1 is the (b) sweep (its
    # runs are reused) plus these lrs; the other scales are tried at these lrs. The search grows the grid
    # by one x3 step past any edge its best point sits on, and both ways along an axis where the best point
    # is the only one tried (`d_grow_limit` points at most per model). The limit was 6 when the search grew
    # only past edges; 12 lets a best point that moves off the starting grid (the MemoryFormer's, to block
    # scale 0.03, where one lr had been tried) walk a few steps further, and still bounds a search that
    # would not settle (each point is one ~1 min run).
    lrs_grid: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    block_scales: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)
    d_grow_limit: int = 12
    # the best pair's embedding_lr_scale search (seed 0): these probes around scale 1, grown by x3 steps
    # past an end point (`embedding_grow_limit` points at most), then the best at `seeds_table1` (row (e));
    # empty: not searched
    embedding_scales: tuple[float, ...] = (0.3, 3.0)
    embedding_grow_limit: int = 3
    # Table 1 at a second width: the MemoryFormer and its twin, block scale from width 128's best, lr at
    # the width-128 best times these factors (rounded to one digit), grown by x3 steps past an end point
    # (`width2_grow_limit` points at most), then `seeds_width2` at the best lr
    width2_n_embd: int = 256
    width2_n_layer: int = 4
    width2_num_tables: int = 32  # K = 256 / tau with tau = 8
    width2_lr_factors: tuple[float, ...] = (1 / 3, 1.0, 3.0)
    width2_grow_limit: int = 2
    # 3 seeds, as at width 128: with 2, the width-256 (e) difference (+0.03) stayed within 2 standard errors
    seeds_width2: tuple[int, ...] = (0, 1, 2)
    # Table 1 (e) at more training tokens: each budget multiplies the steps (the schedule follows). Width
    # 128: at every budget the lr is searched at `budget_lr_factors` x the 1x (e) optimum (block and
    # embedding scales kept), grown by x3 past an end that wins (`budget_grow_limit` points at most), the
    # best at `seeds_budget`. Width 256: the same at the first budget; at each later one, the previous
    # budget's best lr at `seeds_budget_width2_unsearched` (a width-256 run of 16x costs about an hour)
    budgets: tuple[int, ...] = (4, 16)
    budget_lr_factors: tuple[float, ...] = (1 / 3, 1.0, 3.0)
    budget_grow_limit: int = 2
    seeds_budget: tuple[int, ...] = (0, 1, 2)
    seeds_budget_width2_unsearched: tuple[int, ...] = (0,)
    # The dense model with about the MemoryFormer's parameter count (Table 1's equal-parameter row)
    wide_n_embd: int = 384
    wide_n_layer: int = 4
    wide_n_head: int = 6
    # model=nano shrunk for tests; empty for the real protocol
    model_overrides: tuple[str, ...] = ()

    @property
    def tokens(self) -> int:
        """Training tokens of a run at budget 1."""
        return self.steps * self.batch * self.seq_len

    @property
    def lr_mf_protocol(self) -> float:
        return self.lr_dense_protocol * self.lr_mf_ratio

    def describe(self) -> dict:
        """The scale as plain values (written into docs/reproduction.json)."""
        return {**dataclasses.asdict(self), "tokens_per_run": self.tokens}


#: A 2-step protocol on a 1-layer nano model: the driver's tests, not a measurement.
SMOKE = Scale(
    steps=2,
    seq_len=16,
    batch=2,
    val_every=2,
    val_samples=4,
    seeds_table1=(0,),  # one seed: the test checks the plumbing, not the spread
    seeds_ablation=(0, 1),
    lrs_mf=(3e-3,),
    lrs_dense=(1e-3,),
    lrs_dense_wide=(1e-3,),
    lrs_table4=(1e-3, 3e-3),
    lrs_grid=(3e-3,),
    block_scales=(0.3, 1.0),
    d_grow_limit=1,
    embedding_scales=(3.0,),
    embedding_grow_limit=1,
    width2_n_embd=64,
    width2_n_layer=1,
    width2_num_tables=8,
    width2_lr_factors=(1.0,),
    width2_grow_limit=1,
    seeds_width2=(0,),
    budgets=(2, 3),
    budget_lr_factors=(1.0,),
    budget_grow_limit=1,
    seeds_budget=(0,),
    seeds_budget_width2_unsearched=(0,),
    wide_n_embd=64,
    wide_n_layer=1,
    wide_n_head=2,
    model_overrides=("model.n_layer=1", "model.block_size=64"),
)

SCALES = {"cpu": Scale(), "smoke": SMOKE}


# --------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Run:
    """One `train.py` command: `python train.py <argv>` trains it. `key` names its folder."""

    key: str
    model: str  # mf | dense | dense_wide | mf_w2 | dense_w2: the Table 1 model it is a variant of
    lr: float
    seed: int
    argv: tuple[str, ...]
    memoryformer: bool
    variant: tuple[tuple[str, str], ...] = ()  # the overrides beyond the model's own, sorted
    budget: int = 1  # steps (and training tokens) in units of the scale's `steps`

    def setting(self, key: str, default: float = 1.0) -> float:
        """The value of the override `key` (e.g. "optim.block_lr_scale"), or `default` when not set."""
        return float(dict(self.variant).get(key, default))


def _lr_tag(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def _model_args(model: str, scale: Scale) -> list[str]:
    """train.py arguments of the three Table 1 models; Tables 2-6 vary them with extra overrides."""
    args = ["model=nano", *scale.model_overrides]
    if model == "dense":  # the MemoryFormer's twin: same width, depth, heads; 4x GELU MLP, Linear QKV
        args.append("model.block=pythia")
    elif model == "dense_wide":
        args += [
            "model.block=pythia",
            f"model.n_embd={scale.wide_n_embd}",
            f"model.n_layer={scale.wide_n_layer}",
            f"model.n_head={scale.wide_n_head}",
        ]
    elif model in ("mf_w2", "dense_w2"):  # Table 1 at the second width: same heads, wider and deeper
        args += [f"model.n_embd={scale.width2_n_embd}", f"model.n_layer={scale.width2_n_layer}"]
        args.append(
            "model.block=pythia" if model == "dense_w2" else f"model.num_tables={scale.width2_num_tables}"
        )
    elif model != "mf":
        raise ValueError(f"unknown model {model!r}; use mf, dense, dense_wide, mf_w2 or dense_w2.")
    return args


def make_run(
    model: str,
    lr: float,
    seed: int,
    scale: Scale,
    variant: dict[str, str] | None = None,
    budget: int = 1,
) -> Run:
    """The run of `model` at `lr` and `seed`, with `variant` overrides (e.g. {"model.expand_bits": "0"}),
    trained for `budget` x the scale's steps (validating `budget` x as seldom, so every curve has as many
    points)."""
    variant = dict(variant or {})
    tag = "".join(f"-{k.split('.')[-1]}{v}" for k, v in sorted(variant.items()))
    key = f"{model}{tag}-lr{_lr_tag(lr)}{f'-x{budget}' if budget != 1 else ''}-s{seed}"
    argv = (
        *_model_args(model, scale),
        *(f"{k}={v}" for k, v in sorted(variant.items())),
        "data=sample",
        f"data.seq_len={scale.seq_len}",
        f"data.val_samples={scale.val_samples}",
        f"global_batch_size={scale.batch}",
        f"trainer.max_steps={scale.steps * budget}",
        f"val_every_n_steps={scale.val_every * budget}",
        f"optim.lr={lr:g}",
        f"optim.warmup_ratio={scale.warmup_ratio:g}",
        f"seed={seed}",
        f"name=repro-{key}",
        "logger=csv",
        "ckpt_every_n_steps=null",
        "bucket_stats_every_n_steps=0",
        "trainer.enable_progress_bar=false",
        "print_config=false",
    )
    return Run(
        key,
        model,
        lr,
        seed,
        tuple(argv),
        memoryformer=model.startswith("mf"),
        variant=tuple(sorted(variant.items())),
        budget=budget,
    )


# --------------------------------------------------------------------------- table rows
@dataclass
class Row:
    """One row of a table: its label, the swept setting's value (for plots) and its runs (one per seed)."""

    table: str
    label: str
    runs: list[Run]
    setting: float | None = None
    note: str = ""
    source: Pending | None = None  # the pending row this one resolved


@dataclass
class Pending:
    """A Table 1 row at `model`'s best lr, known once every run of `sweep` has a result."""

    table: str
    label: str
    model: str
    sweep: list[Run]
    seeds: tuple[int, ...]  # empty: a probe that only reports its sweep, with no row
    note: str = ""
    name: str = ""  # the sweep's name in the report (Plan.sweeps)

    def best(self, val_loss: Callable[[Run], float]) -> Run:
        """The sweep's run with the lowest final validation loss."""
        return min(self.sweep, key=val_loss)

    def grow(self, best: Run, scale: Scale) -> list[Run]:
        """Runs to add to the sweep before resolving (none: the sweep is final)."""
        return []

    def follow(self, best: Run, scale: Scale) -> list[Pending]:
        """Pending rows that start once this one resolved, from its best run."""
        return []

    def resolve(self, val_loss: Callable[[Run], float], scale: Scale) -> Row:
        """The row at the sweep's lowest final validation loss (seed 0 of every point), at `seeds`."""
        best = self.best(val_loss)
        variant = dict(best.variant)
        runs = [make_run(self.model, best.lr, s, scale, variant, best.budget) for s in self.seeds]
        settings = "".join(f", {k.split('.')[-1].replace('_', ' ')} {v}" for k, v in sorted(variant.items()))
        label = f"{self.label} (best lr {best.lr:g}{settings})"
        return Row(self.table, label, runs, best.lr, self.note, source=self)


def round_lr(lr: float) -> float:
    """`lr` to one significant digit (1/3 of 1e-2 -> 3e-3), so grid points have distinct run keys."""
    return float(f"{lr:.0e}")


def _beyond(value: float, tried: list[float]) -> list[float]:
    """The x3 / (/3) steps past `value` when it is an end point of the values `tried` along one axis: the
    step outward from the end it sits on, or both steps when it is the only value tried (one point says
    nothing about the direction). Rounded to one significant digit; empty when `value` is inside."""
    if len(set(tried)) == 1:
        return [round_lr(value / 3), round_lr(value * 3)]
    if value == max(tried):
        return [round_lr(value * 3)]
    if value == min(tried):
        return [round_lr(value / 3)]
    return []


@dataclass
class GridSearch(Pending):
    """Table 1 (d): `model` over `optim.lr` x `optim.block_lr_scale` (seed 0), grown past its edges.

    `grow`: at the best point's block scale, the lr steps `_beyond` the best lr among the lrs tried there
    (x 3 past the largest, / 3 past the smallest, both when it is the only lr tried); at its lr, the same
    for the block scale; at most `scale.d_grow_limit` added points. `follow`: the second width's lr search
    with the best block scale (row (d) width 256), and the `embedding_lr_scale` search at the best pair
    (row (e), which then starts the second width's lr search at its best scales too).
    """

    width2: str | None = None  # the model at the second width (mf_w2 / dense_w2), or None
    grown: int = 0

    def grow(self, best: Run, scale: Scale) -> list[Run]:
        if self.grown >= scale.d_grow_limit:
            return []
        b = best.setting(BLOCK)
        same_scale = [r.lr for r in self.sweep if r.setting(BLOCK) == b]
        same_lr = [r.setting(BLOCK) for r in self.sweep if r.lr == best.lr]
        points = [(lr, b) for lr in _beyond(best.lr, same_scale)]
        points += [(best.lr, sc) for sc in _beyond(b, same_lr)]
        keys = {r.key for r in self.sweep}
        new = [_grid_run(self.model, lr, sc, 0, scale) for lr, sc in points]
        new = [r for r in new if r.key not in keys][: scale.d_grow_limit - self.grown]
        self.grown += len(new)
        self.sweep += new
        return new

    def follow(self, best: Run, scale: Scale) -> list[Pending]:
        what = _what(self.model)
        out: list[Pending] = []
        if self.width2:
            out.append(_width2_search(self.width2, best, f"(d) width {scale.width2_n_embd}: {what}", scale))
        if scale.embedding_scales:
            probes = [
                make_run(self.model, best.lr, 0, scale, {**dict(best.variant), EMBEDDING: f"{e:g}"})
                for e in scale.embedding_scales
            ]
            out.append(
                LineSearch(
                    self.table,
                    f"(e) {what} at its best embedding lr scale too",
                    self.model,
                    [best, *probes],
                    self.seeds,
                    name=f"{self.name}-embedding",
                    base=best,
                    axis=EMBEDDING,
                    limit=scale.embedding_grow_limit,
                    width2=self.width2,
                    budgets=scale.budgets,
                )
            )
        return out


def _what(model: str) -> str:
    return "MemoryFormer" if model.startswith("mf") else "dense twin"


def _width2_search(width2: str, best: Run, label: str, scale: Scale, name: str = "") -> LineSearch:
    """The second width's lr search: `width2` at the width-128 best run's lr times `width2_lr_factors`,
    with its other settings (block and embedding lr scales) carried over; then `seeds_width2` at the best.
    The (e) search (`name` ending in "-embedding") goes on to the first token budget (`budgets`)."""
    lrs = sorted({round_lr(best.lr * f) for f in scale.width2_lr_factors})
    sweep = [make_run(width2, lr, 0, scale, dict(best.variant)) for lr in lrs]
    return LineSearch(
        "1",
        label,
        width2,
        sweep,
        scale.seeds_width2,
        name=name or width2,
        base=best,
        limit=scale.width2_grow_limit,
        budgets=scale.budgets[:1] if name.endswith("-embedding") else (),
    )


def _budget_label(model: str, budget: int, scale: Scale) -> str:
    width = f"width {scale.width2_n_embd}, " if model.endswith("_w2") else ""
    return f"(e) {width}{budget}x tokens: {_what(model)}"


def _budget_search(model: str, best: Run, budget: int, scale: Scale, width2_next: bool) -> LineSearch:
    """Table 1 (e) at `budget` x the tokens: `model` at `budget_lr_factors` x the 1x optimum `best`'s lr (its
    block and embedding scales kept), grown past a winning end, the best at `seeds_budget`; at the second
    width (`width2_next`) the next budget follows with the best lr, unsearched."""
    lrs = sorted({round_lr(best.lr * f) for f in scale.budget_lr_factors})
    nxt = [b for b in scale.budgets if b > budget][:1] if width2_next else []
    return LineSearch(
        "1",
        _budget_label(model, budget, scale),
        model,
        [make_run(model, lr, 0, scale, dict(best.variant), budget) for lr in lrs],
        scale.seeds_budget,
        name=f"{model}-x{budget}",
        base=best,
        limit=scale.budget_grow_limit,
        budget=budget,
        unsearched=tuple(nxt),
    )


BLOCK = "optim.block_lr_scale"
EMBEDDING = "optim.embedding_lr_scale"


@dataclass
class LineSearch(Pending):
    """One setting of `model` swept at seed 0 around the run `base` (its other settings kept): `optim.lr`
    (`axis` "lr": the second width's and the token budgets' searches) or an override such as
    `optim.embedding_lr_scale`, at `budget` x the scale's steps.

    `grow`: while the best value is an end point of the values tried, the x3 step past it (`_beyond`), at
    most `limit` added points; then the best run at `seeds` (the row). `follow`: the second width's lr search
    at the best block and embedding lr scales (`width2`, row (e) width 256); the lr searched again at each
    of `budgets`; the best lr trained unsearched at each of `unsearched` (larger budgets).
    """

    base: Run | None = None
    axis: str = "lr"
    limit: int = 0
    grown: int = 0
    width2: str | None = None  # the embedding search: the second width's lr search at its best, or None
    budget: int = 1
    budgets: tuple[int, ...] = ()
    unsearched: tuple[int, ...] = ()

    def value(self, run: Run) -> float:
        return run.lr if self.axis == "lr" else run.setting(self.axis)

    def grow(self, best: Run, scale: Scale) -> list[Run]:
        if self.grown >= self.limit:
            return []
        tried = [self.value(r) for r in self.sweep]
        steps = _beyond(self.value(best), tried) if len(set(tried)) > 1 else []
        keys = {r.key for r in self.sweep}
        new = [self._run(v, scale) for v in steps]
        new = [r for r in new if r.key not in keys][: self.limit - self.grown]
        self.grown += len(new)
        self.sweep += new
        return new

    def _run(self, value: float, scale: Scale) -> Run:
        assert self.base is not None
        variant = dict(self.base.variant)
        if self.axis == "lr":
            return make_run(self.model, value, 0, scale, variant, self.budget)
        return make_run(self.model, self.base.lr, 0, scale, {**variant, self.axis: f"{value:g}"}, self.budget)

    def follow(self, best: Run, scale: Scale) -> list[Pending]:
        out: list[Pending] = []
        if self.width2:
            label = f"(e) width {scale.width2_n_embd}: {_what(self.model)} at its best embedding lr scale too"
            out.append(_width2_search(self.width2, best, label, scale, name=f"{self.width2}-embedding"))
        for b in self.budgets:
            out.append(_budget_search(self.model, best, b, scale, width2_next=self.model.endswith("_w2")))
        for b in self.unsearched:
            run = make_run(self.model, best.lr, 0, scale, dict(best.variant), b)
            label = f"{_budget_label(self.model, b, scale)} at the {self.budget}x best lr, unsearched"
            out.append(
                Pending(
                    "1",
                    label,
                    self.model,
                    [run],
                    scale.seeds_budget_width2_unsearched,
                    name=f"{self.model}-x{b}",
                )
            )
        return out

    def resolve(self, val_loss: Callable[[Run], float], scale: Scale) -> Row:
        row = super().resolve(val_loss, scale)
        if self.name.endswith("-embedding") and EMBEDDING not in dict(self.best(val_loss).variant):
            row.label = row.label[:-1] + ", embedding lr scale 1)"  # the searched scale, even at its default
        return row


def _grid_run(model: str, lr: float, block_scale: float, seed: int, scale: Scale) -> Run:
    """`model` at `lr` with `optim.block_lr_scale`; scale 1 adds no override (the (b) sweep's own run)."""
    variant = {} if block_scale == 1.0 else {"optim.block_lr_scale": f"{block_scale:g}"}
    return make_run(model, lr, seed, scale, variant)


@dataclass
class Plan:
    """Every row of the selected tables, and the sweeps that only feed lr choices."""

    rows: list[Row] = field(default_factory=list)
    pending: list[Pending] = field(default_factory=list)
    sweeps: dict[str, list[Run]] = field(default_factory=dict)

    def runs(self) -> list[Run]:
        """Every run needed before `pending` can resolve, without duplicates, in plan order."""
        out: dict[str, Run] = {}
        for run in [r for rows in self.sweeps.values() for r in rows] + [
            r for row in self.rows for r in row.runs
        ]:
            out.setdefault(run.key, run)
        return list(out.values())


def _seeds(model: str, lr: float, seeds: Iterable[int], scale: Scale, variant=None) -> list[Run]:
    return [make_run(model, lr, s, scale, variant) for s in seeds]


def table1(scale: Scale, plan: Plan) -> None:
    """MemoryFormer vs its dense twin: (a) the paper's lr protocol, (b) each at its best lr, plus a dense
    model with about the MemoryFormer's parameter count at its best lr (equal parameters, not equal FLOPs)."""
    s1 = scale.seeds_table1
    plan.sweeps["mf"] = _seeds_lrs("mf", scale.lrs_mf, scale)
    plan.sweeps["dense"] = _seeds_lrs("dense", scale.lrs_dense, scale)
    plan.sweeps["dense_wide"] = _seeds_lrs("dense_wide", scale.lrs_dense_wide, scale)
    plan.rows += [
        Row(
            "1",
            f"(a) dense twin, lr {scale.lr_dense_protocol:g} (Pythia-70M's)",
            _seeds("dense", scale.lr_dense_protocol, s1, scale),
            scale.lr_dense_protocol,
        ),
        Row(
            "1",
            f"(a) MemoryFormer, lr {scale.lr_mf_protocol:g} (3x, the paper's protocol)",
            _seeds("mf", scale.lr_mf_protocol, s1, scale),
            scale.lr_mf_protocol,
        ),
    ]
    plan.pending += [
        Pending("1", "(b) dense twin", "dense", plan.sweeps["dense"], s1),
        Pending("1", "(b) MemoryFormer", "mf", plan.sweeps["mf"], s1),
        Pending(
            "1", "(c) dense, about the MemoryFormer's parameters", "dense_wide", plan.sweeps["dense_wide"], s1
        ),
    ]
    for model, what in (("mf", "MemoryFormer"), ("dense", "dense twin")):
        grid = _block_scale_grid(model, plan.sweeps[model], scale)
        plan.sweeps[f"{model}-grid"] = grid
        label = f"(d) {what}"
        plan.pending.append(
            GridSearch("1", label, model, grid, s1, name=f"{model}-grid", width2=f"{model}_w2")
        )


def _block_scale_grid(model: str, lr_sweep: list[Run], scale: Scale) -> list[Run]:
    """Table 1 (d)'s starting grid: the (b) lr sweep at block scale 1, and `lrs_grid` x `block_scales`."""
    out = {r.key: r for r in lr_sweep}
    for b in scale.block_scales:
        for lr in scale.lrs_grid:
            run = _grid_run(model, lr, b, 0, scale)
            out.setdefault(run.key, run)
    return list(out.values())


def _seeds_lrs(model: str, lrs: Iterable[float], scale: Scale) -> list[Run]:
    """Seed 0 of `model` at every lr of its sweep."""
    return [make_run(model, lr, 0, scale) for lr in lrs]


def table2(scale: Scale, plan: Plan) -> None:
    """The dense twin with its softmax attention swapped (the paper builds Table 2 on Pythia-410M).

    Linformer compresses blocks of L = seq_len / 8 keys to L / 4 rows, the ratio of `linformer_410m` at
    sequence 2048 (L = 256, k = 64); Performer and cosFormer keep their defaults.
    """
    lr, seeds = scale.lr_dense_protocol, scale.seeds_ablation
    block = max(scale.seq_len // 8, 2)
    variants = {
        "softmax": {},
        "Linformer": {
            "model.attention": "linformer",
            "model.linformer_block": str(block),
            "model.linformer_k": str(max(block // 4, 1)),
        },
        "cosFormer": {"model.attention": "cosformer"},
        "Performer": {"model.attention": "performer"},
    }
    for label, variant in variants.items():
        plan.rows.append(Row("2", label, _seeds("dense", lr, seeds, scale, variant)))


def table3(scale: Scale, plan: Plan) -> None:
    """tau / K at equal width (n_embd = 128): tau = 4, 8, 10 with K = 32, 16, 12 (tau 10 hashes 120 dims,
    as the paper's d = 510 row hashes 510 of 512)."""
    lr, seeds = scale.lr_mf_protocol, scale.seeds_ablation
    width = 128  # model=nano's n_embd
    for tau in (4, 8, 10):
        k = width // tau
        variant = {} if tau == 8 else {"model.code_length": str(tau), "model.num_tables": str(k)}
        if k * tau != width:
            variant["model.hashed_width"] = str(k * tau)
        plan.rows.append(
            Row("3", f"tau={tau}, K={k}, d={k * tau}", _seeds("mf", lr, seeds, scale, variant), tau)
        )


def table4(scale: Scale, plan: Plan) -> None:
    """The MemoryFormer's lr sweep on the paper's grid."""
    for lr in scale.lrs_table4:
        plan.rows.append(Row("4", f"lr {lr:g}", _seeds("mf", lr, scale.seeds_ablation, scale), lr))


def table5(scale: Scale, plan: Plan) -> None:
    """Expanding bits of the Memory Block's second layer: 0-3 (2 is the default and the paper's choice)."""
    for bits in (0, 1, 2, 3):
        variant = {} if bits == 2 else {"model.expand_bits": str(bits)}
        plan.rows.append(
            Row(
                "5",
                f"{bits} bits (tau'={8 + bits})",
                _seeds("mf", scale.lr_mf_protocol, scale.seeds_ablation, scale, variant),
                bits,
            )
        )


def table6(scale: Scale, plan: Plan) -> None:
    """A GELU between the two Memory Block layers, or none (the paper's MemoryFormer)."""
    for label, act in (("MemoryFormer", "none"), ("MemoryFormer + GeLU", "gelu")):
        variant = {} if act == "none" else {"model.memory_block_activation": act}
        plan.rows.append(
            Row("6", label, _seeds("mf", scale.lr_mf_protocol, scale.seeds_ablation, scale, variant))
        )


BUILDERS = {"1": table1, "2": table2, "3": table3, "4": table4, "5": table5, "6": table6}


def build_plan(tables: Iterable[str], scale: Scale) -> Plan:
    """The rows of `tables` (a subset of "1".."6") at `scale`."""
    plan = Plan()
    for t in tables:
        if t not in BUILDERS:
            raise ValueError(f"unknown table {t!r}; choose among {', '.join(TABLES)} (e.g. TABLES=1,4).")
        BUILDERS[t](scale, plan)
    return plan


def parse_tables(spec: str | None) -> list[str]:
    """`"1,4"` -> ["1", "4"]; empty or None -> all six tables."""
    if not spec:
        return list(TABLES)
    tables = [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in tables if t not in TABLES]
    if bad:
        raise ValueError(
            f"TABLES={spec} names unknown table(s) {', '.join(bad)}; use numbers 1-6, e.g. TABLES=1,4."
        )
    return sorted(set(tables), key=TABLES.index)
