"""attr_patch: attribution patching, a gradient-based estimate of what `act_patch` returns.

AtP (Nanda, 2023): when patching moves an activation from its orig value `a` to the new
value `a'`, the metric changes by about `(a' - a) . dM/da`, the gradient taken in the orig
run. One run of the new input (or the given cache), and one forward and one backward pass
of the orig input, give that estimate for every cell of a sweep at once: its cost does not
depend on the number of cells. Integrated gradients (as in EAP-IG, Hanna et al. 2024)
average the gradient over points between `a` and `a'` instead.
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import _tl
from .._core.measure import MetricCalls, as_tensor
from .._core.nodes import IterNode, Node
from .._core.plan import assembled_sweeps
from .._core.program import PatchProgram, applied, resid_mid_carries
from .._core.sites import PatchSite
from .._core.sources import planned_source
from .._core.tensor_types import ModelInput, OtherModelInput
from ..errors import PatchingError
from .activation import NOTHING_TO_PATCH_IN
from .common import patch_cells, resolve_metric

METHODS = ("atp", "ig")
"""The estimates `attr_patch` computes."""
IG_STEPS = 10
"""The points of the integrated gradients' sum when `steps` is not given."""
ESTIMATES = ("value", "delta")
"""What `attr_patch` returns: the estimated patched metric, or only its change."""


def attr_patch(
    model,
    orig_input: ModelInput,
    patching_nodes: Node | Sequence[Node] | IterNode,
    patching_metric: Callable | str,
    new_input: OtherModelInput | None = None,
    new_cache=None,
    *,
    method: str = "atp",
    steps: int | None = None,
    estimate: str = "value",
):
    """Estimate what `act_patch` returns with the same arguments, for every cell at once.

    Each cell's estimate is the orig run's metric plus `(new - orig) . gradient` summed over
    the cell's slice (its head, neuron and positions; every node of a list together), the
    gradient of the metric with respect to the activation in the orig run. It is exact where
    the metric is linear in the patched activation (e.g. the last layer's `z`, `v`,
    `attn_out` or `resid_post` of an attention-only model without LayerNorm, with a metric
    linear in the logits), and an approximation elsewhere: confirm the cells that matter
    with `act_patch`.

    Args:
        model: A TransformerLens 4 `TransformerBridge` or TransformerLens 2 `HookedTransformer`.
        orig_input: The run whose activations would be patched (text or tokens).
        patching_nodes: A `Node`, a list of Nodes (patched together) or an `IterNode` (swept).
        patching_metric: The metric of `act_patch`, returning one number or one number per
            prompt (a `(batch,)` tensor); "loss" for the LM loss.
        new_input: The run patched from (resample ablation).
        new_cache: An ActivationCache to patch from (e.g. `mean_ablation_cache(...)`), or
            "zero" (zero ablation).
        method: "atp" (attribution patching: the gradient in the orig run) or "ig"
            (integrated gradients: the mean gradient at `steps` points `a + (k / steps)(a' - a)`,
            k = 0 .. steps - 1, between each activation's orig value `a` and new value `a'`).
            The interpolated quantity is the patched activation itself: each hook the cells
            patch is interpolated on its own, as a whole (every head, neuron and position,
            the rest of the model computed from it), so that the attributions of all of one
            hook's cells sum to the change of patching that whole hook, up to the sum's
            error, which shrinks as `steps` grows. `steps=1` is AtP. It costs `steps - 1`
            more forward and backward passes per hook.
        steps: For "ig", the points of the sum (default `IG_STEPS`); not used by "atp".
        estimate: "value" for the estimated patched metric (what `act_patch` returns) or
            "delta" for its change from the orig run's metric.

    Returns:
        What `act_patch` returns: the metric's type for a Node or a list of Nodes, and for an
        IterNode a dict of `PatchResult`s with the dims and coords `act_patch` gives (plus
        `batch` for a per-prompt metric), so an estimate and an exact result subtract.

    Raises:
        PatchingError: For anything `act_patch` refuses, an unknown `method` or `estimate`,
            and a metric whose value is neither one number nor one per prompt.

    >>> estimates = attr_patch(model, corrupted, IterNode(["z", "post"]), metric, new_input=clean)  # doctest: +SKIP
    >>> estimates["post"].dims  # doctest: +SKIP
    ('layer', 'neuron')
    """
    _check_choice(method, METHODS, "method")
    _check_choice(estimate, ESTIMATES, "estimate")
    steps = _checked_steps(method, steps)
    _tl.check_model(model)
    _tl.check_deterministic(model)
    tokens = _tl.to_tokens(model, orig_input)
    patched = patch_cells(model, tokens, patching_nodes)
    names = sorted(patched.names)
    metric = resolve_metric(patching_metric, tokens)
    source, _ = planned_source(model, new_input, new_cache, names, tokens, "new_cache", NOTHING_TO_PATCH_IN)
    with _tl.model_flags(model, _tl.flags_for(names)), torch.no_grad():
        new = source()
        orig_value, dims, orig, gradients = _gradients(model, tokens, names, metric)
        differences = {name: new.tensor_like(name, orig[name]).to(orig[name]) - orig[name] for name in names}
        if steps > 1:
            gradients = _integrated(model, tokens, metric, orig, differences, gradients, steps)
        weighted = {name: differences[name] * gradients[name] for name in names}
        batch = tokens.shape[0]
        changes = [_cell_change(cell, weighted, batch, per_prompt=dims == ("batch",)) for cell in patched.cells]
    values = changes if estimate == "delta" else [orig_value + change for change in changes]
    if not patched.is_sweep:
        return values[0]
    return assembled_sweeps(patched.resolved, values, dims)


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise PatchingError(f"{what} must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def _checked_steps(method: str, steps: int | None) -> int:
    """The points of the integrated gradients' sum: 1 for "atp"."""
    if method == "atp":
        if steps is not None:
            raise PatchingError(f"steps is for method='ig' (integrated gradients); method='atp' takes none, got {steps!r}.")
        return 1
    steps = IG_STEPS if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PatchingError(f"steps must be a whole number of at least 1, got {steps!r}.")
    return steps


def _integrated(model, tokens: Tensor, metric, orig: dict, differences: dict, first: dict, steps: int) -> dict:
    """The mean gradient at each hook over the points orig + (k / steps) * difference, k = 0 ..
    steps - 1, each hook interpolated on its own; `first` holds the gradients at k = 0."""
    totals = {name: gradient.clone() for name, gradient in first.items()}
    for k in range(1, steps):
        for name in totals:
            point = {name: orig[name] + (k / steps) * differences[name]}
            totals[name] += _gradients(model, tokens, [name], metric, point)[3][name]
    return {name: total / steps for name, total in totals.items()}


def _gradients(model, tokens: Tensor, names: list[str], metric, fills: dict[str, Tensor] | None = None,
               ) -> tuple[Tensor, tuple, dict, dict]:  # fmt: skip
    """One forward and one backward pass of the orig run, with the activations of `fills` set
    to the given values: the metric's value and dims, and at each hook of `names` the
    activation (before any fill) and the metric's gradient with respect to it (for a
    per-prompt metric, each prompt's own gradient: prompts do not interact)."""
    program = PatchProgram(tokens.shape[0], carries=resid_mid_carries(model))
    orig: dict[str, Tensor] = {}
    leaves: dict[str, Tensor] = {}
    for name in names:
        program.record(name, 0, orig, name)
        if fills and name in fills:
            program.fill(name, 0, fills[name])
        program.differentiate(name, leaves)
    calls = MetricCalls(metric, tokens.shape[0], model=model)
    with torch.enable_grad(), applied(model, program):
        value = as_tensor(calls(_tl.forward_logits(model, tokens)))
        if calls.dims not in ((), ("batch",)):
            raise PatchingError(
                f"attr_patch needs a metric that returns one number, or one number per prompt; this one returns "
                f"shape {tuple(value.shape)} (dims {calls.dims}). Reduce its output, e.g. to its mean."
            )
        if not value.requires_grad:
            raise PatchingError("The metric's value does not depend on the logits it received, so it has no gradient.")
        grads = torch.autograd.grad(value.sum(), [leaves[name] for name in names], allow_unused=True)
    gradients = {name: torch.zeros_like(orig[name]) if g is None else g for name, g in zip(names, grads)}
    return value.detach(), calls.dims, {name: tensor.detach() for name, tensor in orig.items()}, gradients


def _cell_change(cell: list[PatchSite], weighted: dict[str, Tensor], batch: int, per_prompt: bool) -> Tensor:
    """The estimated change of the metric for patching every site of `cell`: the weighted
    differences summed over the sites' union, per prompt for a per-prompt metric."""
    if len(cell) == 1:
        (site,) = cell
        tensor = weighted[site.hook_name]
        per_row = tensor[site.index(0, batch, tensor.device)].reshape(batch, -1).sum(1)
    else:
        per_row = 0
        for name in dict.fromkeys(site.hook_name for site in cell):
            tensor = weighted[name]
            mask = torch.zeros(tensor.shape, dtype=torch.bool, device=tensor.device)
            for site in cell:
                if site.hook_name == name:
                    mask[site.index(0, batch, tensor.device)] = True
            per_row = per_row + (tensor * mask).reshape(batch, -1).sum(1)
    return per_row if per_prompt else per_row.sum()

