"""path_patch: patch only the direct paths from sender nodes to receiver nodes.

Each receiver is set to the value it would have if the direct paths from the senders
carried their new-input values while every other path carried its orig-input value; the
metric is then measured on the orig run with those receivers. Two meanings of "direct":

- `direct_includes_mlps=True` (the IOI paper's): paths through MLPs count as direct.
  Pass 1 runs orig with every head's output frozen to orig, the senders set to new and
  the MLPs recomputed, recording the receivers; pass 2 patches them in. With every head
  frozen, a layer's attention output is the orig one plus the senders' contributions, so
  pass 1 computes attention only where a receiver reads it, and stops at the receivers.
- `direct_includes_mlps=False`: only the residual stream is direct. Each receiver's input
  is set to its orig value plus the senders' `new - orig` contributions, in one pass
  through the per-head q/k/v input hooks. Where a receiver cannot be forked that way
  (`pre` neurons, or `pattern`/`z` on grouped-query models, or a model without per-head
  input hooks), the same values come from the two-pass algorithm with MLPs frozen too.

On models that normalise each attention and MLP output before adding it (post-norm blocks:
Gemma-2/3, OLMo-2) a sender's contribution is not its output times fixed weights, so both
meanings run the two-pass algorithm with every layer computed by the model: the layer's norm
sees the sender's change together with its other heads' frozen outputs.

`plan_path_patch` resolves the call into a `PatchPlan` without running anything;
`path_patch` runs that plan and assembles its result.
"""

from collections.abc import Callable, Sequence

from torch import Tensor

from .. import _tl
from .._core.components import residual_hooks
from .._core.distributed import shared_by_ranks
from .._core.executor import Runs, executor_session
from .._core.measure import declared_dims
from .._core.memory import check_chunk_args, variants_per_pass
from .._core.nodes import IterNode, Node, normalize_seq_pos
from .._core.plan import Block, PatchPlan, stacked_passes, unpatched_block, with_uncertainty
from .._core.program import entry_layer
from .._core.sites import resolve_spec
from .._core.sources import planned_source
from .._core.tensor_types import ModelInput, OtherModelInput
from ..errors import PatchingError
from ..results import PatchResult
from .common import check_hooks_exist, describe_metric, patched_in_source, prepare_runs, print_shapes
from .path_rules import (
    PassOnePlan,
    PathPlan,
    can_fork,
    check_head_outputs,
    check_parallel_receivers,
    check_specs,
    input_base_hook,
    paired_variants,
    pass_one_plan,
    patched_hooks,
    reaching_part,
    two_pass_blocks,
    writes_are_linear,
)
from .path_run import PathPatchSession


def plan_path_patch(
    model,
    orig_input: ModelInput,
    new_input: OtherModelInput | None = None,
    sender_nodes: Node | Sequence[Node] | IterNode | None = None,
    receiver_nodes: Node | Sequence[Node] | IterNode | None = None,
    patching_metric: Callable | str = "loss",
    orig_cache=None,
    new_cache=None,
    seq_pos=None,
    apply_metric_to_cache: bool = False,
    names_filter_for_cache_metric: Callable[[str], bool] | None = None,
    direct_includes_mlps: bool = True,
    *,
    uncertainty: bool = False,
    batch_size: int | None = None,
    max_memory: int | None = None,
) -> PatchPlan:
    """The plan of a `path_patch` call, with every argument checked and nothing run.

    Takes the arguments of `path_patch` (but `verbose`). Print the plan to see which
    algorithm runs and the passes it needs; `plan.assemble(plan.run())` is what
    `path_patch` returns.

    >>> last = Node("resid_post", model.cfg.n_layers - 1)
    >>> plan = plan_path_patch(model, clean, corrupted, IterNode("z"), last, metric)
    >>> print(plan)  # doctest: +ELLIPSIS
    path_patch plan
    ...
    """
    check_chunk_args(batch_size, max_memory)
    if not isinstance(direct_includes_mlps, bool):
        raise PatchingError(f"direct_includes_mlps must be True or False, got {direct_includes_mlps!r}.")
    for spec, what in ((sender_nodes, "sender_nodes"), (receiver_nodes, "receiver_nodes")):
        if spec is None:
            raise PatchingError(f"path_patch needs {what}: a Node, a list of Nodes or an IterNode.")
    runs = prepare_runs(
        model, orig_input, patching_metric, apply_metric_to_cache=apply_metric_to_cache, uncertainty=uncertainty
    )
    tokens, metric, reader = runs.tokens, runs.metric, runs.reader
    shape = _tl.model_shape(model)
    check_specs(sender_nodes, receiver_nodes, seq_pos)
    check_head_outputs(model, "path patching")
    if not direct_includes_mlps:
        check_parallel_receivers(shape, receiver_nodes, "path_patch with direct_includes_mlps=False")
    positions = normalize_seq_pos(seq_pos)
    senders = resolve_spec(sender_nodes, shape, tokens, "sender_nodes", positions)
    receivers = resolve_spec(receiver_nodes, shape, tokens, "receiver_nodes", positions)
    variants, sweeps = paired_variants(senders, receivers, sender_nodes, receiver_nodes)
    linear = writes_are_linear(model)
    fork = linear and not direct_includes_mlps and can_fork(model, shape, variants)
    freeze_mlps = not direct_includes_mlps and shape.has_mlps
    reaching = [reaching_part(v, reader) for v in variants]
    live = [cell for cell, v in enumerate(reaching) if v is not None]

    sender_hooks = {s.hook_name for cell in live for s in reaching[cell].senders}
    receiver_sites = [r for cell in live for r in reaching[cell].receivers]
    pass_one = PassOnePlan([], frozenset())
    if fork:
        orig_hooks = sender_hooks | {input_base_hook(r) for r in receiver_sites}
        forked_hooks = {name for r in receiver_sites for name in patched_hooks(r)}
    else:
        if live:
            pass_one = pass_one_plan(shape, receiver_sites, freeze_mlps, linear and _tl.can_start_late(model))
        orig_hooks = {name for _, name in pass_one.frozen} | sender_hooks
        forked_hooks = set()
    all_hooks = {s.hook_name for v in variants for s in v.senders} | orig_hooks | forked_hooks
    all_hooks |= {r.hook_name for v in variants for r in v.receivers}
    check_hooks_exist(model, all_hooks)
    new, new_text = patched_in_source(
        runs, new_input, new_cache, sender_hooks, "path_patch needs new_input or new_cache."
    )
    orig, _ = planned_source(
        model,
        orig_input,
        orig_cache,
        orig_hooks,
        tokens,
        "orig_cache",
        "path_patch needs orig_input or orig_cache.",
        zero_allowed=False,
        extra=residual_hooks(shape.n_layers),
    )
    plan = PathPlan(reaching, fork, pass_one, _tl.flags_for(all_hooks))

    blocks = _path_blocks(runs, plan, live, batch_size, max_memory)
    description = (
        ("senders", _described(sender_nodes, senders)),
        ("receivers", _described(receiver_nodes, receivers)),
        ("from", new_text),
        ("into", f"orig_input: {tokens.shape[0]} prompts x {tokens.shape[1]} tokens"),
        ("direct", "paths through MLPs count as direct" if direct_includes_mlps else "the residual stream only"),
        ("algorithm", _algorithm(fork, freeze_mlps)),
        ("metric", describe_metric(metric, reader, apply_metric_to_cache)),
    )
    session = executor_session(
        runs,
        plan.flags,
        lambda bar, grad: PathPatchSession(runs, plan, new, orig, names_filter_for_cache_metric, bar, grad),
    )
    layout = tuple(sweeps) if sweeps is not None else None
    patch_plan = PatchPlan(
        "path_patch",
        description,
        len(variants),
        layout,
        declared_dims(metric),
        tuple(blocks),
        session,
        inputs=(tokens, new_input),
    )
    return with_uncertainty(patch_plan, runs.prompt_form, shape.n_layers, _tl.enters_final_residual(model))


def _path_blocks(runs: Runs, plan: PathPlan, live: list[int], batch_size, max_memory) -> list[Block]:
    """The blocks of a path_patch plan: one stacked pass per block for the one-pass algorithm,
    recording and patching passes for the two-pass one, and the unpatched run for the cells
    whose senders cannot reach what the metric reads."""
    model, tokens, reader = runs.model, runs.tokens, runs.reader
    shape = _tl.model_shape(model)

    def chunk(n_variants: int, measured: bool) -> int:
        """Variants per pass; passes that only record compute no logits."""
        logits_per_prompt = None if reader is None else reader.floats_per_prompt
        return variants_per_pass(
            n_variants,
            tokens,
            shape,
            batch_size,
            max_memory,
            runs.apply_metric_to_cache and measured,
            logits_per_prompt if measured else 0,
        )

    def start_late(measured: bool) -> bool:
        return _tl.can_start_late(model) and not (runs.apply_metric_to_cache and measured)

    reaching = plan.variants
    if plan.fork:
        starts = [min(entry_layer(name) for r in reaching[c].receivers for name in patched_hooks(r)) for c in live]
        size = chunk(len(live), True)
        passes = stacked_passes("patch", live, starts, size, lambda start: shape.n_layers, start_late(True))
        blocks = [Block(p.variants, (p,)) for p in passes]
    else:
        blocks = two_pass_blocks(plan, live, chunk, start_late, shape.n_layers)
    unpatched = [cell for cell, v in enumerate(reaching) if v is None]
    if unpatched:
        blocks.append(unpatched_block(unpatched, shape.n_layers, _tl.enters_final_residual(model)))
    return blocks


def _algorithm(fork: bool, freeze_mlps: bool) -> str:
    """The plan's "algorithm" line."""
    if fork:
        return "one pass: each receiver's input is orig plus the senders' new - orig"
    return f"two passes (pass 1 freezes every head{' and MLP' if freeze_mlps else ''} and records the receivers)"


def _described(spec, resolved) -> str:
    """A sender or receiver spec as a plan shows it."""
    return repr(spec) if isinstance(spec, IterNode) else ", ".join(repr(site.node) for site in resolved)


@shared_by_ranks
def path_patch(
    model,
    orig_input: ModelInput,
    new_input: OtherModelInput | None = None,
    sender_nodes: Node | Sequence[Node] | IterNode | None = None,
    receiver_nodes: Node | Sequence[Node] | IterNode | None = None,
    patching_metric: Callable | str = "loss",
    orig_cache=None,
    new_cache=None,
    seq_pos=None,
    apply_metric_to_cache: bool = False,
    names_filter_for_cache_metric: Callable[[str], bool] | None = None,
    direct_includes_mlps: bool = True,
    verbose: bool = False,
    *,
    uncertainty: bool = False,
    batch_size: int | None = None,
    max_memory: int | None = None,
) -> "float | Tensor | tuple | dict[str, PatchResult]":
    """Path patching: patch the direct paths from senders to receivers, then measure.

    Args:
        model: A TransformerLens model (TransformerBridge on TransformerLens 4,
            HookedTransformer on 2).
        orig_input: The run to patch into (string, list of strings or tokens).
        new_input: The run whose sender values are patched in. May be None if `new_cache`
            is given (an ActivationCache, or "zero").
        sender_nodes: Node, list of Nodes or IterNode over `z`, `attn_out`, `post`,
            `mlp_out`, `resid_pre`, `resid_mid`, `resid_post`.
        receiver_nodes: Node, list of Nodes or IterNode over `q`, `k`, `v`, `q_input`,
            `k_input`, `v_input`, `pattern`, `z` (its q, k and v), `resid_pre`,
            `resid_mid`, `resid_post`, `pre`. At most one side may be an IterNode.
        patching_metric: A function of the final logits, or "loss" (the default) /
            "loss_per_token".
        orig_cache: A cache of the orig run, if already computed.
        new_cache: A cache of the new run, if already computed (or "zero", as above).
        seq_pos: Positions for senders and receivers alike (as for `Node`).
        apply_metric_to_cache: Give the metric the final run's ActivationCache.
        names_filter_for_cache_metric: With `apply_metric_to_cache`, cache only the hooks
            whose names this function accepts (default: every hook).
        direct_includes_mlps: Whether paths through MLPs count as direct (module docstring).
        verbose: Show progress bars, and for an IterNode print each result's dims.
        uncertainty: Keep each cell's per-prompt values and return results that carry them
            (`stderr`, `ci`, `p_values`, `significant`; Concepts, "Uncertainty over prompts");
            for a Node or list of Nodes a 0-d PatchResult instead of the metric's value. Needs
            a metric that is a mean over prompts. It runs no more layers: the unpatched run is
            measured from the orig run's final residual stream, which passes that start late
            have cached (a plan whose every pass starts at the first layer runs it once more).
        batch_size: Patched variants per forward pass (default: fit in `max_memory`).
        max_memory: Bytes of activations one forward pass may use (default 256 MiB on the
            CPU; on CUDA half of the GPU's free memory when the plan is made; 2 GiB on other
            accelerators; see Concepts, "Devices and precision").

    Returns:
        The metric's value, or for an IterNode a dict of PatchResults, as for `act_patch`.

    Raises:
        PatchingError: for any invalid node, input, cache or metric.

    >>> results = path_patch(model, clean, corrupted, IterNode("z"),
    ...                      Node("resid_post", model.cfg.n_layers - 1), metric)
    """
    plan = plan_path_patch(
        model,
        orig_input,
        new_input,
        sender_nodes,
        receiver_nodes,
        patching_metric,
        orig_cache,
        new_cache,
        seq_pos,
        apply_metric_to_cache,
        names_filter_for_cache_metric,
        direct_includes_mlps,
        uncertainty=uncertainty,
        batch_size=batch_size,
        max_memory=max_memory,
    )
    result = plan.compute(progress=verbose)
    if verbose:
        print_shapes(result)
    return result
