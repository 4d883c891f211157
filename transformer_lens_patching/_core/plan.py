"""PatchPlan: what a patching call will run, decided before any forward pass.

A plan lists the stacked forward passes a call needs, grouped into blocks: passes that
depend only on each other (path patching's recording pass and the passes that use its
recordings). Blocks are the unit of sharding: `plan.shard(i, n)` takes some of them, and
since every pass runs exactly as in the whole plan, the shards' outputs assemble into
exactly the unsharded result.

    plan -> run (each block's passes) -> PlanOutputs -> assemble -> result
"""

import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import torch

from .. import _tl
from .._stats import PromptForm
from ..errors import PatchingError
from ..results import PatchResult
from . import distributed
from .measure import BATCH, as_tensor
from .sites import Sweep

Stage = Literal["patch", "record", "unpatched"]
"""What a pass does: `patch` runs patched variants and measures the metric; `record` runs
path patching's first pass and keeps the receivers' values; `unpatched` measures the orig
run once, for every cell whose patch cannot change what the metric reads."""


@dataclass(frozen=True)
class Pass:
    """One forward pass over several patched variants stacked along the batch."""

    stage: Stage
    variants: tuple[int, ...]
    """The variants stacked, in order: cells for `patch`, the block's groups for `record`."""
    start_layer: int
    """The first layer run; the residual stream entering it comes from the orig run."""
    stop_layer: int
    """Layers `start_layer .. stop_layer - 1` run (then the unembedding, unless recording)."""

    @property
    def layers_run(self) -> int:
        """How many layers the pass computes."""
        return self.stop_layer - self.start_layer


@dataclass(frozen=True)
class Block:
    """Passes that depend only on each other: the unit a shard takes whole."""

    cells: tuple[int, ...]
    """The result cells the block measures."""
    passes: tuple[Pass, ...]
    groups: tuple[tuple[int, ...], ...] = ()
    """For path patching's two passes: the cells each recording variant serves (they share senders)."""

    @property
    def cost(self) -> int:
        """Stacked variants times layers run, summed over the passes (an unembedding-only pass counts 1)."""
        return sum(len(p.variants) * max(1, p.layers_run) for p in self.passes)


@dataclass(frozen=True)
class PlanOutputs:
    """What running a plan (or a shard of it) measured: the metric's value for each of its cells."""

    plan_id: str
    values: dict[int, object]
    """Metric value by cell index (tensors keep their autograd graph when run with `grad=True`)."""
    metric_dims: tuple[str, ...] | None
    """The dims of each metric value (None when the shard measured nothing)."""


class Session(Protocol):
    """What runs a plan's blocks: made by its method, with the caches and flags they need."""

    metric_dims: tuple[str, ...] | None

    def run_block(self, block: Block) -> dict[int, object]:
        """The metric's value for each cell of `block`."""


SessionFactory = Callable[[bool, int, str], AbstractContextManager[Session]]
"""`start(grad, progress, label)`: a context in which the method's blocks can run, with a
progress bar over `progress` cells labelled `label` (none for 0)."""


@dataclass(frozen=True)
class PatchPlan:
    """A patching call resolved into stacked forward passes, before any of them runs.

    Build one with `plan_act_patch` or `plan_path_patch` (or `model.plan_act_patch`), which
    check every argument and run nothing. Print it to see what will be patched, how many
    variants and passes that takes and which layers each pass runs; `run()` it for the
    metric values and `assemble` them into what `act_patch` / `path_patch` would return.

    >>> plan = plan_act_patch(model, corrupted, IterNode("z"), metric, new_input=clean)
    >>> print(plan)  # doctest: +ELLIPSIS
    act_patch plan
    ...
    >>> result = plan.assemble(plan.run())  # the same as act_patch(...)
    >>> parts = [plan.shard(i, 4).run() for i in range(4)]  # e.g. one per process
    >>> torch.equal(plan.assemble(parts)["z"], result["z"])  # exactly the same result
    True
    >>> result = plan.compute()  # the same, sharded over the ranks under torchrun
    """

    method: str
    """`act_patch`, `path_patch` or `evaluate_circuit`."""
    description: tuple[tuple[str, str], ...]
    """(label, text) lines saying what is patched, from where, into what, and how it is measured."""
    n_cells: int
    """Results the call computes: one per cell of a sweep, or one for a Node or list of Nodes."""
    layout: tuple[Sweep, ...] | None
    """For an IterNode: each component's dims and coordinates; None for a single result."""
    metric_dims: tuple[str, ...] | None
    """The dims the metric declares its values have (None: known once it has run)."""
    blocks: tuple[Block, ...]
    _start: SessionFactory = field(repr=False, compare=False)
    inputs: tuple = field(default=(), repr=False, compare=False)
    """The inputs every rank must share under torch.distributed (orig and new), checked by digest."""
    one_sweep: bool = False
    """Assemble to the one sweep's PatchResult itself rather than a dict of one (a list of circuits)."""
    shard_of: tuple[int, int] | None = None
    """(index, count) for a shard made by `shard`; None for a whole plan."""
    prompt_form: PromptForm | None = None
    """With `uncertainty=True`: the metric's values are per prompt, and this combines them into
    results that keep them (`PatchResult.samples`)."""
    baseline_cell: int | None = None
    """With `uncertainty=True`: the cell (after the result's) measuring the unpatched run once,
    per prompt, from the orig run's final residual stream: what `significant` tests against."""
    plan_id: str = field(default_factory=lambda: uuid.uuid4().hex, compare=False)

    @property
    def passes(self) -> tuple[Pass, ...]:
        """Every forward pass, in the order they run."""
        return tuple(p for block in self.blocks for p in block.passes)

    @property
    def variants_per_pass(self) -> int:
        """The most variants any one pass stacks."""
        return max((len(p.variants) for p in self.passes), default=0)

    @property
    def layer_evaluations(self) -> int:
        """Layers computed for one copy of the batch, summed over the stacked variants of every
        pass: the work the plan does, in units of one layer's forward on the orig input."""
        return sum(len(p.variants) * p.layers_run for p in self.passes)

    @property
    def cells(self) -> tuple[int, ...]:
        """The cells this plan (or shard) measures."""
        return tuple(cell for block in self.blocks for cell in block.cells)

    @property
    def unpatched_cells(self) -> tuple[int, ...]:
        """Cells whose patch cannot change what the metric reads: they score the unpatched run."""
        return tuple(
            c
            for block in self.blocks
            if block.passes[0].stage == "unpatched"
            for c in block.cells
            if c != self.baseline_cell
        )

    def shard(self, index: int, count: int) -> "PatchPlan":
        """The part of this plan that shard `index` of `count` runs.

        Blocks are dealt out by cost (largest first, each to the least loaded shard), so
        shards do about the same work; a shard may get none. Every pass runs exactly as
        in the whole plan, so `assemble` of all shards' outputs equals the whole plan's
        result, bit for bit.

        >>> parts = [plan.shard(i, 2).run() for i in range(2)]
        """
        for value, what in ((count, "count"), (index, "index")):
            if isinstance(value, bool) or not isinstance(value, int):
                raise PatchingError(f"shard {what} must be an int, got {value!r}.")
        if count < 1 or not 0 <= index < count:
            raise PatchingError(f"shard(index, count) needs count >= 1 and 0 <= index < count; got ({index}, {count}).")
        if self.shard_of is not None:
            index, count = self.shard_of
            raise PatchingError(f"This plan is already shard {index} of {count}; shard the whole plan.")
        loads, owner = [0] * count, {}
        for position in sorted(range(len(self.blocks)), key=lambda b: (-self.blocks[b].cost, b)):
            chosen = min(range(count), key=lambda s: (loads[s], s))
            loads[chosen] += self.blocks[position].cost
            owner[position] = chosen
        blocks = tuple(block for position, block in enumerate(self.blocks) if owner[position] == index)
        return replace(self, blocks=blocks, shard_of=(index, count), plan_id=self.plan_id)

    def run(self, *, grad: bool = False, progress: bool | str = False) -> PlanOutputs:
        """Run every pass of this plan (or shard) and return the metric's value for each cell.

        Args:
            grad: Keep the autograd graph: the values are then differentiable with respect
                to the model's parameters and to any patched-in tensor that requires grad.
                Every pass then runs from the first layer (a pass starting late would begin
                from the orig run's cached, detached residual stream); values taken from
                cached runs (the new run's activations, path patching's frozen orig
                activations) are constants. Without it, nothing records gradients.
            progress: Show a progress bar over the cells: True labels it with the method
                ("act_patch"), a string labels it with that string (e.g. "step 2/6").
        """
        label = progress if isinstance(progress, str) else self.method
        with torch.set_grad_enabled(grad), self._start(grad, len(self.cells) if progress else 0, label) as session:
            values: dict[int, object] = {}
            for block in self.blocks:
                distributed.stop_if_another_failed()
                values.update(session.run_block(block))
            return PlanOutputs(self.plan_id, values, session.metric_dims)

    def compute(self, *, progress: bool | str = False):
        """Run the plan and assemble its result: what `act_patch`, `path_patch` and
        `evaluate_circuit` return.

        Under `torch.distributed` (a default process group of several processes, e.g. started
        by `torchrun --nproc-per-node N`), every rank runs `shard(rank, world_size)`, the
        shards' outputs are gathered with the group's backend, and every rank returns the
        whole result, equal bit for bit to the single-process one. Every rank must make the
        same call (the same plan and inputs: checked first). Only rank 0 shows the progress bar.
        If any rank's share raises, every rank raises: the others a PatchingError naming the
        failing ranks and their errors, each failing rank its own error with that note; a rank
        that never arrives makes the others fail within the rank timeout (`set_rank_timeout`).

        >>> plan = plan_act_patch(model, corrupted, IterNode("z"), metric, new_input=clean)
        >>> result = plan.compute()
        """
        ranks = distributed.current_ranks()
        if ranks is None or self.shard_of is not None:
            return self.assemble(self.run(progress=progress))
        fingerprint = (self.method, self.n_cells, self.description, self.blocks, distributed.digest(*self.inputs))
        distributed.check_same("plan", fingerprint, ranks)
        with distributed.agreed(ranks, self.method):
            part = self.shard(ranks.rank, ranks.world_size).run(progress=progress if ranks.rank == 0 else False)
        parts = distributed.gather(part, ranks)
        return self.assemble([replace(output, plan_id=self.plan_id) for output in parts])

    def assemble(self, outputs: "PlanOutputs | Sequence[PlanOutputs]"):
        """What `act_patch` / `path_patch` / `evaluate_circuit` return, from the outputs of `run()`
        on this plan or on all of its shards: the metric's value for a Node, a list of Nodes or
        one circuit; a PatchResult with a "circuit" dim for a list of circuits; else a dict from
        component name to a PatchResult with the sweep's dims plus the metric's own."""
        parts = [outputs] if isinstance(outputs, PlanOutputs) else list(outputs)
        values: dict[int, object] = {}
        dims = None
        for part in parts:
            if not isinstance(part, PlanOutputs) or part.plan_id != self.plan_id:
                raise PatchingError(
                    "assemble() takes the outputs of run() on this plan or on its shards, and nothing else."
                )
            repeated = sorted(set(values) & set(part.values))
            if repeated:
                raise PatchingError(f"Cells {repeated[:5]} were measured by more than one of the outputs given.")
            values.update(part.values)
            dims = dims if part.metric_dims is None else part.metric_dims
        expected = set(range(self.n_cells)) | ({self.baseline_cell} if self.baseline_cell is not None else set())
        missing = sorted(expected - set(values))
        if missing:
            raise PatchingError(
                f"{len(missing)} of {self.n_cells} cells are missing (e.g. {missing[:5]}): "
                "pass the outputs of every shard."
            )
        if self.prompt_form is not None:
            return self._with_uncertainty(values, dims)
        if self.layout is None:
            return _tl.moved_all(values[0], torch.device("cpu"))
        results = assembled_sweeps(self.layout, [values[cell] for cell in range(self.n_cells)], dims or ())
        return next(iter(results.values())) if self.one_sweep else results

    def _with_uncertainty(self, values: dict[int, object], dims: tuple[str, ...] | None):
        """The results of per-prompt values, each cell their combination, keeping them."""
        if dims != (BATCH,):
            raise PatchingError(
                f"uncertainty=True needs one metric value per prompt, but the metric's have dims {dims}."
            )
        baseline = None if self.baseline_cell is None else as_tensor(values[self.baseline_cell]).detach().cpu()
        if self.layout is None:
            per_prompt = {"": PatchResult(as_tensor(values[0]).detach().cpu(), (BATCH,))}
        else:
            per_prompt = assembled_sweeps(self.layout, [values[cell] for cell in range(self.n_cells)], (BATCH,))
        form = self.prompt_form
        results = {
            name: PatchResult.from_per_prompt(result, offset=form.offset, scale=form.scale, baseline=baseline)
            for name, result in per_prompt.items()
        }
        return next(iter(results.values())) if self.one_sweep or self.layout is None else results

    def __str__(self) -> str:
        lines = [f"{self.method} plan" + (f", shard {self.shard_of[0]} of {self.shard_of[1]}" if self.shard_of else "")]
        lines += [f"  {label:<10}{text}" for label, text in self.description]
        if self.layout is not None:
            own = (
                ""
                if self.metric_dims == () or self.prompt_form is not None
                else (
                    ", plus the metric's own dims" if self.metric_dims is None else ", ".join(("", *self.metric_dims))
                )
            )
            sizes = [(s.name, ", ".join(f"{d}={len(s.coords[d])}" for d in s.dims)) for s in self.layout]
            shapes = "; ".join(f"{name}: ({dims}{own})" for name, dims in sizes)
            lines.append(f"  {'result':<10}{shapes}")
        unpatched = len(self.unpatched_cells)
        measured = len(self.cells) - (self.baseline_cell in self.cells)
        lines.append(
            f"  {'variants':<10}{measured - unpatched} patched"
            + (
                f", {unpatched} scoring the unpatched run (nothing they patch can change what the metric reads)"
                if unpatched
                else ""
            )
        )
        passes = self.passes
        lines.append(
            f"  {'passes':<10}{len(passes)} forward passes in {len(self.blocks)} blocks, "
            f"at most {self.variants_per_pass} variants stacked per pass, "
            f"{self.layer_evaluations} layer evaluations in all"
        )
        lines += [f"  {'':<10}{line}" for line in _pass_table(passes)]
        return "\n".join(lines)

    def __repr__(self) -> str:
        shard = f", shard {self.shard_of[0]}/{self.shard_of[1]}" if self.shard_of else ""
        return f"<PatchPlan {self.method}: {len(self.cells)} cells in {len(self.passes)} passes{shard}>"


def with_uncertainty(
    plan: PatchPlan, prompt_form: PromptForm | None, n_layers: int | None, from_final: bool = True
) -> PatchPlan:
    """`plan` made to keep per-prompt values (`prompt_form`; unchanged for None), and given the
    model's `n_layers`, one more block measuring the unpatched run: it runs only the unembedding,
    from the orig run's final residual stream that the passes starting late cache; in a plan
    whose every pass starts at the first layer, or on a model whose final residual stream has no
    hook (not `from_final`), a whole pass of the orig run."""
    if prompt_form is None:
        return plan
    baseline = n_layers is not None
    blocks = plan.blocks
    if baseline:
        start = n_layers if from_final and any(p.start_layer > 0 for p in plan.passes) else 0
        blocks = (*blocks, Block((plan.n_cells,), (Pass("unpatched", (0,), start, n_layers),)))
    line = (
        "prompts",
        "per-prompt values kept for uncertainty" + ("; the unpatched run measured once" if baseline else ""),
    )
    return replace(
        plan,
        blocks=blocks,
        description=(*plan.description, line),
        prompt_form=prompt_form,
        baseline_cell=plan.n_cells if baseline else None,
    )


def unpatched_block(cells: Sequence[int], n_layers: int, from_final: bool = True) -> Block:
    """The block measuring the orig run once, for `cells` whose patch cannot change what the
    metric reads: one pass that runs only the unembedding (a whole pass of the orig run on a
    model whose final residual stream has no hook: not `from_final`)."""
    return Block(tuple(cells), (Pass("unpatched", (0,), n_layers if from_final else 0, n_layers),))


def stacked_passes(
    stage: Stage,
    variants: Sequence[int],
    start_layers: Sequence[int],
    chunk: int,
    stop_layer: Callable[[int], int],
    start_late: bool,
) -> list[Pass]:
    """Passes over `variants`, whose first layers are `start_layers`: variants that start at the
    same layer (all at layer 0 unless passes can `start_late`), at most `chunk` per pass, in
    order of their start layer. `stop_layer(start)` is where a pass that starts there stops."""
    by_layer: dict[int, list[int]] = {}
    for variant, layer in zip(variants, start_layers):
        by_layer.setdefault(layer if start_late else 0, []).append(variant)
    passes = []
    for layer in sorted(by_layer):
        variants = by_layer[layer]
        for start in range(0, len(variants), chunk):
            passes.append(Pass(stage, tuple(variants[start : start + chunk]), layer, stop_layer(layer)))
    return passes


def _pass_table(passes: Sequence[Pass]) -> Iterator[str]:
    """One line per stage and last layer: how many passes, how many variants each stacks,
    and the layers they run."""
    kinds: dict[tuple, list[Pass]] = {}
    order = {"record": 0, "patch": 1, "unpatched": 2}
    for p in sorted(passes, key=lambda p: (order[p.stage], p.stop_layer, p.start_layer)):
        kinds.setdefault((p.stage, p.stop_layer), []).append(p)
    for (stage, stop), group in kinds.items():
        sizes = sorted(len(p.variants) for p in group)
        starts = sorted({p.start_layer for p in group})
        size_text = str(sizes[0]) if sizes[0] == sizes[-1] else f"{sizes[0]}-{sizes[-1]}"
        count = f"{len(group)} pass" + ("es" if len(group) > 1 else "")
        if stop <= starts[0]:
            layers = "only the unembedding"
        else:
            if starts == [stop - 1]:
                layers = f"layer {stop - 1}"
            else:
                first = f"layer {starts[0]}" if len(starts) == 1 else f"layers {starts[0]}-{starts[-1]}"
                layers = f"from {first} through layer {stop - 1}"
            layers += "" if stage == "record" else ", then the unembedding"
        yield f"{stage:<10}{count:>11} x {size_text:>5} variants: {layers}"


def assembled_sweeps(
    layout: Sequence[Sweep], outputs: list | torch.Tensor, metric_dims: tuple[str, ...]
) -> dict[str, PatchResult]:
    """One PatchResult per sweep from the cells' metric values (in cell order; or stacked along
    the first axis of one tensor), moved to the CPU in one transfer per sweep."""
    if isinstance(outputs, torch.Tensor):
        return _assembled_stacked(layout, outputs.detach(), metric_dims)
    values = [as_tensor(output).detach() for output in outputs]
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) > 1:
        raise PatchingError(f"The metric returned values of different shapes across the sweep: {sorted(shapes)}.")
    if len(metric_dims) != values[0].ndim:
        metric_dims = tuple(f"metric_{axis}" for axis in range(values[0].ndim))
    results, start = {}, 0
    for sweep in layout:
        count = len(sweep.sites)
        cells = values[start : start + count]
        stacked = torch.stack([v.to(cells[0].device) for v in cells]).cpu()
        start += count
        shaped = stacked.reshape((*sweep.shape, *stacked.shape[1:]))
        results[sweep.name] = PatchResult(shaped, sweep.dims + metric_dims, sweep.coords)
    return results


def _assembled_stacked(
    layout: Sequence[Sweep], stacked: torch.Tensor, metric_dims: tuple[str, ...]
) -> dict[str, PatchResult]:
    """`assembled_sweeps` of values already stacked: (cells, *metric dims)."""
    results, start = {}, 0
    for sweep in layout:
        count = len(sweep.sites)
        cells = stacked[start : start + count].cpu()
        start += count
        results[sweep.name] = PatchResult(
            cells.reshape((*sweep.shape, *cells.shape[1:])), sweep.dims + metric_dims, sweep.coords
        )
    return results
