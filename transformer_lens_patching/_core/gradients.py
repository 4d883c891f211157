"""GradientPass: forward and backward passes of the orig run that give the metric's gradient at hooks.

Every attribution method (node attribution, its AtP* corrections, edge attribution) asks
this one class for gradients. A pass is a `PatchProgram` that records activations, adds
zeros requiring grad where a gradient is wanted (`differentiate`), optionally fills hooks
with given values (integrated gradients), stops the gradient at some slices (GradDrop,
receivers that block each other), and pulls gradients back through chosen MLP neurons
only; with `relevance`, every pass's backward follows RelP's propagation rules (`_core/relevance.py`).
Prompts run in chunks that fit the memory budget; under torch.distributed the ranks share
the chunks (at least one each) and gather their results.
"""

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import _tl
from ..errors import PatchingError
from . import distributed
from .components import hook_name, residual_hooks
from .executor import Runs
from .measure import MetricCalls, as_tensor
from .memory import prompts_per_gradient_pass, release_freed_memory
from .program import PatchProgram, applied, resid_mid_carries
from .relevance import RelevanceRules


@dataclass(frozen=True)
class NeuronRead:
    """The gradient with respect to layer `layer`'s MLP input through only some neurons:
    `mask` (batch, pos, d_mlp) weights the gradient at `hook_pre` before it is pulled back."""

    layer: int
    mask: Tensor


@dataclass(frozen=True)
class GradientRun:
    """What one call gives: the orig run's metric and its dims, the activations at the recorded
    and differentiated hooks (before any fill), the metric's gradient at each differentiated
    hook, and one gradient per `NeuronRead`."""

    value: Tensor
    dims: tuple[str, ...]
    activations: dict[str, Tensor]
    gradients: dict[str, Tensor]
    through_neurons: list[Tensor]
    reduced: list = field(default_factory=list)
    """With a `reduce` function: what it returned for each chunk of prompts, in order (and
    nothing in the fields above but the value and dims)."""


class GradientPass:
    """The orig run's gradient passes for one call (its `Runs`: the model, the tokens, the metric and
    the reader of the logits the metric selects, made once by the call's front half).

    With more than one chunk of prompts, the metric's gradient with respect to every
    prompt's logits is taken first, from logits computed without gradients, and each chunk
    is then run again with gradients and given its rows of it: exact for any metric, even
    one that mixes prompts, at the cost of one more forward pass per chunk (`split_inputs`:
    the passes use per-head q/k/v input hooks, which the chunks must leave room for). A metric that
    declares the logits it reads gets only those, from the final residual stream. Under
    torch.distributed the prompts are split into at least one chunk per rank, each rank runs
    its chunks, and every rank gets every chunk's result: the same, bit for bit, as one
    process running those chunks (`max_memory` small enough to make them).
    """

    def __init__(
        self,
        runs: Runs,
        max_memory: int | None = None,
        split_inputs: bool = False,
        new_input: object = None,
        progress: tqdm | None = None,
        relevance: bool = False,
    ):
        if torch.is_inference_mode_enabled():
            raise PatchingError(
                "Attribution takes gradients, but it was called under torch.inference_mode(), where no tensor "
                "records them. Call it outside the inference_mode block (the library runs its own passes without "
                "gradients where it can)."
            )
        if getattr(runs.metric, "differentiable", True) is False:
            raise PatchingError(
                f"Attribution follows the metric's gradient, and {runs.metric!r} has none (it is 0 almost everywhere): "
                "attribute with a differentiable metric (e.g. LogitDiff or AnswerLogProb) and measure with this one."
            )
        self.model, self._tokens, self._metric, self._new_input = runs.model, runs.tokens, runs.metric, new_input
        self._reader, self._progress = runs.reader, progress
        shape = _tl.model_shape(runs.model)
        self._chunk = prompts_per_gradient_pass(runs.tokens, shape, max_memory, split_inputs)
        self._final_residual = residual_hooks(shape.n_layers)[-1]
        self._rules = RelevanceRules(runs.model) if relevance else None

    def __call__(
        self,
        differentiated: Sequence[str],
        recorded: Sequence[str] = (),
        *,
        fills: dict[str, Tensor] | None = None,
        stopped: Sequence[tuple[str, Tensor | None]] = (),
        neuron_reads: Sequence[NeuronRead] = (),
        reduce: Callable[[slice, GradientRun], object] | None = None,
    ) -> GradientRun:
        """One gradient of the metric (for a per-prompt metric, each prompt's own: prompts do
        not interact) at each `differentiated` hook, with the activations of `fills` set to the
        given values (one batch each) and no gradient flowing back through the `stopped`
        (hook, mask or None for all of it) slices. With `reduce`, each chunk of prompts'
        activations and gradients go to `reduce(rows, run)` as soon as they are computed and
        only its results are kept: the peak memory is then one chunk's. Under torch.distributed
        a rank calls `reduce` for its own chunks only, so everything the caller needs must be in
        what it returns. A progress bar given to the constructor advances by one per call."""
        run = self._gradients(differentiated, recorded, fills, stopped, neuron_reads, reduce)
        if self._progress is not None:
            self._progress.update(1)
        return run

    def _gradients(
        self,
        differentiated: Sequence[str],
        recorded: Sequence[str],
        fills: dict[str, Tensor] | None,
        stopped: Sequence[tuple[str, Tensor | None]],
        neuron_reads: Sequence[NeuronRead],
        reduce: Callable[[slice, GradientRun], object] | None,
    ) -> GradientRun:
        tokens, batch = self._tokens, self._tokens.shape[0]
        calls = MetricCalls(self._metric, batch, selected=self._reader is not None, model=self.model)
        ranks = distributed.current_ranks()
        chunk = self._chunk if ranks is None else min(self._chunk, -(-batch // ranks.world_size))
        chunks = [slice(start, min(start + chunk, batch)) for start in range(0, batch, chunk)]
        if ranks is not None:
            inputs = distributed.digest(tokens, self._new_input)
            distributed.check_same("gradient pass", (tuple(tokens.shape), chunk, tuple(differentiated), inputs), ranks)
        with distributed.agreed(ranks, "a gradient pass"):
            plan = _Pass(list(differentiated), list(recorded), fills, list(stopped), list(neuron_reads))
            if len(chunks) == 1:
                with torch.enable_grad():
                    logits, live = self._run(tokens, plan, slice(0, batch))
                    value = _measured(calls, logits)
                    part = GradientRun(value.detach(), calls.dims, *live.gradients(value.sum(), None))
                if reduce is None:
                    return part
                return GradientRun(part.value, part.dims, {}, {}, [], [reduce(slice(0, batch), part)])
            mine = range(len(chunks)) if ranks is None else ranks.mine(range(len(chunks)))

            def my_logits() -> dict[int, Tensor]:
                logits = {}
                for i in mine:
                    distributed.stop_if_another_failed()
                    logits[i] = self._run(tokens[chunks[i]], plan.rows(chunks[i], recorded=False), chunks[i])[0]
                return logits

            with torch.no_grad():
                logits = torch.cat(self._everyones(ranks, my_logits))
            with torch.enable_grad():
                logits.requires_grad_(True)
                value = _measured(calls, logits)
                (logit_gradient,) = torch.autograd.grad(value.sum(), logits)

            def my_chunks() -> dict[int, object]:
                parts = {}
                for i in mine:
                    distributed.stop_if_another_failed()
                    rows = chunks[i]
                    with torch.enable_grad():
                        chunk_logits, live = self._run(tokens[rows], plan.rows(rows), rows)
                        part = live.gradients(chunk_logits, logit_gradient[rows])
                    parts[i] = part if reduce is None else reduce(rows, GradientRun(value.detach(), calls.dims, *part))
                    del part, live, chunk_logits
                    release_freed_memory(tokens.device)
                return parts

            parts = self._everyones(ranks, my_chunks)
            if reduce is not None:
                return GradientRun(value.detach(), calls.dims, {}, {}, [], parts)
            activations = {name: torch.cat([part[0][name] for part in parts]) for name in parts[0][0]}
            gradients = {name: torch.cat([part[1][name] for part in parts]) for name in differentiated}
            neurons = [torch.cat([part[2][i] for part in parts]) for i in range(len(neuron_reads))]
            return GradientRun(value.detach(), calls.dims, activations, gradients, neurons)

    def _everyones(self, ranks: distributed.Ranks | None, work: Callable[[], dict[int, object]]) -> list:
        """Every chunk's result in chunk order, from `work()` (this process's chunks, by index):
        this process's own, or under torch.distributed every rank's, once the ranks agree that
        every share succeeded."""
        with distributed.agreed(ranks, "a gradient pass"):
            mine = work()
        if ranks is not None:
            everyones = distributed.gather(mine, ranks, self._tokens.device)
            mine = {i: part for shares in everyones for i, part in shares.items()}
        return [mine[i] for i in sorted(mine)]

    def _run(self, tokens: Tensor, plan: "_Pass", rows: slice) -> tuple[Tensor, "_Live"]:
        """One pass of the prompts `rows` (`tokens`): their logits, or the selected logits."""
        program = PatchProgram(tokens.shape[0], carries=resid_mid_carries(self.model))
        live = _Live(plan)
        if self._rules is not None:
            self._rules.install(program)
        neuron_hooks = [hook_name(part, read.layer) for read in plan.neuron_reads for part in ("mlp_in", "pre")]
        for name, mask in plan.stopped:
            program.stop_gradient(name, mask)
        for name in dict.fromkeys([*plan.differentiated, *plan.recorded, *neuron_hooks, *(plan.fills or {})]):
            if name not in (plan.fills or {}) or name in plan.differentiated or name in plan.recorded:
                program.record(name, 0, live.activations, name)
            if plan.fills and name in plan.fills:
                program.fill(name, 0, plan.fills[name])
            if name in plan.differentiated or name in neuron_hooks:
                program.differentiate(name, live.leaves)
        if self._reader is not None:
            program.stop_at(self._final_residual)
        logits = None  # stays None where the pass stops at the final residual stream
        with applied(self.model, program), _tl.quiet_norm_edits():
            logits = _tl.forward_logits(self.model, tokens)
        if self._reader is not None:
            with self._rules.on_final_norm() if self._rules is not None else contextlib.nullcontext():
                logits = self._reader.rows(rows).read(program.stopped_with, logits)
        release_freed_memory(tokens.device)
        return logits, live


@dataclass(frozen=True)
class _Pass:
    """What one gradient pass does, for one chunk of prompts."""

    differentiated: list[str]
    recorded: list[str]
    fills: dict[str, Tensor] | None
    stopped: list[tuple[str, Tensor | None]]
    neuron_reads: list[NeuronRead]

    def rows(self, rows: slice, recorded: bool = True) -> "_Pass":
        """The same pass for prompts `rows` (without recordings or gradients unless `recorded`)."""
        fills = None if self.fills is None else {name: value[rows] for name, value in self.fills.items()}
        stopped = [(name, None if mask is None else mask[rows]) for name, mask in self.stopped]
        if not recorded:
            return _Pass([], [], fills, [], [])
        reads = [NeuronRead(read.layer, read.mask[rows]) for read in self.neuron_reads]
        return _Pass(self.differentiated, self.recorded, fills, stopped, reads)


class _Live:
    """One pass's recorded activations and gradient leaves, until its gradients are taken."""

    def __init__(self, plan: _Pass):
        self.plan = plan
        self.activations: dict[str, Tensor] = {}
        self.leaves: dict[str, Tensor] = {}

    def gradients(self, outputs: Tensor, grad_outputs: Tensor | None) -> tuple[dict, dict, list]:
        """Backpropagate `outputs` (with `grad_outputs`): the detached activations, the
        gradient at each differentiated hook and through each neuron read."""
        plan = self.plan
        pre_hooks = [hook_name("pre", read.layer) for read in plan.neuron_reads]
        names = list(dict.fromkeys([*plan.differentiated, *pre_hooks]))
        grads = torch.autograd.grad(
            outputs,
            [self.leaves[name] for name in names],
            grad_outputs=grad_outputs,
            allow_unused=True,
            retain_graph=bool(plan.neuron_reads),
        )
        found = {name: torch.zeros_like(self.leaves[name]) if g is None else g for name, g in zip(names, grads)}
        neurons = []
        for i, read in enumerate(plan.neuron_reads):
            pre, mlp_in = hook_name("pre", read.layer), hook_name("mlp_in", read.layer)
            masked = found[pre] * read.mask.to(found[pre])
            (through,) = torch.autograd.grad(
                self.activations[pre],
                self.leaves[mlp_in],
                grad_outputs=masked,
                retain_graph=i + 1 < len(plan.neuron_reads),
                allow_unused=True,
            )
            neurons.append(torch.zeros_like(self.leaves[mlp_in]) if through is None else through)
        kept = [*plan.differentiated, *plan.recorded]
        activations = {name: tensor.detach() for name, tensor in self.activations.items() if name in kept}
        return activations, {name: found[name] for name in plan.differentiated}, neurons


def _measured(calls: MetricCalls, logits: Tensor) -> Tensor:
    """The metric's value, checked to be one number (or one per prompt) with a gradient."""
    value = as_tensor(calls(logits))
    if calls.dims not in ((), ("batch",)):
        raise PatchingError(
            f"Attribution needs a metric that returns one number, or one number per prompt; this one returns "
            f"shape {tuple(value.shape)} (dims {calls.dims}). Reduce its output, e.g. to its mean."
        )
    if not value.requires_grad:
        raise PatchingError("The metric's value does not depend on the logits it received, so it has no gradient.")
    return value
