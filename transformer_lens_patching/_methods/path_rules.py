"""Path patching's rules: which senders reach which receivers, and which passes they need.

A sender at a point of the residual stream reaches a receiver that reads it at or after
that point (`reaches`). The one-pass algorithm rebuilds a receiver's input from the
per-head input hooks (`HEAD_INPUTS`); the two-pass algorithm freezes every head before
the last receiver (`pass_one_plan`) and groups the cells that share their senders into
one recording variant (`two_pass_blocks`).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .. import _tl
from .._core.components import COMPONENTS, RECEIVERS, SENDERS, Component, hook_name
from .._core.nodes import IterNode, Node
from .._core.plan import Block, stacked_passes
from .._core.program import entry_layer
from .._core.selection import LogitReader
from .._core.sites import PatchSite, Sweep
from .._core.wiring import SenderWrites
from .._tl import ModelShape
from ..errors import PatchingError

HEAD_INPUTS = {
    "q": ("q_input",),
    "k": ("k_input",),
    "v": ("v_input",),
    "q_input": ("q_input",),
    "k_input": ("k_input",),
    "v_input": ("v_input",),
    "pattern": ("q_input", "k_input"),
    "z": ("q_input", "k_input", "v_input"),
}
"""Which per-head input hooks carry each head receiver's input."""

WHOLE_HEAD_RECEIVERS = ("z", "pattern")
"""Receivers that mix positions, so pass 2 patches the whole head, not only `seq_pos`."""


@dataclass(frozen=True)
class PathVariant:
    """One path-patching experiment: these senders to these receivers."""

    senders: list[PatchSite]
    receivers: list[PatchSite]


def _names(spec) -> list[str]:
    if isinstance(spec, IterNode):
        return list(spec.names)
    if isinstance(spec, Node):
        return [spec.name]
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(n, Node) for n in spec):
        return [n.name for n in spec]
    return []


def check_specs(senders, receivers, seq_pos) -> None:
    """Raise a PatchingError for senders or receivers path patching cannot take."""
    if isinstance(senders, IterNode) and isinstance(receivers, IterNode):
        raise PatchingError("Only one of sender_nodes and receiver_nodes may be an IterNode, not both.")
    for spec, what, allowed in ((senders, "sender", SENDERS), (receivers, "receiver", RECEIVERS)):
        for name in _names(spec):
            if name not in allowed:
                raise PatchingError(
                    f"{name!r} cannot be a {what} in path patching. Valid {what}s: {', '.join(allowed)}."
                )
        nodes = [spec] if isinstance(spec, Node) else spec if isinstance(spec, (list, tuple)) else []
        for node in nodes:
            if isinstance(node, Node) and node.seq_pos is not None:
                raise PatchingError(
                    f"{node!r} has its own seq_pos, which path_patch does not allow: direct paths never cross "
                    "positions, so one seq_pos= argument of path_patch applies to senders and receivers alike."
                )
        if isinstance(spec, IterNode):
            if spec.seq_pos not in (None, "each"):
                raise PatchingError(
                    f"In path_patch an IterNode's seq_pos must be None or 'each' (got {spec.seq_pos!r}); "
                    "pass fixed positions as path_patch(seq_pos=...)."
                )
            if spec.seq_pos == "each" and seq_pos is not None:
                raise PatchingError("IterNode(seq_pos='each') sweeps positions, so path_patch's seq_pos must be None.")


def writes_are_linear(model) -> bool:
    """Whether each head's and MLP's write to the residual stream is its output times fixed weights
    (`head_writes`), with no norm after it: what path patching's one-pass algorithm and its
    skipped attention add to the stream itself. Otherwise path patching lets the model compute
    every layer whose senders change, with the others' outputs frozen, so that a post-norm sees
    the sender's change together with the rest of its layer's output (and edges, circuits and
    `attr_path_patch` take each head's write through the norm: `SenderWrites`,
    `PostNormCircuitRows`)."""
    return not _tl.post_norms(model)


def check_head_outputs(model, what: str) -> None:
    """Refuse multi-head latent attention (DeepSeek's MLA), whose head outputs TransformerLens does
    not give head by head, for `what` (path patching, edges, circuits), which reads them."""
    if _tl.model_shape(model).latent_attention:
        raise PatchingError(
            "This model's attention is multi-head latent attention (DeepSeek's MLA), whose head outputs "
            "TransformerLens does not split by head, so a head's write to the residual stream cannot be read "
            f"from them, which {what} builds on: refused rather than computed wrong. act_patch and attr_patch "
            "are exact on this model for every node but heads."
        )


def check_parallel_receivers(shape: ModelShape, receivers, what: str) -> None:
    """Refuse MLP neuron receivers (`pre`) where `what` adds each sender's write to them itself,
    on a model whose blocks compute attention and MLP in parallel: there the MLP reads the
    layer's input, beside the heads, not after them. (Such a model has no `resid_mid`: site
    resolution refuses it.)"""
    if not shape.parallel_attn_mlp:
        return
    mlp_side = [name for name in _names(receivers) if name == "pre"]
    if mlp_side:
        raise PatchingError(
            f"This model computes attention and MLP in parallel, so an MLP reads its layer's input beside the heads; "
            f"{what} adds each sender's write to a receiver's input itself and cannot take {mlp_side[0]!r} receivers "
            "here. Use path_patch with direct_includes_mlps=True (its forward passes follow the model), or the next "
            "layer's receivers."
        )


def paired_variants(senders, receivers, sender_spec, receiver_spec) -> tuple[list[PathVariant], list[Sweep] | None]:
    """Pair senders with receivers: one variant per cell of whichever side is an IterNode."""

    def repositioned(sites: list[PatchSite], cell: list[PatchSite], each: bool) -> list[PatchSite]:
        return [site.with_positions_of(cell[0]) for site in sites] if each else sites

    if isinstance(sender_spec, IterNode):
        each = sender_spec.seq_pos == "each"
        cells = [cell for sweep in senders for cell in sweep.sites]
        return [PathVariant(cell, repositioned(receivers, cell, each)) for cell in cells], senders
    if isinstance(receiver_spec, IterNode):
        each = receiver_spec.seq_pos == "each"
        cells = [cell for sweep in receivers for cell in sweep.sites]
        return [PathVariant(repositioned(senders, cell, each), cell) for cell in cells], receivers
    return [PathVariant(senders, receivers)], None


def input_site(component: Component, site: PatchSite) -> PatchSite:
    """The per-head input hook `component` (e.g. `q_input`) of a head receiver `site`."""
    node = Node(component.name, site.layer, head=site.unit)
    return PatchSite(node, component.hook_name(site.layer), site.unit, site.positions, site.device_positions)


def input_base_hook(receiver: PatchSite) -> str:
    """The orig activation a receiver's input is rebuilt from in the one-pass algorithm."""
    if receiver.component.name in HEAD_INPUTS:
        return hook_name("resid_pre", receiver.layer)
    return receiver.hook_name


@dataclass(frozen=True)
class PassOnePlan:
    """What pass 1 of the two-pass algorithm freezes to orig values, and where it skips attention."""

    frozen: list[tuple[int, str]]
    """(layer, hook) of each frozen activation: `attn_out` where attention is skipped, else
    `z` (every head), and `post` when MLPs are frozen too."""
    replaced_attention: frozenset[int]
    """Layers whose attention pass 1 does not compute: with every head frozen, their output
    is the orig one plus the senders' contributions."""


def pass_one_plan(
    shape: ModelShape, receivers: list[PatchSite], freeze_mlps: bool, skip_attention: bool
) -> PassOnePlan:
    """Freeze only what lies before the last point a receiver reads; skip the attention of
    every layer without an attention receiver when `skip_attention`."""
    last_read = max(2 * r.layer + r.component.read_offset for r in receivers)
    attention_receiver_layers = {r.layer for r in receivers if r.component.name in HEAD_INPUTS}
    heads, mlps = COMPONENTS["z"], COMPONENTS["post"]
    frozen, replaced = [], set()
    for layer in range(shape.n_layers):
        if 2 * layer + heads.write_offset <= last_read:
            if skip_attention and layer not in attention_receiver_layers:
                replaced.add(layer)
                frozen.append((layer, COMPONENTS["attn_out"].hook_name(layer)))
            else:
                frozen.append((layer, heads.hook_name(layer)))
        if freeze_mlps and 2 * layer + mlps.write_offset <= last_read:
            frozen.append((layer, mlps.hook_name(layer)))
    return PassOnePlan(frozen, frozenset(replaced))


def reaches(sender: PatchSite, receiver: PatchSite) -> bool:
    """Whether a direct residual path goes from `sender`'s output to `receiver`'s input."""
    written = 2 * sender.layer + sender.component.write_offset
    read = 2 * receiver.layer + receiver.component.read_offset
    return written <= read


def reaching_part(variant: PathVariant, reader: LogitReader | None) -> PathVariant | None:
    """The variant without the senders that reach none of its receivers, or (with a
    `reader`) only positions after every position the metric reads, and without the
    receivers that none of its senders reach (they keep their orig values); None if
    nothing is reached: then nothing changes, and the result is the unpatched metric."""
    senders = [s for s in variant.senders if reader is None or not reader.only_after_reads(s)]
    senders = [s for s in senders if any(reaches(s, r) for r in variant.receivers)]
    receivers = [r for r in variant.receivers if any(reaches(s, r) for s in senders)]
    return PathVariant(senders, receivers) if senders else None


def patched_hooks(receiver: PatchSite) -> list[str]:
    """The hooks the one-pass algorithm edits for `receiver`."""
    inputs = HEAD_INPUTS.get(receiver.component.name)
    if inputs is None:
        return [receiver.hook_name]
    return [input_site(COMPONENTS[name], receiver).hook_name for name in inputs]


def recorded_until(receivers: Sequence[PatchSite]) -> int:
    """The layer a recording pass stops before: it has run the layers the receivers read in."""
    return max(r.layer + (0 if r.component.name == "resid_pre" else 1) for r in receivers)


@dataclass(frozen=True)
class PathPlan:
    """Everything a path_patch plan's passes need, decided before any of them runs."""

    variants: list[PathVariant | None]
    """Per cell: the senders that reach a receiver and the receivers they reach (None: no path)."""
    fork: bool
    """Whether the one-pass algorithm runs (else the two-pass one)."""
    pass_one: PassOnePlan
    flags: set[str]
    """The model flags the hooks need (e.g. `use_split_qkv_input`)."""


def two_pass_blocks(
    plan: PathPlan,
    live: list[int],
    chunk: Callable[[int, bool], int],
    start_late: Callable[[bool], bool],
    n_layers: int,
) -> list[Block]:
    """Blocks of the two-pass algorithm: cells that share their senders share one recording
    variant; each block records a chunk of such groups, then patches their cells in.
    `chunk(n, measured)` and `start_late(measured)` size and place the passes."""
    variants = plan.variants
    groups: dict[tuple, list[int]] = {}
    for cell in live:
        key = tuple(
            (s.hook_name, s.unit, None if s.positions is None else tuple(s.positions.flatten().tolist()))
            for s in variants[cell].senders
        )
        groups.setdefault(key, []).append(cell)
    members = list(groups.values())
    block_size = chunk(len(members), False)
    blocks = []
    for start in range(0, len(members), block_size):
        block = members[start : start + block_size]
        starts = [min(entry_layer(s.hook_name) for s in variants[cells[0]].senders) for cells in block]
        recording = stacked_passes(
            "record", range(len(block)), starts, chunk(len(block), False), lambda s: n_layers, start_late(False)
        )
        receivers_of = [[r for cell in cells for r in variants[cell].receivers] for cells in block]
        recording = [
            replace(p, stop_layer=recorded_until([r for group in p.variants for r in receivers_of[group]]))
            for p in recording
        ]
        cells = [cell for group in block for cell in group]
        starts = [min(entry_layer(r.hook_name) for r in variants[cell].receivers) for cell in cells]
        patching = stacked_passes("patch", cells, starts, chunk(len(cells), True), lambda s: n_layers, start_late(True))
        blocks.append(Block(tuple(cells), tuple(recording + patching), tuple(tuple(group) for group in block)))
    return blocks


def can_fork(model, shape: ModelShape, variants: list[PathVariant]) -> bool:
    """Whether the one-pass algorithm can set every receiver's input (see the module docstring of `path`)."""
    receivers = {site.component.name for v in variants for site in v.receivers}
    if "pre" in receivers:
        return False
    if shape.n_kv_heads != shape.n_heads and receivers & set(WHOLE_HEAD_RECEIVERS):
        return False
    if receivers & set(HEAD_INPUTS):
        return _tl.supports_split_qkv_input(model)
    return True


def residual_write(site: PatchSite, difference: Tensor, writes: SenderWrites, live: dict | None = None) -> Tensor:
    """What a sender site adds to the residual stream when its activation changes by
    `difference` (new - orig, the whole activation): (batch, pos, d_model), zero outside
    the site's positions. A head's or neuron's change goes through its rows of W_O or W_out,
    and where the model normalises that output, to first order through the norm at the
    activations of the run `live` (`SenderWrites`)."""
    units = slice(None) if site.unit is None else slice(site.unit, site.unit + 1)
    live_value = None if live is None else live.get(site.hook_name)
    if site.component.name == "z":
        difference = writes.heads(site.layer, live_value, difference, units, summed=True)
    elif site.component.name == "post":
        difference = writes.neurons(site.layer, live_value, difference, units)
    if site.positions is None:
        return difference
    batch, seq_len = difference.shape[:2]
    mask = torch.zeros(batch, seq_len, dtype=difference.dtype, device=difference.device)
    mask[torch.arange(batch, device=difference.device).unsqueeze(1), site.device_positions.to(difference.device)] = 1
    return difference * mask.unsqueeze(-1)
