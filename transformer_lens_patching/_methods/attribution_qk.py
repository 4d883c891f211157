"""AtP*'s QK fix: the exact attention pattern of a patched query or key, linearised only after the softmax.

AtP linearises the metric through the attention softmax, which fails where the softmax
saturates: a patched key can move a head's attention completely while the gradient there
is almost zero. For the sites of a cell that patch queries or keys (`q`, `k`, their
inputs `q_input`, `k_input`, or the attention scores), AtP* (Kramar et al. 2024) instead
computes the pattern that the patch gives exactly and takes the first order from there:
`(pattern' - pattern) . dM/dpattern`. Here `pattern'` comes from the model itself: a
stacked pass that starts at the cell's layer, applies the cell's edits and stops at that
layer's `hook_pattern`, so rotary embeddings, scaling and masks are the model's own.

Cells share a variant of such a pass where they cannot interfere. A head's pattern
depends only on its own queries and on the keys of its key/value head, and each query row
only on its own query: so cells on different heads, and cells on different query rows of a
head whose keys they leave alone, are patched together in one variant and their changes
are read apart. Every head's query sweep at one layer is one variant; a sweep of keys by
position is one variant per position.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import _tl
from .._core.components import hook_name
from .._core.memory import variants_per_pass
from .._core.program import PatchProgram, applied
from .._core.sites import PatchSite
from ..errors import PatchingError

ROW_WISE = ("q", "q_input", "attn_scores")
"""Components whose patch at a query row changes only that row of the pattern."""
KEY_WISE = ("k", "k_input")
"""Components whose patch may change every row of the pattern of the heads that read them."""
QK_COMPONENTS = ROW_WISE + KEY_WISE
"""What AtP*'s QK fix applies to; every other site is estimated as by AtP."""


def is_qk(site: PatchSite) -> bool:
    """Whether the QK fix applies to `site`."""
    return site.component.name in QK_COMPONENTS


@dataclass
class _Touch:
    """What a set of query/key sites at one layer may change, per query head."""

    whole: set[int] = field(default_factory=set)
    """Heads whose keys are patched: any of their rows may change."""
    rows: dict[int, Tensor] = field(default_factory=dict)
    """head -> (batch, pos) bool: the query rows patched, for heads whose keys are not."""

    def admits(self, other: "_Touch") -> bool:
        """Whether `other`'s changes can be read apart from this one's in one variant."""
        for head in other.whole:
            if head in self.whole or head in self.rows:
                return False
        for head, rows in other.rows.items():
            if head in self.whole or (head in self.rows and bool((self.rows[head] & rows).any())):
                return False
        return True

    def merge(self, other: "_Touch") -> None:
        self.whole |= other.whole
        for head, rows in other.rows.items():
            self.rows[head] = self.rows[head] | rows if head in self.rows else rows


@dataclass
class _Variant:
    """One variant of a pattern pass: cells whose query/key patches are applied together."""

    touch: _Touch = field(default_factory=_Touch)
    members: list[tuple[int, list[PatchSite], _Touch]] = field(default_factory=list)


def _touch(sites: list[PatchSite], shapes: dict[str, torch.Size], n_heads: int, n_kv_heads: int) -> _Touch:
    """Which query heads and rows the `sites` (all at one layer) may change."""
    touch = _Touch()
    group = n_heads // n_kv_heads
    for site in sites:
        shape = shapes[site.hook_name]
        mask = torch.zeros(shape[:3], dtype=torch.bool)
        mask[site.index(0, shape[0], mask.device)] = True
        name = site.component.name
        if name in KEY_WISE:
            for kv_head in mask.any(1).any(0).nonzero().flatten().tolist():
                touch.whole |= set(range(kv_head * group, (kv_head + 1) * group))
            continue
        per_head = mask.transpose(1, 2) if name == "attn_scores" else mask
        for head in per_head.any(1).any(0).nonzero().flatten().tolist():
            rows = per_head[:, :, head]
            touch.rows[head] = touch.rows[head] | rows if head in touch.rows else rows
    for head in touch.whole:
        touch.rows.pop(head, None)
    return touch


def qk_changes(
    model,
    tokens: Tensor,
    qk_parts: list[tuple[int, list[PatchSite]]],
    new_value: Callable[[str], Tensor],
    orig: dict[str, Tensor],
    gradient_sets: list[dict[str, Tensor]],
    *,
    batch_size: int | None,
    max_memory: int | None,
) -> list[dict[int, Tensor]]:
    """The QK-fixed change of the metric, per prompt, of each cell's query/key sites, for each
    set of gradients (GradDrop has one per layer; the patterns are computed once).

    `qk_parts` lists (cell index, that cell's query/key sites at one layer); a cell may
    appear once per layer. `orig` holds the orig run's activations at every patched hook,
    each such layer's `hook_pattern` and, where passes start late, its `hook_resid_pre`;
    each of `gradient_sets` the metric's gradient at each such pattern. Returns, per set,
    {cell: (batch,) change}, summed in float32 whatever the model's dtype, on the input device.
    """
    shape = _tl.model_shape(model)
    shapes = {name: tensor.shape for name, tensor in orig.items()}
    by_layer: dict[int, list[_Variant]] = {}
    for cell, sites in qk_parts:
        touch = _touch(sites, shapes, shape.n_heads, shape.n_kv_heads)
        variants = by_layer.setdefault(sites[0].layer, [])
        variant = next((v for v in variants if v.touch.admits(touch)), None)
        if variant is None:
            variant = _Variant()
            variants.append(variant)
        variant.touch.merge(touch)
        variant.members.append((cell, sites, touch))
    changes: list[dict[int, Tensor]] = [{} for _ in gradient_sets]
    batch = tokens.shape[0]
    for layer, variants in by_layer.items():
        pattern = hook_name("pattern", layer)
        _rows_to(variants, tokens.device)
        per_pass = variants_per_pass(len(variants), tokens, shape, batch_size, max_memory, logits_per_prompt=0)
        for start in range(0, len(variants), per_pass):
            chunk = variants[start : start + per_pass]
            patterns = _patterns_under(model, tokens, layer, chunk, new_value, orig)
            moved = (patterns.to(orig[pattern].device) - orig[pattern].repeat(len(chunk), 1, 1, 1)).float()
            for gradients, found in zip(gradient_sets, changes):
                per_row = (moved * gradients[pattern].repeat(len(chunk), 1, 1, 1)).sum(-1)
                per_row = per_row.to(tokens.device)
                for offset, variant in enumerate(chunk):
                    _read_apart(per_row[offset * batch : (offset + 1) * batch], variant, found)
    return changes


def _rows_to(variants: list[_Variant], device: torch.device) -> None:
    """Move the query-row masks `_read_apart` reads to `device`, once, before any pass runs."""
    for variant in variants:
        for _, _, touch in variant.members:
            touch.rows = {head: _tl.moved(mask, device) for head, mask in touch.rows.items()}


def _read_apart(rows: Tensor, variant: _Variant, found: dict[int, Tensor]) -> None:
    """Add each member cell's change to `found`, from `rows`: the variant's (pattern change
    times gradient), summed over keys, (batch, head, query position)."""
    batch = rows.shape[0]
    for cell, _, touch in variant.members:
        change = sum((rows[:, head].sum(-1) for head in sorted(touch.whole)), rows.new_zeros(batch))
        for head, mask in touch.rows.items():
            change = change + (rows[:, head] * mask).sum(-1)
        found[cell] = found.get(cell, 0) + change


def _patterns_under(
    model,
    tokens: Tensor,
    layer: int,
    variants: list[_Variant],
    new_value: Callable[[str], Tensor],
    orig: dict[str, Tensor],
) -> Tensor:
    """The pattern at `layer` of each variant, stacked along the batch: one pass that starts
    at `layer` where the model allows it and stops at that layer's pattern."""
    batch, count = tokens.shape[0], len(variants)
    start = layer if layer > 0 and _tl.can_start_late(model) else 0
    program = PatchProgram(batch, start_layer=start)
    for offset, variant in enumerate(variants):
        for _, sites, _ in variant.members:
            for site in sites:
                program.edit(site, offset * batch, new_value(site.hook_name))
    program.stop_at(hook_name("pattern", layer))
    with applied(model, program):
        if start:
            _tl.forward_logits(model, orig[hook_name("resid_pre", layer)].repeat(count, 1, 1), start)
        else:
            _tl.forward_logits(model, tokens.repeat(count, 1))
    if program.stopped_with is None:
        raise PatchingError(
            f"AtP*'s QK fix recomputes attention patterns, but {hook_name('pattern', layer)} never "
            "fired: this model does not compute them where TransformerLens hooks them. Use "
            "method='atp'."
        )
    return program.stopped_with
