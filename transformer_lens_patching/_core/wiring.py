"""Where each node of the edge graph is read and written in a forward pass, and what a sender writes.

Senders: the embeddings at the residual stream entering layer 0, the heads of layer L at their
`hook_z`, MLP L at its `hook_mlp_out`. Receivers: the heads' q/k/v input hooks, `hook_mlp_in`
and the final residual stream. A head adds its z times its rows of W_O to the residual stream:
`head_writes` is the one place that turns head outputs into writes, for path patching, edge
attribution and circuit evaluation alike. Where the model normalises each attention output
before adding it (`ln1_post`: Gemma-2, Gemma-3, OLMo-2), the layer's write is that norm of its
heads' writes summed: `SenderWrites` says how it moves when one head's output moves.
"""

import functools

import torch
from torch import Tensor

from .. import _tl
from ..errors import PatchingError
from .components import hook_name, normed_mlp_input
from .graph import EdgeGraph

ALL = slice(None)

EMBEDDINGS = hook_name("resid_pre", 0)
"""The residual stream entering layer 0: the embeddings' output, and where EAP-IG interpolates."""

NO_HEAD_INPUTS = (
    "{what} per-head input hooks (use_split_qkv_input), and this model has none: its TransformerLens adapter "
    "does not give each head its own q/k/v input (bridges made by TransformerBridge.boot_native never do; "
    "boot_transformers gives them for the architectures that support it). act_patch, path_patch and attr_patch "
    "work without them."
)


def check_head_inputs(model, what: str) -> None:
    """Refuse a model without per-head q/k/v input hooks that copy the residual stream, which `what`
    ("attr_edges reads every head's q/k/v input, which needs") edits or reads."""
    if _tl.supports_split_qkv_input(model):
        return
    if not _tl.split_inputs_copy_the_stream(model):
        raise PatchingError(_tl.SPLIT_INPUTS_NOT_COPIES)
    raise PatchingError(NO_HEAD_INPUTS.format(what=what))


def head_writes(z: Tensor, w_o: Tensor, *, summed: bool = False) -> Tensor:
    """(batch, pos, head, d_model): what each head adds to the residual stream, from its output
    `z` (batch, pos, head, d_head) and its rows of W_O (head, d_head, d_model); with `summed`, the
    heads' writes together, (batch, pos, d_model), in one product (no per-head tensor).

    >>> head_writes(torch.ones(1, 2, 3, 4), torch.ones(3, 4, 5)).shape
    torch.Size([1, 2, 3, 5])
    >>> head_writes(torch.ones(1, 2, 3, 4), torch.ones(3, 4, 5), summed=True)[0, 0, 0]
    tensor(12.)
    """
    return torch.einsum("bphe,hed->bpd" if summed else "bphe,hed->bphd", z, w_o.to(z))


class SenderWrites:
    """What a sender's change adds to the residual stream, to first order: a head's change times its
    rows of W_O, a neuron's times its row of W_out; where the model normalises each attention
    (`ln1_post`) or MLP output (`ln2_post`) before adding it, that through the Jacobian of the norm
    at the layer's output in the run (`live`, its z or neuron activations). Weights are read once.

    >>> writes = SenderWrites(model)
    >>> z = torch.zeros(1, 2, model.cfg.n_heads, model.cfg.d_head)
    >>> writes.heads(0, z, z).shape == (1, 2, model.cfg.n_heads, model.cfg.d_model)
    True
    """

    def __init__(self, model):
        self._model = model
        norms = _tl.post_norms(model)
        self.attention_normalised, self.mlp_normalised = "ln1_post" in norms, "ln2_post" in norms
        self.normalised = self.attention_normalised or self.mlp_normalised

    @functools.cached_property
    def w_o(self) -> Tensor:
        return _tl.w_o(self._model)

    @functools.cached_property
    def w_out(self) -> Tensor:
        return _tl.w_out(self._model)

    def heads(self, layer: int, live: Tensor | None, change: Tensor, units: slice = ALL, summed: bool = False):
        """(batch, pos, head, d_model), or summed over the heads (batch, pos, d_model): the change of
        layer `layer`'s write when the heads `units` move by `change` (batch, pos, head, d_head; each
        head alone unless `summed`) from the layer's output `live` (all its heads' z)."""
        w_o = self.w_o[layer, units]
        writes = head_writes(change[:, :, units], w_o, summed=summed)
        if not self.attention_normalised:
            return writes
        before_norm = head_writes(live, self.w_o[layer], summed=True) + _tl.b_o(self._model)[layer].to(live)
        return _through_norm(_tl.block_norm(self._model, layer, "ln1_post"), before_norm, writes, summed)

    def neurons(self, layer: int, live: Tensor | None, change: Tensor, units: slice = ALL) -> Tensor:
        """(batch, pos, d_model): the change of MLP `layer`'s write when its neurons `units` move by
        `change` (batch, pos, d_mlp) from the neuron activations `live`."""
        writes = change[..., units] @ self.w_out[layer, units].to(change)
        if not self.mlp_normalised:
            return writes
        before_norm = live @ self.w_out[layer].to(live) + _tl.b_out(self._model)[layer].to(live)
        return _through_norm(_tl.block_norm(self._model, layer, "ln2_post"), before_norm, writes, True)


def _through_norm(norm, before_norm: Tensor, writes: Tensor, summed: bool) -> Tensor:
    """`writes` (batch, pos, d_model), or one per unit (batch, pos, unit, d_model) unless `summed`,
    through the Jacobian of `norm` at `before_norm` (batch, pos, d_model): forward-mode products."""
    if summed:
        writes = writes.unsqueeze(2)
    batch, seq_len, units, d_model = writes.shape
    device = next(norm.parameters(), before_norm).device
    primal = before_norm.repeat(units, 1, 1)  # a copy per unit: the norm may write in place
    tangent = writes.permute(2, 0, 1, 3).reshape(units * batch, seq_len, d_model).contiguous()
    _, moved = torch.func.jvp(norm, (primal.to(device),), (tangent.to(device),))
    moved = moved.reshape(units, batch, seq_len, d_model).permute(1, 2, 0, 3).to(writes.device)
    return moved.squeeze(2) if summed else moved


class Wiring:
    """Where each node of the edge graph is read and written in a forward pass.

    `columns[hook]` lists each hook's
    receivers as columns of the graph's (sender, receiver) mask, and `upstream[hook]` how
    many senders (in graph order) write before it reads. With `shared_norm` (parallel blocks
    whose attention and MLP read one norm, `ln1`, of the layer's input, as Phi, Falcon and Cohere
    do), an MLP's own input has no hook, only its norm: the MLP's receiver hook is `mlp.hook_in`,
    `normed_inputs` maps it to its layer, and `residual_of` names the hook of the residual stream
    the norm reads. `Wiring.of(model, ...)` finds which by running the model on one token.
    """

    def __init__(self, graph: EdgeGraph, *, shared_norm: bool = False):
        self.graph = graph
        receiver_column = {node: i for i, node in enumerate(graph.receivers)}
        sender_row = {node: i for i, node in enumerate(graph.senders)}
        self.sender_slots: dict[str, slice] = {EMBEDDINGS: slice(0, 1)}
        self.head_layers: dict[str, int] = {}
        self.mlp_inputs: set[str] = set()
        self.normed_inputs: dict[str, int] = {}
        self.columns: dict[str, list[int]] = {}
        self.upstream: dict[str, int] = {}
        for layer in range(graph.n_layers):
            heads = [sender_row[node] for node in graph.senders if node.kind == "head" and node.layer == layer]
            self.sender_slots[hook_name("z", layer)] = slice(heads[0], heads[-1] + 1)
            self.head_layers[hook_name("z", layer)] = layer
            for part in ("q", "k", "v"):
                name = hook_name(f"{part}_input", layer)
                self.columns[name] = [
                    receiver_column[node]
                    for node in graph.receivers
                    if node.kind == "head" and node.layer == layer and node.input == part
                ]
                self.upstream[name] = heads[0]
            if graph.has_mlps:
                mlp = sender_row[next(n for n in graph.senders if n.kind == "mlp" and n.layer == layer)]
                self.sender_slots[hook_name("mlp_out", layer)] = slice(mlp, mlp + 1)
                name = normed_mlp_input(layer) if shared_norm else hook_name("mlp_in", layer)
                self.columns[name] = [
                    receiver_column[next(n for n in graph.receivers if n.kind == "mlp" and n.layer == layer)]
                ]
                self.upstream[name] = heads[0] if graph.parallel_attn_mlp else mlp
                self.mlp_inputs.add(name)
                if shared_norm:
                    self.normed_inputs[name] = layer
        final = hook_name("resid_post", graph.n_layers - 1)
        self.columns[final] = [len(graph.receivers) - 1]
        self.upstream[final] = len(graph.senders)

    @classmethod
    def of(cls, model, graph: EdgeGraph, what: str) -> "Wiring":
        """The wiring of `model`'s graph (whose per-head inputs `check_head_inputs` has checked), its
        final and MLP input hooks checked to fire in a forward pass of one token: `what` (the method)
        is refused with a `PatchingError` naming the hook the model never calls."""
        final = hook_name("resid_post", graph.n_layers - 1)
        own_mlp_input, normed_input = hook_name("mlp_in", 0), normed_mlp_input(0)
        candidates = [final] + ([own_mlp_input, normed_input] if graph.has_mlps else [])
        names = [name for name in candidates if name in _tl.hook_names(model)]
        with _tl.model_flags(model, _tl.flags_for(names)):
            fired = _tl.hooks_that_fire(model, names)
        if final not in fired:
            raise PatchingError(
                f"{what} reads the final residual stream (the logits' input) at {final}, which this model's "
                "TransformerLens adapter lists but never calls (its blocks return their output without that hook). "
                "act_patch of the other nodes and attr_patch work without it."
            )
        shared_norm = graph.has_mlps and own_mlp_input not in fired
        if shared_norm and not (graph.parallel_attn_mlp and normed_input in fired):
            raise PatchingError(
                f"{what} edits or scores the edges into each MLP at its own input, but this model's TransformerLens "
                f"adapter never calls {own_mlp_input}, and its MLPs do not read their layer's input through the norm "
                "its attention shares. Use act_patch or path_patch of 'mlp_out' and 'z' instead."
            )
        return cls(graph, shared_norm=shared_norm)

    def residual_of(self, receiver_hook: str) -> str:
        """The hook of the residual stream whose norm a `normed_inputs` hook holds: its layer's input."""
        return hook_name("resid_pre", self.normed_inputs[receiver_hook])

    def attention_layers_before(self, receiver_hook: str) -> list[int]:
        """The layers whose heads all write before `receiver_hook` reads: their attention output
        biases are part of its input whatever the circuit."""
        upstream = self.upstream[receiver_hook]
        return [layer for name, layer in self.head_layers.items() if self.sender_slots[name].stop <= upstream]

    def edited_hooks(self, removed: Tensor) -> list[str]:
        """The receiver hooks whose input loses a term under the `removed` mask."""
        return [name for name, columns in self.columns.items() if removed[:, : self.upstream[name], columns].any()]

    @property
    def sender_hooks(self) -> list[str]:
        """Where the senders' outputs are read: the embeddings, then each layer's heads and MLP."""
        return list(self.sender_slots)

    @property
    def receiver_hooks(self) -> list[str]:
        """Where the receivers' inputs are read: each layer's q/k/v (and MLP) inputs, then the final stream."""
        return list(self.columns)


def residual_gradients(model, wiring: Wiring, receiver_hook: str, residual: Tensor, gradient: Tensor) -> Tensor:
    """The gradient at the MLP's own copy of the residual stream `residual` (batch, pos,
    d_model), from the `gradient` at its norm's output, the `normed_inputs` hook `receiver_hook`."""
    norm = _tl.block_norm(model, wiring.normed_inputs[receiver_hook], "ln1")
    _, pull_back = torch.func.vjp(norm, residual.to(gradient))
    (pulled,) = pull_back(gradient)
    return pulled


def normed_residual(model, wiring: Wiring, receiver_hook: str, residual: Tensor) -> Tensor:
    """What the `normed_inputs` hook `receiver_hook` holds when the MLP's own input is `residual`:
    the model's own norm of it."""
    return _tl.block_norm(model, wiring.normed_inputs[receiver_hook], "ln1")(residual)
