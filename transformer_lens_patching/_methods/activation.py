"""act_patch: run orig, overwrite some activations with values from another run, measure.

`plan_act_patch` resolves the call into a `PatchPlan` without running anything;
`act_patch` runs that plan and assembles its result.
"""

import functools
from collections.abc import Callable, Sequence

from torch import Tensor

from .. import _tl
from .._core.distributed import shared_by_ranks
from .._core.executor import Executor, Runs, executor_session
from .._core.measure import declared_dims
from .._core.memory import check_chunk_args, variants_per_pass
from .._core.nodes import IterNode, Node
from .._core.plan import Block, PatchPlan, stacked_passes, unpatched_block, with_uncertainty
from .._core.program import PatchProgram, entry_layer
from .._core.sites import PatchSite, Sweep
from .._core.sources import ActivationSource, SourceFactory
from .._core.tensor_types import ModelInput, OtherModelInput
from ..results import PatchResult
from .common import describe_metric, patch_cells, patched_in_source, prepare_runs, print_shapes


def plan_act_patch(
    model,
    orig_input: ModelInput,
    patching_nodes: Node | Sequence[Node] | IterNode,
    patching_metric: Callable | str,
    new_input: OtherModelInput | None = None,
    new_cache=None,
    apply_metric_to_cache: bool = False,
    *,
    uncertainty: bool = False,
    batch_size: int | None = None,
    max_memory: int | None = None,
) -> PatchPlan:
    """The plan of an `act_patch` call, with every argument checked and nothing run.

    Takes the arguments of `act_patch` (but `verbose`). Print the plan to see what it will
    patch and the passes it needs; `plan.assemble(plan.run())` is what `act_patch` returns.

    >>> plan = plan_act_patch(model, corrupted, IterNode("z"), metric, new_input=clean)
    >>> print(plan)  # doctest: +ELLIPSIS
    act_patch plan
    ...
    """
    check_chunk_args(batch_size, max_memory)
    runs = prepare_runs(
        model, orig_input, patching_metric, apply_metric_to_cache=apply_metric_to_cache, uncertainty=uncertainty
    )
    patched = patch_cells(model, runs.tokens, patching_nodes)
    what = f"{patching_nodes!r}" if patched.is_sweep else ", ".join(repr(site.node) for site in patched.resolved)
    layout = tuple(patched.resolved) if patched.is_sweep else None
    plan = plan_cells(
        runs, patched.cells, layout, what, new_input, new_cache, batch_size=batch_size, max_memory=max_memory
    )
    return with_uncertainty(plan, runs.prompt_form, model.cfg.n_layers, _tl.enters_final_residual(model))


def plan_cells(
    runs: Runs,
    cells: Sequence[Sequence[PatchSite]],
    layout: tuple[Sweep, ...] | None,
    what: str,
    new_input: OtherModelInput | None = None,
    new_cache=None,
    *,
    batch_size: int | None = None,
    max_memory: int | None = None,
) -> PatchPlan:
    """The act_patch plan of `cells`, each a list of sites resolved against the model and tokens
    of `runs` (patched together), stacked into passes as a sweep's are; `layout` says how their
    results assemble (None: the first cell's value) and `what` is the plan's "patch" line.

    `plan_act_patch` plans the cells of its Nodes here; `confirm` plans the cells it picks
    from a sweep (`check_chunk_args` is the caller's).
    """
    model, tokens, metric, reader = runs.model, runs.tokens, runs.metric, runs.reader
    apply_metric_to_cache = runs.apply_metric_to_cache
    shape = _tl.model_shape(model)
    cells = [list(cell) for cell in cells]
    names = {site.hook_name for cell in cells for site in cell}
    source, source_text = patched_in_source(runs, new_input, new_cache, names)

    # Cells that patch only positions after those the metric reads score the unpatched metric.
    live = [i for i, cell in enumerate(cells) if reader is None or not all(map(reader.only_after_reads, cell))]
    is_live = set(live)
    unpatched = [i for i in range(len(cells)) if i not in is_live]
    logits_per_prompt = None if reader is None else reader.floats_per_prompt
    chunk = variants_per_pass(
        len(live), tokens, shape, batch_size, max_memory, apply_metric_to_cache, logits_per_prompt
    )
    start_late = _tl.can_start_late(model) and not apply_metric_to_cache
    start_layers = [min(entry_layer(site.hook_name) for site in cells[i]) for i in live]
    passes = stacked_passes("patch", live, start_layers, chunk, lambda start: shape.n_layers, start_late)
    blocks = [Block(p.variants, (p,)) for p in passes]
    if unpatched:
        blocks.append(unpatched_block(unpatched, shape.n_layers, _tl.enters_final_residual(model)))
    description = (
        ("patch", what),
        ("from", source_text),
        ("into", f"orig_input: {tokens.shape[0]} prompts x {tokens.shape[1]} tokens"),
        ("metric", describe_metric(metric, reader, apply_metric_to_cache)),
    )
    return PatchPlan(
        "act_patch",
        description,
        len(cells),
        layout,
        declared_dims(metric),
        tuple(blocks),
        executor_session(
            runs,
            _tl.flags_for(names),
            lambda bar, grad: _ActPatchSession(cells, source, runs.executor(bar, full_graph=grad)),
        ),
        inputs=(tokens, new_input),
    )


class _ActPatchSession:
    """Runs the blocks of an act_patch plan; the new run's cache is made when first needed."""

    def __init__(self, cells: list[list[PatchSite]], source: SourceFactory, executor: Executor):
        self._cells, self._source_factory, self._executor = cells, source, executor

    @property
    def metric_dims(self) -> tuple[str, ...] | None:
        return self._executor.calls.dims

    @functools.cached_property
    def _source(self) -> ActivationSource:
        return self._source_factory()

    def run_block(self, block: Block) -> dict[int, object]:
        (pass_,) = block.passes
        if pass_.stage == "unpatched":
            return self._executor.unpatched(block)
        source, cells = self._source, self._cells

        def add_steps(program: PatchProgram, cell: int, row_start: int) -> None:
            for site in cells[cell]:
                program.edit(site, row_start, source.value(site.hook_name))

        return dict(zip(pass_.variants, self._executor.run(pass_, add_steps)))


@shared_by_ranks
def act_patch(
    model,
    orig_input: ModelInput,
    patching_nodes: Node | Sequence[Node] | IterNode,
    patching_metric: Callable | str,
    new_input: OtherModelInput | None = None,
    new_cache=None,
    apply_metric_to_cache: bool = False,
    verbose: bool = False,
    *,
    uncertainty: bool = False,
    batch_size: int | None = None,
    max_memory: int | None = None,
) -> "float | Tensor | tuple | dict[str, PatchResult]":
    """Activation patching: run `orig_input` with some activations taken from another run.

    Args:
        model: A TransformerLens model (TransformerBridge on TransformerLens 4,
            HookedTransformer on 2).
        orig_input: The run to patch into: a string, a list of strings or tokens (batch, pos).
        patching_nodes: A Node, a list of Nodes (all patched together, one result) or an
            IterNode (one result per node it sweeps over).
        patching_metric: A function of the patched logits (batch, pos, d_vocab) returning a
            float, a tensor or a tuple of them, or "loss" / "loss_per_token".
        new_input: The run whose activations are patched in (resample ablation).
        new_cache: Instead of `new_input`: an ActivationCache (e.g. from
            `mean_ablation_cache`) or "zero" for zero ablation.
        apply_metric_to_cache: Give the metric the patched run's ActivationCache instead of
            its logits.
        verbose: Show a progress bar, and for an IterNode print each result's dims.
        uncertainty: Keep each cell's per-prompt values and return results that carry them
            (`stderr`, `ci`, `p_values`, `significant`; Concepts, "Uncertainty over prompts");
            for a Node or list of Nodes a 0-d PatchResult instead of the metric's value. Needs
            a metric that is a mean over prompts. It runs no more layers: the unpatched run is
            measured from the orig run's final residual stream, which passes that start late
            have cached (a plan whose every pass starts at the first layer runs it once more).
        batch_size: Patched variants per forward pass (default: as many as fit in `max_memory`).
        max_memory: Bytes of activations one forward pass may use (default 256 MiB on the
            CPU; on CUDA half of the GPU's free memory when the plan is made; 2 GiB on other
            accelerators; see Concepts, "Devices and precision").

    Returns:
        For a Node or list of Nodes, what the metric returned. For an IterNode, a dict from
        component name to a PatchResult with dims such as `("layer", "head")` or
        `("seq_pos", "layer")`, plus `"batch"` for a per-prompt metric.

    Raises:
        PatchingError: for any invalid node, input, cache or metric.

    >>> results = act_patch(model, corrupted, IterNode("z"), metric, new_input=clean)
    >>> results["z"].dims
    ('layer', 'head')
    """
    plan = plan_act_patch(
        model,
        orig_input,
        patching_nodes,
        patching_metric,
        new_input,
        new_cache,
        apply_metric_to_cache,
        uncertainty=uncertainty,
        batch_size=batch_size,
        max_memory=max_memory,
    )
    result = plan.compute(progress=verbose)
    if verbose:
        print_shapes(result)
    return result
