"""What the patching methods share: the front half (`prepare_runs`: the model checked, the tokens,
the metric and its logit reader; `patched_in_source`), their cells, the argument checks and
messages several methods give, checking their hooks exist, printing their results' shapes."""

import itertools
import types
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _tl
from .._core.distributed import current_ranks
from .._core.executor import Runs, logit_reader, progress_bar
from .._core.nodes import IterNode
from .._core.selection import LogitReader
from .._core.sites import PatchSite, Sweep, resolve_spec
from .._core.sources import SourceFactory, planned_source
from .._stats import PromptForm
from ..errors import PatchingError
from ..metrics import Metric, lm_loss, prompt_form
from ..results import BATCH, PatchResult

NOTHING_TO_PATCH_IN = (
    "Nothing to patch in: pass new_input (resample ablation), new_cache (an ActivationCache, "
    "e.g. from mean_ablation_cache) or new_cache='zero' (zero ablation)."
)
IG_STEPS = 10
"""The points of the integrated gradients' sum when `steps` is not given."""
ESTIMATES = ("value", "delta")
"""What `attr_patch` returns and `confirm` ranks: the estimated patched metric, or only its change."""


def prepare_runs(
    model,
    orig_input,
    patching_metric,
    *,
    apply_metric_to_cache: bool = False,
    uncertainty: bool = False,
    needs: str = "uncertainty=True needs",
) -> Runs:
    """The front half every method shares, done once: check the model (a TransformerLens model in
    eval mode), tokenize `orig_input`, resolve the metric and the reader of the logits it selects;
    with `uncertainty`, the metric's per-prompt form and how its values combine (`prompt_form`;
    `needs` starts its errors).

    >>> runs = prepare_runs(model, corrupted, metric)
    >>> runs.tokens.shape == corrupted.shape
    True
    """
    _tl.check_model(model)
    _tl.check_deterministic(model)
    tokens = _tl.to_tokens(model, orig_input)
    metric = resolve_metric(patching_metric, tokens)
    if not isinstance(uncertainty, bool):
        raise PatchingError(f"uncertainty must be True or False, got {uncertainty!r}.")
    form = None
    if uncertainty:
        metric, offset, scale = prompt_form(metric, tokens.shape[0], needs)
        form = PromptForm(offset, scale)
    reader = logit_reader(model, metric, tokens, _tl.model_shape(model).d_vocab, apply_metric_to_cache)
    return Runs(model, tokens, metric, reader, apply_metric_to_cache, form)


def kept_per_prompt(result, runs: Runs, baseline: Tensor, *, change: bool):
    """With `uncertainty=True` (`runs.prompt_form`), a method's per-prompt results (a dict of
    PatchResults with a last `batch` dim, or one `(batch,)` tensor) as results keeping them:
    changes from the unpatched run (`change`, tested against 0) or metric values (tested against
    `baseline`, the unpatched run's per-prompt values). Without, `result` itself."""
    form = runs.prompt_form
    if form is None:
        return result
    baseline = torch.zeros_like(baseline) if change else baseline
    offset = None if change else form.offset

    def kept(per_prompt: PatchResult) -> PatchResult:
        return PatchResult.from_per_prompt(per_prompt, offset=offset, scale=form.scale, baseline=baseline)

    if isinstance(result, dict):
        return {name: kept(value) for name, value in result.items()}
    return kept(PatchResult(result.detach().cpu(), (BATCH,)))


def patched_in_source(
    runs: Runs, new_input, new_cache, hooks, missing: str = NOTHING_TO_PATCH_IN
) -> tuple[SourceFactory, str]:
    """Where the values patched in at `hooks` come from (`new_input`, or `new_cache`: a cache, a
    mean-ablation cache or "zero"), made when first needed, and its description for the plan;
    `missing` is the error when neither is given."""
    return planned_source(runs.model, new_input, new_cache, hooks, runs.tokens, "new_cache", missing)


@dataclass(frozen=True)
class PatchCells:
    """What `patching_nodes` patch, resolved: one cell per result (each a list of sites patched together)."""

    resolved: list[Sweep] | list[PatchSite]
    """The sweeps of an IterNode, or the sites of a Node or list of Nodes."""
    is_sweep: bool
    cells: list[list[PatchSite]]
    names: set[str]
    """Every hook the cells patch."""


def patch_cells(model, tokens: Tensor, patching_nodes) -> PatchCells:
    """Resolve `patching_nodes` against `model` and `tokens` into cells (one per cell of a
    sweep; one for a Node or list of Nodes), checking that the model has their hooks."""
    resolved = resolve_spec(patching_nodes, _tl.model_shape(model), tokens, "patching_nodes")
    is_sweep = isinstance(patching_nodes, IterNode)
    cells = [cell for sweep in resolved for cell in sweep.sites] if is_sweep else [resolved]
    names = {site.hook_name for cell in cells for site in cell}
    check_hooks_exist(model, names)
    scores = any(site.component.name == "attn_scores" for cell in cells for site in cell)
    if scores and not _tl.attention_scores_patchable(model):
        raise PatchingError(
            "This model's attention is computed by the module it wraps, which fires hook_attn_scores only after "
            "the softmax, with the pattern: a patch there would not change anything. Patch 'pattern' (or 'q' / 'k') "
            "instead."
        )
    return PatchCells(resolved, is_sweep, cells, names)


def check_hooks_exist(model, names) -> None:
    """Raise a PatchingError naming any hook the model does not have."""
    available = _tl.hook_names(model)
    missing = sorted(set(names) - available)
    if missing:
        raise PatchingError(
            f"This model has no hook {missing[0]!r}. It may not compute that activation "
            "(e.g. attn.hook_result needs use_attn_result, rotary models have no hook_pos_embed)."
        )


def print_shapes(results) -> None:
    """For `verbose=True`, as the prior art did: one line per component, e.g.
    `results['z'].shape = (layer=12, head=12)`."""
    if not isinstance(results, dict):
        return
    for name, result in results.items():
        if isinstance(result, PatchResult):
            print(f"results[{name!r}].shape = ({result.dims_text})")


def resolve_metric(metric, tokens: Tensor) -> Metric:
    """A callable metric: `metric` itself, or the LM loss for "loss" / "loss_per_token"."""
    if isinstance(metric, str):
        if metric == "loss":
            return lm_loss(tokens)
        if metric == "loss_per_token":
            return lm_loss(tokens, per_token=True)
        raise PatchingError(f"Unknown metric {metric!r}: expected a callable, 'loss' or 'loss_per_token'.")
    if not callable(metric):
        raise PatchingError(
            f"patching_metric must be a callable, 'loss' or 'loss_per_token'; got {type(metric).__name__}."
        )
    return metric


def describe_metric(metric, reader: LogitReader | None, apply_metric_to_cache: bool) -> str:
    """What a plan says about its metric: what it is, and what it receives."""
    plain = isinstance(metric, types.FunctionType) or type(metric).__repr__ is object.__repr__
    name = f"{getattr(metric, '__qualname__', type(metric).__name__)}" if plain else repr(metric)
    if apply_metric_to_cache:
        return f"{name}, of each patched run's ActivationCache"
    if reader is None:
        return f"{name}, of the full logits (batch, pos, d_vocab)"
    positions = reader.positions.shape[1]
    tokens = "the whole vocabulary" if reader.reads_whole_vocabulary else f"{reader.n_columns} logits"
    return f"{name}: reads {tokens} at {positions} position{'s' if positions > 1 else ''} per prompt"


def check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    """Refuse an argument `what` whose `value` is not one of `choices`."""
    if value not in choices:
        raise PatchingError(f"{what} must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def checked_steps(method: str, steps: int | None, integrated: tuple[str, ...] = ("ig",)) -> int:
    """The points of the integrated gradients' sum (for the `integrated` methods): 1 for the others."""
    if method not in integrated:
        if steps is not None:
            named = " or ".join(repr(name) for name in integrated)
            raise PatchingError(
                f"steps is for method={named} (integrated gradients); method={method!r} takes none, got {steps!r}."
            )
        return 1
    steps = IG_STEPS if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PatchingError(f"steps must be a whole number of at least 1, got {steps!r}.")
    return steps


def check_ranking_arguments(patching_nodes, top_k, estimate: str) -> None:
    """What `confirm` and `confirm_paths` rank: an IterNode's cells, the top `top_k`, estimates of `estimate`."""
    if not isinstance(patching_nodes, IterNode):
        raise PatchingError(
            f"confirm ranks the cells of a sweep, so patching_nodes must be the IterNode the estimates were computed "
            f"for; got {patching_nodes!r}. For one Node or a list of Nodes, call act_patch."
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise PatchingError(f"top_k must be a whole number of at least 1 (the cells to patch exactly), got {top_k!r}.")
    check_choice(estimate, ESTIMATES, "estimate")


def cell_places(sweeps: list[Sweep]):
    """(component, coordinates) of every cell, in the order of the sweeps' sites."""
    for sweep in sweeps:
        for values in itertools.product(*(sweep.coords[dim] for dim in sweep.dims)):
            yield sweep.name, dict(zip(sweep.dims, values))


def gradient_progress(progress: bool | str, passes: int, method: str):
    """A progress bar over a call's `passes` gradient passes when `progress` asks for one (a string
    labels it; True labels it with the method's name), or a context giving None. Under
    torch.distributed only rank 0 shows it, as plans do."""
    ranks = current_ranks()
    shown = progress and (ranks is None or ranks.rank == 0)
    return progress_bar(passes if shown else 0, progress if isinstance(progress, str) else method)
