"""evaluate_circuit: run the orig input with every edge outside a circuit ablated, exactly.

The residual stream is a sum of the senders' outputs, so a receiver's own input (its
per-head q/k/v input hook, its MLP's `hook_mlp_in`, the final residual stream) can lose
one term without touching the stream itself: removing an edge `s -> r` subtracts, from
`r`'s input in this very pass, `s`'s live output minus its ablated output. Every removed
edge of every receiver is subtracted so, live, in one forward pass: what a receiver reads
depends on what the circuit let through upstream. Many circuits stack along the batch as
the variants of any sweep do, each with its own rows and its own kept-edge mask.
"""

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import _tl
from .._core.circuit import Circuit
from .._core.distributed import shared_by_ranks
from .._core.executor import Executor, executor_session
from .._core.graph import EdgeGraph
from .._core.measure import declared_dims
from .._core.memory import check_chunk_args, variants_per_pass
from .._core.plan import Block, PatchPlan, stacked_passes, with_uncertainty
from .._core.program import PatchProgram
from .._core.sites import Sweep
from .._core.sources import ActivationSource, SourceFactory
from .._core.tensor_types import ModelInput, OtherModelInput
from .._core.wiring import Wiring, check_head_inputs, head_writes, normed_residual
from ..errors import PatchingError
from ..results import PatchResult
from .common import check_hooks_exist, describe_metric, patched_in_source, prepare_runs
from .path_rules import check_head_outputs
from .post_norm_circuits import PostNormCircuitRows


@shared_by_ranks
def evaluate_circuit(
    model,
    circuits: Circuit | Sequence[Circuit],
    orig_input: ModelInput,
    patching_metric: Callable | str,
    new_input: OtherModelInput | None = None,
    new_cache=None,
    *,
    uncertainty: bool = False,
    batch_size: int | None = None,
    max_memory: int | None = None,
    progress: bool | str = False,
) -> "Tensor | PatchResult":
    """The metric of the orig run with every edge outside the circuit carrying its ablated value.

    Each receiver's input is its input in this pass minus, for every edge into it that the
    circuit removes, the sender's output in this pass plus the sender's ablated output:
    the new run's output (resample ablation, `new_input`), or its value in `new_cache`
    (e.g. `mean_ablation_cache(...)`, or "zero"). Everything downstream of a receiver is
    computed live. The full circuit gives the orig run's metric exactly; the empty one the
    metric of the run whose every sender is ablated (for `new_input`, the new run's);
    removing one edge `s -> r` from the full circuit is `path_patch(orig, new, s, r,
    direct_includes_mlps=False)`.

    Args:
        model: A TransformerLens model with per-head input hooks (a TransformerBridge from
            `boot_transformers`, or a HookedTransformer).
        circuits: A `Circuit` of `EdgeGraph.of(model)`, or a list of them: they run stacked,
            several per forward pass.
        orig_input: The prompts the circuit runs on (tokens or text), as in `act_patch`.
        patching_metric: A metric of the logits, as in `act_patch`.
        new_input: The run whose sender outputs removed edges carry (resample ablation).
        new_cache: Instead, the ablated sender outputs: an ActivationCache (e.g. from
            `mean_ablation_cache`), or "zero".
        uncertainty: Keep each circuit's per-prompt values: the result (a 0-d PatchResult for
            one circuit) then has `stderr` and `ci` (Concepts, "Uncertainty over prompts"), at no
            extra forward pass. Circuits run from the first layer, so no unpatched run is
            measured: to test against the model, evaluate `Circuit.full(graph)` alongside.
        batch_size: Circuits stacked per forward pass (default: as many as fit).
        max_memory: Bytes one stacked pass may use, as in `act_patch`.
        progress: Show a progress bar over the circuits (a string labels it).

    Returns:
        For one circuit, the metric's value. For a list, a `PatchResult` with dims
        `("circuit", *the metric's dims)`.

    >>> graph = EdgeGraph.of(model)
    >>> circuit = Circuit.from_scores(attr_edges(model, clean, metric, new_input=corrupted), 200)
    >>> evaluate_circuit(model, circuit, clean, metric, new_input=corrupted)  # doctest: +ELLIPSIS
    tensor(...)
    """
    plan = plan_circuit_evaluation(
        model,
        circuits,
        orig_input,
        patching_metric,
        new_input,
        new_cache,
        uncertainty=uncertainty,
        batch_size=batch_size,
        max_memory=max_memory,
    )
    return plan.compute(progress=progress)


def plan_circuit_evaluation(
    model,
    circuits: Circuit | Sequence[Circuit],
    orig_input: ModelInput,
    patching_metric: Callable | str,
    new_input: OtherModelInput | None = None,
    new_cache=None,
    *,
    uncertainty: bool = False,
    batch_size: int | None = None,
    max_memory: int | None = None,
) -> PatchPlan:
    """The plan of an `evaluate_circuit` call, every argument checked and nothing run."""
    check_chunk_args(batch_size, max_memory)
    runs = prepare_runs(model, orig_input, patching_metric, uncertainty=uncertainty)
    tokens, metric, reader = runs.tokens, runs.metric, runs.reader
    single = isinstance(circuits, Circuit)
    circuits = [circuits] if single else list(circuits) if isinstance(circuits, (list, tuple)) else []
    graph = checked_graph(model, circuits)
    shape = _tl.model_shape(model)
    wiring = Wiring.of(model, graph, "Circuit evaluation")
    check_hooks_exist(model, wiring.sender_hooks + wiring.receiver_hooks)
    source, source_text = patched_in_source(runs, new_input, new_cache, wiring.sender_hooks)
    kept_per_token = len(graph.senders) * shape.d_model + 3 * (shape.n_heads + 2 * shape.n_kv_heads) * shape.d_model
    chunk = variants_per_pass(
        len(circuits),
        tokens,
        shape,
        batch_size,
        max_memory,
        logits_per_prompt=None if reader is None else reader.floats_per_prompt,
        extra_floats_per_token=kept_per_token,
    )
    passes = stacked_passes("patch", range(len(circuits)), [0] * len(circuits), chunk, lambda _: shape.n_layers, False)
    blocks = tuple(Block(p.variants, (p,)) for p in passes)
    sizes = sorted({len(c) for c in circuits})
    size_text = f"{sizes[0]:,}" if len(sizes) == 1 else f"{sizes[0]:,} to {sizes[-1]:,}"
    description = (
        ("circuits", f"{len(circuits)}, each of {size_text} of the graph's {len(graph):,} edges"),
        ("ablated", f"every other edge, with {source_text}"),
        ("into", f"orig_input: {tokens.shape[0]} prompts x {tokens.shape[1]} tokens"),
        ("metric", describe_metric(metric, reader, False)),
    )
    layout = (
        None
        if single
        else (Sweep("circuit", ("circuit",), {"circuit": tuple(range(len(circuits)))}, [[] for _ in circuits]),)
    )
    edited = {name for circuit in circuits for name in wiring.edited_hooks(~circuit.kept_mask(tokens.shape[1]))}
    session = executor_session(
        runs,
        _tl.flags_for(edited),
        lambda bar, grad: _CircuitSession(circuits, wiring, source, runs.executor(bar, full_graph=True)),
    )
    plan = PatchPlan(
        "evaluate_circuit",
        description,
        len(circuits),
        layout,
        declared_dims(metric),
        blocks,
        session,
        inputs=(tokens, new_input),
        one_sweep=True,
    )
    return with_uncertainty(plan, runs.prompt_form, None)


def checked_graph(model, circuits: Sequence[Circuit]) -> EdgeGraph:
    """The model's edge graph, checked to be every circuit's, on a model with per-head inputs."""
    if not circuits or not all(isinstance(c, Circuit) for c in circuits):
        raise PatchingError(
            "evaluate_circuit needs a Circuit or a non-empty list of Circuits (see Circuit.from_scores)."
        )
    graph = EdgeGraph.of(model)
    for circuit in circuits:
        if circuit.graph != graph:
            raise PatchingError(f"A circuit is of {circuit.graph!r}, but this model's edge graph is {graph!r}.")
    check_head_inputs(model, "Circuit evaluation edits every head's q/k/v input, which needs")
    check_head_outputs(model, "circuit evaluation")
    return graph


class _CircuitSession:
    """Runs the blocks of an evaluate_circuit plan; the ablated outputs are made when first needed."""

    def __init__(self, circuits: list[Circuit], wiring: Wiring, source: SourceFactory, executor: Executor):
        self._circuits, self._wiring, self._source, self._executor = circuits, wiring, source, executor

    @property
    def metric_dims(self) -> tuple[str, ...] | None:
        return self._executor.calls.dims

    @functools.cached_property
    def _ablated(self) -> ActivationSource:
        return self._source()

    @functools.cached_property
    def _w_o(self) -> Tensor:
        return _tl.w_o(self._executor.model)

    @functools.cached_property
    def _b_o(self) -> Tensor:
        return _tl.b_o(self._executor.model)

    @functools.cached_property
    def _attention_normalised(self) -> bool:
        return "ln1_post" in _tl.post_norms(self._executor.model)

    def run_block(self, block: Block) -> dict[int, object]:
        (pass_,) = block.passes
        seq_len = self._executor.tokens.shape[1]

        def add_steps(program: PatchProgram, index: int, row_start: int) -> None:
            removed = ~self._circuits[index].kept_mask(seq_len)
            if not removed.any():
                return
            model = self._executor.model
            rows_class = PostNormCircuitRows if self._attention_normalised else _CircuitRows
            rows_class(model, self._wiring, removed, self._ablated, self._w_o, self._b_o).add_to(program, row_start)

        return dict(zip(pass_.variants, self._executor.run(pass_, add_steps)))


class _CircuitRows:
    """One circuit's steps in one pass. Each sender's hook keeps its output in this pass minus
    its ablated output (its change) where a receiver needs it, and adds its ablated output's
    write to the running sum of every ablated write so far; each receiver hook then rebuilds
    its input from whichever is shorter: its input minus the removed edges' changes, or its
    fully ablated input plus the kept edges' changes. The fully ablated input is built from
    the ablated side directly (the attention biases upstream plus every ablated write, summed
    in float32 or wider), never by subtracting every change from the live stream: a receiver
    whose edges are all removed reads exactly its ablated input, with no residue for a
    normalisation after it to amplify. Where no sender's output changed at all (an ablation
    from an identical run), the receiver keeps its live input, bit for bit."""

    def __init__(self, model, wiring: Wiring, removed: Tensor, ablated: ActivationSource, w_o: Tensor, b_o: Tensor):
        self.model, self.wiring, self.ablated, self.w_o, self.b_o = model, wiring, ablated, w_o, b_o
        plans = {}
        for name, columns in wiring.columns.items():
            gone = removed[:, : wiring.upstream[name], columns]
            if not gone.any():
                continue
            removed_senders = gone.any(dim=(0, 2)).nonzero().flatten()
            kept_senders = (~gone).any(dim=(0, 2)).nonzero().flatten()
            from_ablated = len(kept_senders) < len(removed_senders)
            senders = kept_senders if from_ablated else removed_senders
            weights = (~gone if from_ablated else gone)[:, senders].float()
            plans[name] = (from_ablated, senders, weights)
        self.needed = torch.zeros(len(wiring.graph.senders), dtype=torch.bool)
        for _, senders, _ in plans.values():
            self.needed[senders] = True
        self.needs_ablated = any(from_ablated for from_ablated, _, _ in plans.values())
        self.plans = {
            name: (from_ablated, _tl.moved(senders, w_o.device), _tl.moved(weights, w_o.device, w_o.dtype))
            for name, (from_ablated, senders, weights) in plans.items()
        }
        """Each edited receiver hook's senders and weights, on the device of the changes (W_O's)."""
        self.changes: Tensor | None = None
        """(senders, batch, pos, d_model): the kept senders' changes, one contiguous row each, on
        W_O's device (the input device, where layers are spread over several)."""
        self.ablated_writes: Tensor | None = None
        """(batch, pos, d_model): the sum of every sender's ablated write so far, in float32 or wider."""
        self.unchanged: Tensor | None = None
        """(batch, pos, d_model): True where no sender's output has changed so far."""
        self.residuals: dict[str, Tensor] = {}
        """Each edited `normed_inputs` hook's residual stream in this pass (its layer's input)."""
        self.before_heads: tuple[Tensor, Tensor] | None = None
        """In a parallel block, `ablated_writes` and `unchanged` as they were before the layer's
        heads wrote: what its MLP, which reads the layer's input, is built from."""

    def add_to(self, program: PatchProgram, row_start: int) -> None:
        for name, slots in self.wiring.sender_slots.items():
            if self.needs_ablated or self.needed[slots].any():
                program.visit(name, row_start, functools.partial(self._keep_change, name, slots))
        for name in self.plans:
            if name in self.wiring.normed_inputs:
                program.visit(self.wiring.residual_of(name), row_start, functools.partial(self._keep_residual, name))
            program.visit(name, row_start, functools.partial(self._rebuild, name))

    def _keep_residual(self, name: str, residual: Tensor) -> None:
        self.residuals[name] = residual.clone()

    def _keep_change(self, name: str, slots: slice, live: Tensor) -> None:
        ablated = self.ablated.tensor_like(name, live).to(live)
        change = live - ablated
        if self.changes is None:
            shape, device = (*live.shape[:2], self.w_o.shape[-1]), self.w_o.device
            self.changes = torch.zeros(len(self.wiring.graph.senders), *shape, dtype=live.dtype, device=device)
            if self.needs_ablated:
                self.ablated_writes = torch.zeros(shape, dtype=_tl.summing_dtype(live.dtype), device=device)
                self.unchanged = torch.ones(shape, dtype=torch.bool, device=device)
        if change.ndim == 4:
            w_o = self.w_o[self.wiring.head_layers[name]].to(change)
            per_head = head_writes(change, w_o).permute(2, 0, 1, 3).to(self.changes.device)
            self.changes[slots] = per_head
            if self.ablated_writes is not None and self.wiring.graph.parallel_attn_mlp:
                self.before_heads = (self.ablated_writes.clone(), self.unchanged.clone())
            if self.ablated_writes is not None:
                wide = self.ablated_writes.dtype
                write = head_writes(ablated.to(wide), w_o, summed=True)
                self.ablated_writes += write.to(self.ablated_writes.device)
                self.unchanged &= (per_head == 0).all(0)
        else:
            change = change.to(self.changes.device)
            self.changes[slots.start] = change
            if self.ablated_writes is not None:
                self.ablated_writes += ablated.to(self.ablated_writes)
                self.unchanged &= change == 0

    def _ablated_input(self, name: str) -> tuple[Tensor, Tensor]:
        """(batch, pos, d_model) twice: what the receiver hook `name` reads when every edge into
        it is removed (the attention output biases of the layers before it plus every ablated
        write before it), and where no sender before it changed."""
        layers = self.wiring.attention_layers_before(name)
        mlp_beside_heads = self.wiring.graph.parallel_attn_mlp and name in self.wiring.mlp_inputs
        writes, unchanged = self.before_heads if mlp_beside_heads else (self.ablated_writes, self.unchanged)
        biases = self.b_o[layers].to(writes).sum(0) if layers else 0.0
        return writes + biases, unchanged

    def _rebuild(self, name: str, receiver_input: Tensor) -> None:
        from_ablated, senders, weights = self.plans[name]
        changes = self.changes[senders]
        if weights.shape[0] == 1:
            terms = (weights[0].T @ changes.flatten(1)).view(weights.shape[-1], *changes.shape[1:])
        else:
            terms = torch.einsum("psr,sbpd->rbpd", weights, changes)
        terms = terms.permute(1, 2, 0, 3).to(receiver_input.device)
        if receiver_input.ndim == 3:
            terms = terms.squeeze(2)
        normed = name in self.wiring.normed_inputs
        own_input = self.residuals[name].clone() if normed else receiver_input
        if from_ablated:
            base, unchanged = self._ablated_input(name)
            if own_input.ndim == 4:
                base, unchanged = base.unsqueeze(2), unchanged.unsqueeze(2)
            rebuilt = base.to(own_input.device) + terms
            own_input.copy_(torch.where(unchanged.to(own_input.device), own_input, rebuilt))
        else:
            own_input -= terms
        if normed:  # the MLP reads its own input through the norm its layer's attention shares
            normed_input = normed_residual(self.model, self.wiring, name, own_input)
            changed = (own_input != self.residuals[name]).any(-1, keepdim=True)
            receiver_input.copy_(torch.where(changed, normed_input.to(receiver_input), receiver_input))
