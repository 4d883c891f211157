"""What the patching methods share: their cells, their metric, checking their hooks exist,
printing their results' shapes."""

import types
from dataclasses import dataclass

from torch import Tensor

from .. import _tl
from .._core.nodes import IterNode
from .._core.selection import LogitReader
from .._core.sites import PatchSite, Sweep, resolve_spec
from ..errors import PatchingError
from ..metrics import Metric, lm_loss
from ..results import PatchResult


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
