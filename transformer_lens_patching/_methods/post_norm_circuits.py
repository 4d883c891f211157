"""One circuit's steps in one pass on a model that normalises each attention output before adding it
to the residual stream (Gemma-2, Gemma-3, OLMo-2: `ln1_post`).

There a layer's heads do not write to the stream one by one: the layer writes `N(a)`, the norm of
`a = b_O + sum_h z_h W_O^h`. An edge from head h to a receiver r is removed by giving r the stream
in which that norm saw h's ablated output and every other head's output in this pass: r reads
`N(a - sum over its removed heads h of (z_h - z'_h) W_O^h)` from each layer (z' the ablated
output), with the norm's own scale for that mix. A single removed edge is then exactly path
patching that edge through the residual stream only, which lets the model compute the layer with
the other heads frozen. The MLPs' outputs (`hook_mlp_out`, after their own norm) and the
embeddings are added as they are: live where the edge is kept, ablated where it is removed.
"""

import functools

import torch
from torch import Tensor

from .. import _tl
from .._core.components import hook_name
from .._core.program import PatchProgram
from .._core.sources import ActivationSource
from .._core.wiring import Wiring, head_writes


class PostNormCircuitRows:
    """One circuit's steps in one pass. Each sender's hook keeps its change (output in this pass
    minus ablated output; a head's as its write before the norm) and its ablated output; each
    edited receiver hook then rebuilds its input from them: the embeddings' and MLPs' ablated
    outputs plus the kept ones' changes, and each attention layer's norm of its ablated output
    plus the kept heads' changes. Built from the ablated side, a receiver whose edges are all
    removed reads exactly its ablated input; where no sender's output changed at all (an
    ablation from an identical run), the receiver keeps its live input, bit for bit."""

    def __init__(self, model, wiring: Wiring, removed: Tensor, ablated: ActivationSource, w_o: Tensor, b_o: Tensor):
        self.model, self.wiring, self.ablated, self.w_o, self.b_o = model, wiring, ablated, w_o, b_o
        self.kept: dict[str, Tensor] = {}
        """Each edited receiver hook's (pos, upstream sender, receiver) mask of kept edges, as
        weights on W_O's device."""
        for name, columns in wiring.columns.items():
            upstream = removed[:, : wiring.upstream[name], columns]
            if upstream.any():
                self.kept[name] = _tl.moved((~upstream).float(), w_o.device, w_o.dtype)
        self.changes: dict[int, Tensor] = {}
        """Each sender slot's start: its change, (batch, pos, d_model), or (batch, pos, head,
        d_model) for a layer's heads (their writes before the norm)."""
        self.ablated_outputs: dict[int, Tensor] = {}
        """Each sender slot's start: its ablated output, (batch, pos, d_model); for a layer's
        heads the attention output before the norm, the output bias included."""
        self._layer_outputs: dict[tuple[int, bool], Tensor] = {}
        """(layer, all heads kept): a layer's normalised output when every receiver reads the same mix."""

    def add_to(self, program: PatchProgram, row_start: int) -> None:
        if not self.kept:
            return
        for name, slots in self.wiring.sender_slots.items():
            program.visit(name, row_start, functools.partial(self._keep, name, slots))
        for name in self.kept:
            program.visit(name, row_start, functools.partial(self._rebuild, name))

    def _keep(self, name: str, slots: slice, live: Tensor) -> None:
        ablated = self.ablated.tensor_like(name, live).to(live)
        device = self.w_o.device
        if name in self.wiring.head_layers:
            layer = self.wiring.head_layers[name]
            w_o = self.w_o[layer].to(live)
            self.changes[slots.start] = head_writes(live - ablated, w_o).to(device)
            before_norm = head_writes(ablated, w_o, summed=True) + self.b_o[layer].to(live)
            self.ablated_outputs[slots.start] = before_norm.to(device)
        else:
            self.changes[slots.start] = (live - ablated).to(device)
            self.ablated_outputs[slots.start] = ablated.to(device)

    def _rebuild(self, name: str, receiver_input: Tensor) -> None:
        kept = self.kept[name]
        upstream = self.wiring.upstream[name]
        first = next(iter(self.changes.values()))
        wide = _tl.summing_dtype(first.dtype)
        total = torch.zeros(kept.shape[-1], *first.shape[:2], first.shape[-1], dtype=wide, device=first.device)
        unchanged = torch.ones(*first.shape[:2], first.shape[-1], dtype=torch.bool, device=first.device)
        for sender_hook, slots in self.wiring.sender_slots.items():
            if slots.stop > upstream:
                continue
            change, ablated = self.changes[slots.start], self.ablated_outputs[slots.start]
            weights = kept[:, slots].to(change)
            if sender_hook in self.wiring.head_layers:
                layer = self.wiring.head_layers[sender_hook]
                if weights.any() and not weights.all():
                    mixed = ablated + torch.einsum("psr,bpsd->rbpd", weights, change)
                    total += self._normed(layer, mixed).to(wide)
                else:  # every receiver here reads the same mix: all heads kept, or none
                    total += self._normed_once(layer, bool(weights.any())).to(wide)
                unchanged &= (change == 0).all(2)
            else:
                total += ablated.to(wide) + torch.einsum("pr,bpd->rbpd", weights[:, 0], change).to(wide)
                unchanged &= change == 0
        rebuilt = total.permute(1, 2, 0, 3).to(receiver_input)
        if receiver_input.ndim == 3:
            rebuilt = rebuilt.squeeze(2)
        else:
            unchanged = unchanged.unsqueeze(2)
        receiver_input.copy_(torch.where(unchanged.to(receiver_input.device), receiver_input, rebuilt))

    def _normed_once(self, layer: int, kept: bool) -> Tensor:
        """(batch, pos, d_model): layer `layer`'s attention output normalised with every head kept
        (its live output, rebuilt) or none (its ablated output), computed once per pass."""
        key = (layer, kept)
        if key not in self._layer_outputs:
            slot = self.wiring.sender_slots[hook_name("z", layer)].start
            before_norm = self.ablated_outputs[slot]
            if kept:
                before_norm = before_norm + self.changes[slot].sum(2)
            self._layer_outputs[key] = self._normed(layer, before_norm.unsqueeze(0))[0]
        return self._layer_outputs[key]

    def _normed(self, layer: int, before_norm: Tensor) -> Tensor:
        """(receiver, batch, pos, d_model): layer `layer`'s attention output normalised by the
        model's own `ln1_post`, one mix of head outputs per receiver."""
        norm = _tl.block_norm(self.model, layer, "ln1_post")
        device = next(norm.parameters(), before_norm).device
        receivers, batch, seq_len, d_model = before_norm.shape
        flat = before_norm.reshape(receivers * batch, seq_len, d_model).to(device)
        return norm(flat).reshape(before_norm.shape).to(before_norm.device)
