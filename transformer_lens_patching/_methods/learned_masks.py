"""learn_edge_masks: circuit discovery by learning a mask over the edges on the live circuit evaluation.

`evaluate_circuit` removes an edge `s -> r` by subtracting `s`'s change (its output in the pass
minus its ablated output) from `r`'s own input. Here every edge carries a mask `m` in [0, 1]
instead, and `r`'s input loses `(1 - m)` times each change, live, in one differentiable pass:
at `m` = 0 or 1 it is `evaluate_circuit` of the kept edges. The masks are hard-concrete
variables (Louizos et al. 2018), as in Edge Pruning (Bhaskar et al. 2024), optimised for each
prompt's metric to stay at the full model's under a budget of kept edges, and started from an
estimate's ranking; the model's parameters take no part.

The budget is a target density: after each step every log-odds moves by one shared amount, the
one that makes the expected share of kept edges the target (a Lagrange multiplier of the
constraint, found by bisection), so the edges compete for the budget by their faithfulness
gradients (Adam, on the faithfulness loss alone). A penalty on the expected number of kept edges
through Adam, whose steps are one size whatever a gradient's magnitude, would instead fall
fastest on exactly the edges whose faithfulness gradient vanishes (behind a saturated softmax),
and reorder an estimate's ranking where the masks learn nothing; a shared shift keeps it.
"""

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from .. import _tl
from .._core.circuit import Circuit
from .._core.distributed import shared_by_ranks
from .._core.graph import EdgeGraph, EdgeScores, ranked_indices
from .._core.measure import MetricCalls, as_tensor
from .._core.memory import check_chunk_args, default_max_memory, prompts_per_gradient_pass
from .._core.program import PatchProgram, applied
from .._core.sources import ActivationSource
from .._core.tensor_types import ModelInput, OtherModelInput
from .._core.wiring import Wiring, head_writes
from ..errors import PatchingError
from .circuit_evaluation import checked_graph
from .common import check_hooks_exist, gradient_progress, patched_in_source, prepare_runs

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1
"""The hard-concrete distribution's temperature and stretch (Louizos et al. 2018's values)."""
WARM_START = 3.0
"""The largest initial log-odds: an estimate's strongest edge starts at +WARM_START, its weakest at -WARM_START."""


@shared_by_ranks
def learn_edge_masks(
    model,
    scores: EdgeScores,
    orig_input: ModelInput,
    patching_metric: Callable | str,
    new_input: OtherModelInput | None = None,
    new_cache=None,
    *,
    absolute: bool = True,
    steps: int = 100,
    density: float = 0.02,
    learning_rate: float = 0.01,
    seed: int = 0,
    max_memory: int | None = None,
    progress: bool | str = False,
) -> EdgeScores:
    """Learn which edges a circuit needs: a mask per edge, trained on the live circuit evaluation.

    Each edge `s -> r` has a hard-concrete mask `m` with log-odds `log_alpha`; in each training
    pass the receiver's own input loses `(1 - m)` times the sender's change (its output in the
    pass minus its ablated output: `new_input`'s, or `new_cache`'s), live, as `evaluate_circuit`
    removes edges. The faithfulness loss is the mean over prompts of `(M(circuit) - M(full))^2`
    over `(M(full) - M(empty))^2` averaged over prompts; each of the `steps` steps moves the
    log-odds by Adam on it, then shifts them all by the one amount that makes the expected share of
    kept edges `density` (see the module's docstring). The log-odds start from
    `scores`' ranking (any `EdgeScores`: EAP, EAP-IG, RelP, exact), the strongest edge at +3 and
    the weakest at -3, evenly by rank; where the masks learn nothing (an edge whose effect has no
    gradient, as behind a saturated softmax) that order is kept. No parameter of the model gains a
    gradient or changes.

    Args:
        model: A TransformerLens model with per-head input hooks, as `evaluate_circuit` needs.
        scores: The estimate the masks start from, of `EdgeGraph.of(model)`.
        orig_input: The prompts (tokens or text).
        patching_metric: A metric with a value per prompt (a metric object, or a function
            returning one number per prompt): each prompt's value is kept at the full model's.
        new_input: The run whose sender outputs removed edges carry (resample ablation).
        new_cache: Instead, an ActivationCache of ablated outputs (e.g. `mean_ablation_cache`), or "zero".
        absolute: Rank `scores` by |score| for the warm start (else by most negative score), as in
            `Circuit.from_scores`.
        steps: Optimisation steps, each a forward and backward pass of the prompts.
        density: The expected share of the graph's edges the masks keep while they learn: the
            circuit size the ranking is tuned for (its top edges at other sizes are circuits too).
        learning_rate: Adam's step size on the log-odds.
        seed: The seed of the masks' noise.
        max_memory: Bytes one pass may use: the prompts run in chunks that fit.
        progress: Show a progress bar over the steps (a string labels it).

    Returns:
        EdgeScores (method "learned masks"): each edge's learned log-odds, shifted so that the
        least kept edge scores -1 and negated as the score of an edge whose removal lowers the
        metric is (every score at most -1), so that ranking by size and by most negative score
        (`absolute=False`) agree: `Circuit.from_scores(learned, n)` is the circuit of the `n`
        edges the masks keep most surely, for any target size `n`, and `faithfulness_curve` ranks
        them so. `unpatched` is the full circuit's metric, as `attr_edges` gives it.

    Raises:
        PatchingError: For anything `evaluate_circuit` refuses, models that normalise each block's
            output or share one norm between a parallel block's attention and MLP (no live
            soft removal is written for them), a metric without a value per prompt, scores of
            another graph, and a circuit whose full and empty evaluations agree on every prompt.

    >>> eap = attr_edges(model, clean, metric, new_input=corrupted)
    >>> learned = learn_edge_masks(model, eap, clean, metric, new_input=corrupted, steps=20)
    >>> circuit = Circuit.from_scores(learned, 100)
    """
    _check_options(steps, density, learning_rate, seed)
    if not isinstance(absolute, bool):
        raise PatchingError(f"absolute must be True or False, got {absolute!r}.")
    check_chunk_args(None, max_memory)
    needs = "learn_edge_masks keeps each prompt's metric at the full model's, so it needs"
    runs = prepare_runs(model, orig_input, patching_metric, uncertainty=True, needs=needs)
    graph = checked_graph(model, [Circuit.empty(EdgeGraph.of(model))])
    if not isinstance(scores, EdgeScores) or scores.graph != graph:
        raise PatchingError(
            f"learn_edge_masks starts from EdgeScores of this model's graph ({graph!r}); got {scores!r}."
        )
    wiring = Wiring.of(model, graph, "learn_edge_masks")
    _check_live_removal(model, wiring)
    check_hooks_exist(model, wiring.sender_hooks + wiring.receiver_hooks)
    source, _ = patched_in_source(runs, new_input, new_cache, wiring.sender_hooks)
    log_alpha = at_density(warm_start(scores, absolute), density)
    generator = torch.Generator().manual_seed(seed)
    with (
        _tl.model_flags(model, _tl.flags_for(wiring.receiver_hooks)),
        gradient_progress(progress, steps, "learn_edge_masks") as bar,
    ):
        masked = MaskedCircuits(runs, wiring, source(), max_memory)
        with torch.no_grad():
            full = masked.values(torch.ones(len(graph)))
            empty = masked.values(torch.zeros(len(graph)))
        scale = float(((full - empty) ** 2).mean())
        if scale == 0:
            raise PatchingError(
                "Removing every edge leaves each prompt's metric as it is, so no circuit is more faithful than "
                "another: choose prompts and an ablation that change the metric."
            )
        log_alpha.requires_grad_(True)
        optimiser = torch.optim.Adam([log_alpha], lr=learning_rate)
        for _ in range(steps):
            optimiser.zero_grad()
            noise = torch.rand(len(graph), generator=generator).clamp(1e-6, 1 - 1e-6)
            masked.backward(functools.partial(sampled_mask, log_alpha, noise), full, scale, [log_alpha])
            optimiser.step()
            with torch.no_grad():
                log_alpha.copy_(at_density(log_alpha, density))
            if bar is not None:
                bar.update(1)
    learned = log_alpha.detach()
    unpatched = float(runs.prompt_form.samples(full.detach().cpu().unsqueeze(0)).estimate()[0])
    return EdgeScores(graph, -(learned - learned.min() + 1), "learned masks", unpatched)


def warm_start(scores: EdgeScores, absolute: bool = True) -> Tensor:
    """The initial log-odds: +WARM_START for the strongest edge of `scores` (by |score|, or with
    `absolute=False` the most negative), -WARM_START for the weakest, evenly spaced by rank between."""
    order = ranked_indices(scores, absolute)
    n = len(order)
    log_alpha = torch.empty(n)
    log_alpha[order] = torch.linspace(WARM_START, -WARM_START, n) if n > 1 else torch.tensor([WARM_START])
    return log_alpha


def kept_probability(log_alpha: Tensor) -> Tensor:
    """The probability each hard-concrete mask is not 0 (the expected L0 norm, per edge)."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def at_density(log_alpha: Tensor, density: float) -> Tensor:
    """`log_alpha` shifted by the one amount that makes the mean `kept_probability` `density`
    (bisection: the mean grows with the shift)."""
    low, high = -60.0 - float(log_alpha.max()), 60.0 - float(log_alpha.min())
    for _ in range(60):
        middle = (low + high) / 2
        if float(kept_probability(log_alpha + middle).mean()) < density:
            low = middle
        else:
            high = middle
    return log_alpha + (low + high) / 2


def sampled_mask(log_alpha: Tensor, noise: Tensor) -> Tensor:
    """A hard-concrete sample of every mask from uniform `noise`, differentiable in `log_alpha`."""
    concrete = torch.sigmoid((noise.log() - (-noise).log1p() + log_alpha) / BETA)
    return (concrete * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


class MaskedCircuits:
    """Forward passes of the orig prompts with every edge `s -> r` scaled by a mask: `r`'s own input
    loses `(1 - mask)` times `s`'s change, live. In chunks of prompts that fit `max_memory`: a plain
    gradient pass's memory, plus every sender's change and its gradient."""

    def __init__(self, runs, wiring: Wiring, ablated: ActivationSource, max_memory: int | None):
        self.model, self.tokens, self.wiring, self.ablated = runs.model, runs.tokens, wiring, ablated
        self.calls = MetricCalls(runs.metric, runs.tokens.shape[0], model=runs.model)
        shape = _tl.model_shape(runs.model)
        budget = default_max_memory(shape.devices or (runs.tokens.device,)) if max_memory is None else max_memory
        plain = budget / prompts_per_gradient_pass(runs.tokens, shape, budget, split_inputs=True)
        changes = 2 * len(wiring.graph.senders) * runs.tokens.shape[1] * shape.d_model * shape.element_size
        size = max(1, int(budget // (plain + changes)))
        batch = runs.tokens.shape[0]
        self.chunks = [slice(start, min(start + size, batch)) for start in range(0, batch, size)]

    @functools.cached_property
    def w_o(self) -> Tensor:
        return _tl.w_o(self.model)

    def logits(self, mask: Tensor, rows: slice) -> Tensor:
        """The logits of the prompts `rows` with every edge scaled by `mask` (one value per edge)."""
        graph, removal = self.wiring.graph, (1 - mask).to(self.w_o)
        per_pair = removal.new_zeros(len(graph.senders), len(graph.receivers))
        per_pair = per_pair.index_put(
            (graph.edge_senders.to(removal.device), graph.edge_receivers.to(removal.device)), removal
        )
        tokens = self.tokens[rows]
        program = PatchProgram(tokens.shape[0])
        _SoftRemoval(self.wiring, per_pair, self.ablated.rows(rows), self.w_o).add_to(program)
        with applied(self.model, program):
            logits = _tl.forward_logits(self.model, tokens)
        return logits

    def values(self, mask: Tensor) -> Tensor:
        """Each prompt's metric with every edge scaled by `mask`: (batch,)."""
        logits = torch.cat([self.logits(mask, rows) for rows in self.chunks])
        return self._measured(logits)

    def backward(self, mask_of: Callable[[], Tensor], full: Tensor, scale: float, inputs: list[Tensor]) -> None:
        """Accumulate the gradient of the faithfulness loss, mean over prompts of (value - full)^2 /
        scale, into `inputs` (what `mask_of()`, called once per chunk of prompts, depends on) and
        nothing else: no parameter of the model gains a gradient."""
        with torch.enable_grad():
            if len(self.chunks) == 1:
                values = self._measured(self.logits(mask_of(), self.chunks[0]))
                (((values - full.to(values)) ** 2).mean() / scale).backward(inputs=inputs)
                return
            with torch.no_grad():
                logits = torch.cat([self.logits(mask_of(), rows) for rows in self.chunks])
            logits.requires_grad_(True)
            values = self._measured(logits)
            (logit_gradient,) = torch.autograd.grad(((values - full.to(values)) ** 2).mean() / scale, logits)
            for rows in self.chunks:
                self.logits(mask_of(), rows).backward(logit_gradient[rows], inputs=inputs)

    def _measured(self, logits: Tensor) -> Tensor:
        value = as_tensor(self.calls(logits))
        if self.calls.dims != ("batch",):
            raise PatchingError(
                "learn_edge_masks keeps each prompt's metric at the full model's, so the metric must give one value "
                f"per prompt; this one gives dims {self.calls.dims}."
            )
        return value.float()


class _SoftRemoval:
    """One pass's steps: each sender hook keeps its change (live minus ablated, as a write to the
    residual stream), each receiver hook subtracts the changes weighted by its edges' removal."""

    def __init__(self, wiring: Wiring, removal: Tensor, ablated: ActivationSource, w_o: Tensor):
        self.wiring, self.removal, self.ablated, self.w_o = wiring, removal, ablated, w_o
        self.changes: list[tuple[slice, Tensor]] = []
        """Each sender hook's changes, (senders, batch, pos, d_model), with its senders' rows: one
        tensor per hook, which every receiver's product reads (and keeps for backward) as it is."""

    def add_to(self, program: PatchProgram) -> None:
        for name in self.wiring.sender_slots:
            program.visit(name, 0, functools.partial(self._keep_change, name))
        for name in self.wiring.columns:
            program.visit(name, 0, functools.partial(self._remove, name))

    def _keep_change(self, name: str, live: Tensor) -> None:
        change = live - self.ablated.tensor_like(name, live).to(live)
        if change.ndim == 4:
            writes = head_writes(change, self.w_o[self.wiring.head_layers[name]].to(change))
            change = writes.permute(2, 0, 1, 3)
        else:
            change = change.unsqueeze(0)
        self.changes.append((self.wiring.sender_slots[name], change.to(self.w_o.device)))

    def _remove(self, name: str, receiver_input: Tensor) -> None:
        upstream, columns = self.wiring.upstream[name], self.wiring.columns[name]
        terms = sum(
            torch.einsum("sr,sbpd->bprd", self.removal[slots, columns].to(changes), changes)
            for slots, changes in self.changes
            if slots.stop <= upstream
        )
        if isinstance(terms, Tensor):
            terms = terms.to(receiver_input)
            receiver_input -= terms.squeeze(2) if receiver_input.ndim == 3 else terms


def _check_live_removal(model, wiring: Wiring) -> None:
    if wiring.normed_inputs:
        raise PatchingError(
            "learn_edge_masks has no soft removal for a parallel block whose attention and MLP share one norm "
            "(Phi, Falcon, Cohere): use exact_edge_scores or confirm_edges on this model."
        )
    if _tl.post_norms(model):
        raise PatchingError(
            f"learn_edge_masks has no soft removal for a model that normalises each block's output before adding it "
            f"({', '.join(_tl.post_norms(model))}): use exact_edge_scores or confirm_edges on this model."
        )


def _check_options(steps, density, learning_rate, seed) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise PatchingError(f"steps must be a whole number of at least 0, got {steps!r}.")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density < 1:
        raise PatchingError(f"density must be a share of the edges, between 0 and 1 (excluded), got {density!r}.")
    if (
        isinstance(learning_rate, bool)
        or not isinstance(learning_rate, (int, float))
        or not math.isfinite(learning_rate)
        or learning_rate <= 0
    ):
        raise PatchingError(f"learning_rate must be a finite number above 0, got {learning_rate!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PatchingError(f"seed must be a whole number, got {seed!r}.")
