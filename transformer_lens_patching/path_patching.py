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
"""

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _tl
from ._tl import ModelShape
from .activation_patching import check_hooks_exist
from .components import COMPONENTS, RECEIVERS, SENDERS, Component
from .engine import (
    OrigResiduals,
    Variants,
    check_chunk_args,
    logit_reader,
    progress_bar,
    run_variants,
    variants_per_pass,
)
from .errors import PatchingError
from .hooks import PatchProgram, entry_layer
from .metrics import resolve_metric
from .nodes import IterNode, Node, normalize_seq_pos
from .plan import PatchSite, Sweep, resolve_spec
from .results import PatchResult, assemble
from .selection import LogitReader
from .sources import ActivationSource, cached_run, check_cache
from .tensor_types import ModelInput, OtherModelInput

_HEAD_INPUTS = {"q": ("q_input",), "k": ("k_input",), "v": ("v_input",), "q_input": ("q_input",),
                "k_input": ("k_input",), "v_input": ("v_input",), "pattern": ("q_input", "k_input"),
                "z": ("q_input", "k_input", "v_input")}  # fmt: skip
"""Which per-head input hooks carry each head receiver's input."""

_WHOLE_HEAD_RECEIVERS = ("z", "pattern")
"""Receivers that mix positions, so pass 2 patches the whole head, not only `seq_pos`."""


@dataclass(frozen=True)
class _Variant:
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


def _check_specs(senders, receivers, seq_pos) -> None:
    if isinstance(senders, IterNode) and isinstance(receivers, IterNode):
        raise PatchingError("Only one of sender_nodes and receiver_nodes may be an IterNode, not both.")
    for spec, what, allowed in ((senders, "sender", SENDERS), (receivers, "receiver", RECEIVERS)):
        for name in _names(spec):
            if name not in allowed:
                raise PatchingError(f"{name!r} cannot be a {what} in path patching. Valid {what}s: {', '.join(allowed)}.")
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


def _variants(senders, receivers, sender_spec, receiver_spec) -> tuple[list[_Variant], list[Sweep] | None]:
    """Pair senders with receivers: one variant per cell of whichever side is an IterNode."""

    def repositioned(sites: list[PatchSite], cell: list[PatchSite], each: bool) -> list[PatchSite]:
        return [site.with_positions(cell[0].positions) for site in sites] if each else sites

    if isinstance(sender_spec, IterNode):
        each = sender_spec.seq_pos == "each"
        cells = [cell for sweep in senders for cell in sweep.sites]
        return [_Variant(cell, repositioned(receivers, cell, each)) for cell in cells], senders
    if isinstance(receiver_spec, IterNode):
        each = receiver_spec.seq_pos == "each"
        cells = [cell for sweep in receivers for cell in sweep.sites]
        return [_Variant(repositioned(senders, cell, each), cell) for cell in cells], receivers
    return [_Variant(senders, receivers)], None


def _source(model, cache, model_input, names: set[str], tokens: Tensor, what: str, extra=()) -> ActivationSource:
    """The activations `names` of one run, from a given cache or by running `model_input`
    (then also caching the `extra` hooks, which a given cache need not hold)."""
    batch = tokens.shape[0]
    if isinstance(cache, str):
        if cache != "zero" or what != "new_cache":
            raise PatchingError(f"{what} must be an ActivationCache or a dict{' or zero' if what == 'new_cache' else ''}; got {cache!r}.")
        return ActivationSource(None, batch)
    if cache is not None:
        return ActivationSource(check_cache(cache, names, tokens.shape, what), batch)
    if model_input is None:
        raise PatchingError(f"path_patch needs {what.replace('_cache', '_input')} or {what}.")
    run_names = names | set(extra)
    return ActivationSource(cached_run(model, model_input, run_names, tokens.shape, what.replace("_cache", "_input")), batch)


def _input_site(component: Component, site: PatchSite) -> PatchSite:
    node = Node(component.name, site.layer, head=site.unit)
    return PatchSite(node, component.hook_name(site.layer), site.unit, site.positions)


def _input_base_hook(receiver: PatchSite) -> str:
    """The orig activation a receiver's input is rebuilt from in the one-pass algorithm."""
    if receiver.component.name in _HEAD_INPUTS:
        return COMPONENTS["resid_pre"].hook_name(receiver.layer)
    return receiver.hook_name


@dataclass(frozen=True)
class _PassOnePlan:
    """What pass 1 of the two-pass algorithm freezes to orig values, and where it skips attention."""

    frozen: list[tuple[int, str]]
    """(layer, hook) of each frozen activation: `attn_out` where attention is skipped, else
    `z` (every head), and `post` when MLPs are frozen too."""
    replaced_attention: frozenset[int]
    """Layers whose attention pass 1 does not compute: with every head frozen, their output
    is the orig one plus the senders' contributions."""


def _pass_one_plan(shape: ModelShape, receivers: list[PatchSite], freeze_mlps: bool, skip_attention: bool) -> _PassOnePlan:
    """Freeze only what lies before the last point a receiver reads; skip the attention of
    every layer without an attention receiver when `skip_attention`."""
    last_read = max(2 * r.layer + r.component.read_offset for r in receivers)
    attention_receiver_layers = {r.layer for r in receivers if r.component.name in _HEAD_INPUTS}
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
    return _PassOnePlan(frozen, frozenset(replaced))


def _reaches(sender: PatchSite, receiver: PatchSite) -> bool:
    """Whether a direct residual path goes from `sender`'s output to `receiver`'s input."""
    written = 2 * sender.layer + sender.component.write_offset
    read = 2 * receiver.layer + receiver.component.read_offset
    return written <= read


def _reaching(variant: _Variant, reader: LogitReader | None) -> _Variant | None:
    """The variant without the senders that reach none of its receivers, or (with a
    `reader`) only positions after every position the metric reads, and without the
    receivers that none of its senders reach (they keep their orig values); None if
    nothing is reached: then nothing changes, and the result is the unpatched metric."""
    senders = [s for s in variant.senders if reader is None or not reader.only_after_reads(s)]
    senders = [s for s in senders if any(_reaches(s, r) for r in variant.receivers)]
    receivers = [r for r in variant.receivers if any(_reaches(s, r) for s in senders)]
    return _Variant(senders, receivers) if senders else None


def _patched_hooks(receiver: PatchSite) -> list[str]:
    """The hooks the one-pass algorithm edits for `receiver`."""
    inputs = _HEAD_INPUTS.get(receiver.component.name)
    if inputs is None:
        return [receiver.hook_name]
    return [_input_site(COMPONENTS[name], receiver).hook_name for name in inputs]


class _PathPatcher:
    """State shared by the path-patching algorithms for one call."""

    def __init__(self, model, tokens, shape: ModelShape, metric, chunk_args, progress, residuals: OrigResiduals,
                 reader: LogitReader | None):  # fmt: skip
        self.model = model
        self.tokens = tokens
        self.shape = shape
        self.metric = metric
        self.batch_size, self.max_memory, self.apply_to_cache = chunk_args
        self.progress = progress
        self.batch = tokens.shape[0]
        self.residuals = residuals
        self.reader = reader

    @functools.cached_property
    def w_o(self) -> Tensor:
        return _tl.w_o(self.model)

    @functools.cached_property
    def w_out(self) -> Tensor:
        return _tl.w_out(self.model)

    def _chunk(self, n_variants: int, measured: bool) -> int:
        """Variants per pass; passes that only record compute no logits."""
        logits_per_prompt = None if self.reader is None else self.reader.floats_per_prompt
        return variants_per_pass(
            n_variants, self.tokens, self.shape, self.batch_size, self.max_memory, self.apply_to_cache and measured,
            logits_per_prompt if measured else 0,
        )

    def _run(self, variants: Variants, progress=None) -> list:
        measured = variants.metric is not None
        return run_variants(
            self.model, self.tokens, variants, self._chunk(variants.count, measured), self.residuals,
            self.apply_to_cache and measured, progress, self.reader,
        )

    def unpatched(self):
        """The metric of the orig run, from its final residual stream."""
        return self._run(Variants.orig_run(self.shape.n_layers, self.metric))[0]

    def two_pass(self, variants: list[_Variant], orig: ActivationSource, new: ActivationSource, plan: _PassOnePlan) -> list:
        """Pass 1 freezes heads (and MLPs) and records the receivers; pass 2 patches them in.

        Variants that share their senders share one pass-1 run, which starts at the first
        sender, skips the attention `plan` replaces and stops once the receivers are
        recorded. Sender groups are processed a block at a time, so only one block's
        recordings are held in memory.
        """
        groups: dict[tuple, list[int]] = {}
        for index, variant in enumerate(variants):
            key = tuple((s.hook_name, s.unit, None if s.positions is None else tuple(s.positions.flatten().tolist()))
                        for s in variant.senders)  # fmt: skip
            groups.setdefault(key, []).append(index)
        members = list(groups.values())
        frozen = [(layer, name, orig.value(name)) for layer, name in plan.frozen]
        outputs: list = [None] * len(variants)
        block_size = self._chunk(len(members), measured=False)
        for start in range(0, len(members), block_size):
            block = members[start : start + block_size]
            records: dict[tuple[int, str], Tensor] = {}

            def pass_one(program: PatchProgram, group: int, row_start: int) -> None:
                receivers = {site.hook_name: site for v in block[group] for site in variants[v].receivers}
                for name, site in receivers.items():
                    if site.component.name == "z":
                        program.record(name, row_start, records, (group, name))
                for layer, name, value in frozen:
                    if layer >= program.start_layer:
                        program.fill(name, row_start, value)
                for site in variants[block[group][0]].senders:
                    if site.component.name == "z" and site.layer in plan.replaced_attention:
                        attn_out = COMPONENTS["attn_out"].hook_name(site.layer)
                        program.add(attn_out, row_start, self._contribution(site, orig, new))
                    else:
                        program.edit(site, row_start, new.value(site.hook_name))
                for name, site in receivers.items():
                    if site.component.name != "z":
                        program.record(name, row_start, records, (group, name))

            starts = [min(entry_layer(s.hook_name) for s in variants[indices[0]].senders) for indices in block]
            self._run(Variants(len(block), pass_one, starts, stop_when_recorded=True,
                               replaced_attention=plan.replaced_attention))  # fmt: skip
            pairs = [(group, v) for group, indices in enumerate(block) for v in indices]

            def pass_two(program: PatchProgram, index: int, row_start: int) -> None:
                group, variant = pairs[index]
                for site in variants[variant].receivers:
                    if site.component.name in _WHOLE_HEAD_RECEIVERS:
                        site = site.with_positions(None)
                    program.edit(site, row_start, records[(group, site.hook_name)])

            starts = [min(entry_layer(r.hook_name) for r in variants[v].receivers) for _, v in pairs]
            measured = self._run(Variants(len(pairs), pass_two, starts, self.metric), self.progress)
            for (_, variant), output in zip(pairs, measured):
                outputs[variant] = output
        return outputs

    def one_pass(self, variants: list[_Variant], orig: ActivationSource, new: ActivationSource) -> list:
        """Set each receiver's input to orig plus the reaching senders' new - orig, in one pass."""
        contributions: dict[int, Tensor] = {}

        def contribution(site: PatchSite) -> Tensor:
            if id(site) not in contributions:
                contributions[id(site)] = self._contribution(site, orig, new)
            return contributions[id(site)]

        def add_steps(program: PatchProgram, variant: int, row_start: int) -> None:
            senders = variants[variant].senders
            for receiver in variants[variant].receivers:
                reaching = [contribution(s) for s in senders if _reaches(s, receiver)]
                delta = torch.stack(reaching).sum(0) if reaching else None
                base = orig.value(_input_base_hook(receiver))
                value = base if delta is None else base + delta
                inputs = _HEAD_INPUTS.get(receiver.component.name)
                if inputs is None:
                    program.edit(receiver, row_start, value)
                for input_name in inputs or ():
                    component = COMPONENTS[input_name]
                    count = self.shape.unit_count(component.unit)
                    expanded = value.unsqueeze(2).expand(*value.shape[:2], count, value.shape[-1])
                    program.edit(_input_site(component, receiver), row_start, expanded)

        starts = [min(entry_layer(name) for r in v.receivers for name in _patched_hooks(r)) for v in variants]
        return self._run(Variants(len(variants), add_steps, starts, self.metric), self.progress)

    def _contribution(self, site: PatchSite, orig: ActivationSource, new: ActivationSource) -> Tensor:
        """What `site`'s change from orig to new adds to the residual stream, (batch, pos, d_model)."""
        before = orig.value(site.hook_name)
        diff = new.tensor_like(site.hook_name, before) - before
        units = slice(None) if site.unit is None else slice(site.unit, site.unit + 1)
        if site.component.name == "z":
            w_o = self.w_o[site.layer, units]
            diff = torch.einsum("bphd,hdm->bpm", diff[:, :, units], w_o.to(diff.dtype))
        elif site.component.name == "post":
            w_out = self.w_out[site.layer, units]
            diff = diff[..., units] @ w_out.to(diff.dtype)
        if site.positions is not None:
            mask = torch.zeros(diff.shape[:2], dtype=diff.dtype, device=diff.device)
            mask[torch.arange(self.batch, device=diff.device).unsqueeze(1), site.positions.to(diff.device)] = 1
            diff = diff * mask.unsqueeze(-1)
        return diff


def _can_fork(model, shape: ModelShape, variants: list[_Variant]) -> bool:
    receivers = {site.component.name for v in variants for site in v.receivers}
    if "pre" in receivers:
        return False
    if shape.n_kv_heads != shape.n_heads and receivers & set(_WHOLE_HEAD_RECEIVERS):
        return False
    if receivers & set(_HEAD_INPUTS):
        return _tl.supports_split_qkv_input(model)
    return True


def path_patch(
    model,
    orig_input: ModelInput,
    new_input: OtherModelInput | None,
    sender_nodes: Node | Sequence[Node] | IterNode,
    receiver_nodes: Node | Sequence[Node] | IterNode,
    patching_metric: Callable | str,
    orig_cache=None,
    new_cache=None,
    seq_pos=None,
    apply_metric_to_cache: bool = False,
    direct_includes_mlps: bool = True,
    verbose: bool = False,
    *,
    batch_size: int | None = None,
    max_memory: int | None = None,
) -> "float | Tensor | dict[str, PatchResult]":
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
        patching_metric: A function of the final logits, or "loss" / "loss_per_token".
        orig_cache: A cache of the orig run, if already computed.
        new_cache: A cache of the new run, if already computed (or "zero", as above).
        seq_pos: Positions for senders and receivers alike (as for `Node`).
        apply_metric_to_cache: Give the metric the final run's ActivationCache.
        direct_includes_mlps: Whether paths through MLPs count as direct (module docstring).
        verbose: Show progress bars.
        batch_size: Patched variants per forward pass (default: fit in `max_memory`).
        max_memory: Bytes of activations one forward pass may use (default 256 MiB on
            CPU, 2 GiB on accelerators).

    Returns:
        The metric's value, or for an IterNode a dict of PatchResults, as for `act_patch`.

    Raises:
        PatchingError: for any invalid node, input, cache or metric.

    >>> results = path_patch(model, clean, corrupted, IterNode("z"),
    ...                      Node("resid_post", model.cfg.n_layers - 1), metric)  # doctest: +SKIP
    """
    _tl.check_model(model)
    check_chunk_args(batch_size, max_memory)
    if not isinstance(direct_includes_mlps, bool):
        raise PatchingError(f"direct_includes_mlps must be True or False, got {direct_includes_mlps!r}.")
    tokens = _tl.to_tokens(model, orig_input)
    batch, seq_len = tokens.shape
    shape = _tl.model_shape(model)
    _check_specs(sender_nodes, receiver_nodes, seq_pos)
    positions = normalize_seq_pos(seq_pos)
    senders = resolve_spec(sender_nodes, shape, batch, seq_len, "sender_nodes", positions)
    receivers = resolve_spec(receiver_nodes, shape, batch, seq_len, "receiver_nodes", positions)
    variants, sweeps = _variants(senders, receivers, sender_nodes, receiver_nodes)
    metric = resolve_metric(patching_metric, tokens)
    reader = logit_reader(model, metric, tokens, shape, apply_metric_to_cache)
    fork = not direct_includes_mlps and _can_fork(model, shape, variants)
    freeze_mlps = not direct_includes_mlps and shape.has_mlps
    reaching = [_reaching(v, reader) for v in variants]
    live = [v for v in reaching if v is not None]

    sender_hooks = {s.hook_name for v in live for s in v.senders}
    receiver_sites = [r for v in live for r in v.receivers]
    plan = _PassOnePlan([], frozenset())
    if fork:
        orig_hooks = sender_hooks | {_input_base_hook(r) for r in receiver_sites}
        patched_hooks = {name for r in receiver_sites for name in _patched_hooks(r)}
    else:
        if live:
            plan = _pass_one_plan(shape, receiver_sites, freeze_mlps, _tl.can_start_late(model))
        orig_hooks = {name for _, name in plan.frozen} | sender_hooks
        patched_hooks = set()
    all_hooks = {s.hook_name for v in variants for s in v.senders} | orig_hooks | patched_hooks
    all_hooks |= {r.hook_name for v in variants for r in v.receivers}
    check_hooks_exist(model, all_hooks)

    with torch.no_grad(), _tl.model_flags(model, _tl.flags_for(all_hooks)):
        new = _source(model, new_cache, new_input, sender_hooks, tokens, "new_cache")
        residual_hooks = OrigResiduals.hook_names(shape.n_layers)
        orig = _source(model, orig_cache, orig_input, orig_hooks, tokens, "orig_cache", residual_hooks)
        chunk_args = (batch_size, max_memory, apply_metric_to_cache)
        with progress_bar(len(variants), "path_patch", verbose) as progress:
            residuals = OrigResiduals(model, tokens, orig.tensors)
            patcher = _PathPatcher(model, tokens, shape, metric, chunk_args, progress, residuals, reader)
            measured = iter(patcher.one_pass(live, orig, new) if fork else patcher.two_pass(live, orig, new, plan))
            unpatched = patcher.unpatched() if len(live) < len(variants) else None
            outputs = [unpatched if variant is None else next(measured) for variant in reaching]
            if progress is not None:
                progress.update(len(variants) - len(live))
    return assemble(sweeps, outputs, batch) if sweeps is not None else outputs[0]
