"""Where each node of the edge graph is read and written in a forward pass, and what a sender writes.

Senders: the embeddings at the residual stream entering layer 0, the heads of layer L at their
`hook_z`, MLP L at its `hook_mlp_out`. Receivers: the heads' q/k/v input hooks, `hook_mlp_in`
and the final residual stream. A head adds its z times its rows of W_O to the residual stream:
`head_writes` is the one place that turns head outputs into writes, for path patching, edge
attribution and circuit evaluation alike.
"""

import torch
from torch import Tensor

from .. import _tl
from ..errors import PatchingError
from .components import hook_name
from .graph import EdgeGraph

EMBEDDINGS = hook_name("resid_pre", 0)
"""The residual stream entering layer 0: the embeddings' output, and where EAP-IG interpolates."""

NO_HEAD_INPUTS = (
    "{what} per-head input hooks (use_split_qkv_input), and this model has none: its TransformerLens adapter "
    "does not give each head its own q/k/v input (bridges made by TransformerBridge.boot_native never do; "
    "boot_transformers gives them for the architectures that support it). act_patch, path_patch and attr_patch "
    "work without them."
)


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


class Wiring:
    """Where each node of the edge graph is read and written in a forward pass.

    `columns[hook]` lists each hook's
    receivers as columns of the graph's (sender, receiver) mask, and `upstream[hook]` how
    many senders (in graph order) write before it reads.
    """

    def __init__(self, graph: EdgeGraph):
        self.graph = graph
        receiver_column = {node: i for i, node in enumerate(graph.receivers)}
        sender_row = {node: i for i, node in enumerate(graph.senders)}
        self.sender_slots: dict[str, slice] = {EMBEDDINGS: slice(0, 1)}
        self.head_layers: dict[str, int] = {}
        self.mlp_inputs: set[str] = set()
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
                self.columns[hook_name("mlp_in", layer)] = [
                    receiver_column[next(n for n in graph.receivers if n.kind == "mlp" and n.layer == layer)]
                ]
                self.upstream[hook_name("mlp_in", layer)] = heads[0] if graph.parallel_attn_mlp else mlp
                self.mlp_inputs.add(hook_name("mlp_in", layer))
        final = hook_name("resid_post", graph.n_layers - 1)
        self.columns[final] = [len(graph.receivers) - 1]
        self.upstream[final] = len(graph.senders)

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


def check_mlp_inputs(model, graph: EdgeGraph, what: str) -> None:
    """Refuse a model whose blocks compute attention and MLP in parallel from one shared
    normalisation (Phi): its MLPs have no input hook of their own that fires, so an edge into
    an MLP can be neither edited nor scored. Parallel blocks with the MLP's own input hook
    (GPT-NeoX/Pythia) pass: their graph simply has no edge from a layer's heads to its MLP."""
    if not (graph.has_mlps and graph.parallel_attn_mlp):
        return
    name = hook_name("mlp_in", 0)
    fired = set()
    if name in _tl.hook_names(model):
        with _tl.model_flags(model, _tl.flags_for([name])):
            fired = _tl.hooks_that_fire(model, [name])
    if name not in fired:
        raise PatchingError(
            f"{what} edits or scores the edges into each MLP at its own input ({name} and its like), but this "
            "model computes attention and MLP in parallel from one "
            "shared normalisation (as Phi does), so no hook holds "
            "an MLP's input apart from the heads'. Use act_patch or path_patch of 'mlp_out' and 'z' instead."
        )
