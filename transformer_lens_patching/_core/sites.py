"""Resolve Nodes and IterNodes against a model and an input into concrete patch sites.

This is the first, pure part of planning: it checks every model-dependent rule (layer,
head and neuron ranges, position shapes and ranges) before any forward pass runs, and
turns each node into a `PatchSite` that knows its hook name and how to index its
activation.
"""

import itertools
from dataclasses import dataclass

import torch

from .._tl import ModelShape
from ..errors import PatchingError
from .components import MLP_COMPONENTS, Component
from .nodes import IterNode, Node, SeqPos


@dataclass(frozen=True, eq=False)
class PatchSite:
    """One resolved slice of one activation: a hook name, a head or neuron, and positions."""

    node: Node
    """The node this site came from, with its layer made non-negative."""
    hook_name: str
    unit: int | None
    """The head or neuron index, or None for the whole axis."""
    positions: torch.Tensor | None
    """(batch, k) positions per prompt, on the CPU, or None for every position."""
    device_positions: torch.Tensor | None
    """The same positions on the model's device, for indexing its activations."""

    @property
    def component(self) -> Component:
        """The component table entry."""
        return self.node.component

    @property
    def layer(self) -> int | None:
        """The (non-negative) layer."""
        return self.node.layer

    def index(self, row_start: int, batch: int, device: torch.device) -> tuple:
        """The index of this site within rows `row_start : row_start + batch` of an activation."""
        component = self.component
        n_axes = 1 + max(component.pos_axis, component.unit_axis or 0)
        index: list = [slice(None)] * n_axes
        if self.positions is None:
            index[0] = slice(row_start, row_start + batch)
        else:
            index[0] = torch.arange(row_start, row_start + batch, device=device).unsqueeze(1)
            index[component.pos_axis] = self.device_positions.to(device)
        if self.unit is not None:
            index[component.unit_axis] = self.unit
        return tuple(index)

    def with_positions_of(self, other: "PatchSite | None") -> "PatchSite":
        """The same site at the positions of `other` (None: every position)."""
        if other is None:
            return PatchSite(self.node, self.hook_name, self.unit, None, None)
        return PatchSite(self.node, self.hook_name, self.unit, other.positions, other.device_positions)


def _context(node, shape: ModelShape) -> str:
    return (
        f" (in {node!r}; the model has {shape.n_layers} layers, {shape.n_heads} heads"
        + (f", {shape.n_kv_heads} key/value heads" if shape.n_kv_heads != shape.n_heads else "")
        + f", d_mlp {shape.d_mlp})"
    )


def resolve_layer(node, layer: int, shape: ModelShape) -> int:
    """Check `layer` against the model and make it non-negative."""
    if not -shape.n_layers <= layer < shape.n_layers:
        raise PatchingError(
            f"Layer {layer} is out of range: expected 0 <= layer < {shape.n_layers}{_context(node, shape)}."
        )
    return layer % shape.n_layers


def _checked_unit_index(node, component: Component, index: int, shape: ModelShape) -> int:
    count = shape.unit_count(component.unit)
    word = {"head": "head", "kv_head": "key/value head", "neuron": "neuron"}[component.unit]
    if not 0 <= index < count:
        hint = ""
        if component.unit == "kv_head":
            hint = f" ({component.name!r} is indexed by key/value head on this grouped-query model)"
        raise PatchingError(
            f"{word.capitalize()} {index} is out of range for {component.name!r}: "
            f"expected 0 <= {component.unit} < {count}{hint}{_context(node, shape)}."
        )
    return index


def check_component_exists(component: Component, shape: ModelShape, node) -> None:
    """Refuse what a model's architecture does not have: MLP neurons (`pre`, `post`) in a
    mixture of experts, whose MLP hooks hold the experts' mix, d_model wide; the residual stream
    between attention and MLP (`resid_mid`) where the two run in parallel; an MLP input of its own
    (`mlp_in`) where the MLP reads the stream itself (post-LN blocks); heads where attention
    is multi-head latent attention, whose head activations TransformerLens does not split by head."""
    if component.unit == "neuron" and shape.n_experts:
        raise PatchingError(
            f"This model is a mixture of experts ({shape.n_experts} experts per layer): its "
            f"{component.hook_name(0).replace('blocks.0.', '')} hooks hold the experts' mix (d_model wide), not "
            f"MLP neurons, so {node!r} has no neurons to patch. Patch 'mlp_out' (each layer's whole expert "
            "output) instead."
        )
    if component.has_heads and shape.latent_attention:
        raise PatchingError(
            f"This model's attention is multi-head latent attention (DeepSeek's MLA): TransformerLens splits its "
            f"attention activations by d_head ({shape.d_head}) rather than by head, so the slices of "
            f"{component.hook_name(0).replace('blocks.0.', '')} are not its {shape.n_heads} heads and {node!r} would "
            "patch part of a head or of two. Patch 'attn_out' (each layer's whole attention output) instead."
        )
    if component.name == "mlp_in" and shape.norm_after_residual:
        raise PatchingError(
            f"This model's blocks normalise the residual stream after adding to it (post-LN, as OpenAI GPT's do), "
            f"so each MLP reads the stream itself: there is no MLP input apart from it, and {node!r} would patch "
            "the stream. Patch 'resid_mid' (the stream the MLP reads) instead."
        )
    if component.name == "resid_mid" and shape.parallel_attn_mlp:
        raise PatchingError(
            f"This model computes attention and MLP in parallel, both from the block's input, so there is no "
            f"residual stream between them and {node!r} does not exist. Patch 'resid_pre' or 'resid_post', or "
            "'attn_out' / 'mlp_out'."
        )


def resolve_positions(seq_pos: SeqPos, batch: int, seq_len: int, what: str = "seq_pos") -> torch.Tensor | None:
    """Turn a SeqPos into a (batch, k) tensor of non-negative positions, checking shape and range."""
    if seq_pos is None:
        return None
    positions = torch.tensor(seq_pos, dtype=torch.long)
    if positions.numel() == 0:
        raise PatchingError(
            f"{what} selects no positions (shape {tuple(positions.shape)}): give at least one position per prompt, "
            "or None for all positions."
        )
    if positions.ndim == 0:
        positions = positions.expand(batch).unsqueeze(1)
    elif positions.ndim == 1:
        if positions.shape[0] != batch:
            raise PatchingError(
                f"{what} has shape {tuple(positions.shape)}, but a 1-D {what} needs one position per prompt: "
                f"expected shape ({batch},)."
            )
        positions = positions.unsqueeze(1)
    elif positions.shape[0] != batch:
        raise PatchingError(
            f"{what} has shape {tuple(positions.shape)}, but a 2-D {what} needs one row per prompt: "
            f"expected shape ({batch}, k)."
        )
    if positions.numel() and not ((positions >= -seq_len) & (positions < seq_len)).all():
        bad = positions[(positions < -seq_len) | (positions >= seq_len)][0].item()
        raise PatchingError(f"{what} contains position {bad}, out of range for sequences of length {seq_len}.")
    return (positions % seq_len).contiguous()


def resolve_node(
    node: Node, shape: ModelShape, batch: int, seq_len: int, device: torch.device, seq_pos: SeqPos = None
) -> PatchSite:
    """Check `node` against the model and an input of `batch` prompts of `seq_len` tokens on
    `device`, and return its PatchSite.

    `seq_pos`, when given, replaces the node's own positions (path patching and sweeps).
    """
    component = node.component
    layer = None if node.layer is None else resolve_layer(node, node.layer, shape)
    unit = node.head if node.head is not None else node.neuron
    if unit is not None:
        unit = _checked_unit_index(node, component, unit, shape)
    if component.name in MLP_COMPONENTS and not shape.has_mlps:
        raise PatchingError(f"This model has no MLPs (attention-only), so {node!r} does not exist.")
    check_component_exists(component, shape, node)
    spec = node.seq_pos if seq_pos is None else seq_pos
    positions = resolve_positions(spec, batch, seq_len)
    resolved = Node(component.name, layer, head=node.head, neuron=node.neuron, seq_pos=node.seq_pos)
    device_positions = None if positions is None else positions.to(device)
    return PatchSite(resolved, component.hook_name(layer), unit, positions, device_positions)


@dataclass(frozen=True)
class Sweep:
    """The sites of one IterNode component, in the order of its result dims."""

    name: str
    dims: tuple[str, ...]
    coords: dict[str, tuple[int, ...]]
    sites: list[list[PatchSite]]
    """One list of sites per cell (each cell patches one node)."""

    @property
    def shape(self) -> tuple[int, ...]:
        """The sizes of `dims`."""
        return tuple(len(self.coords[dim]) for dim in self.dims)


def _restrict(
    values: tuple[int, ...] | None, count: int, what: str, node: IterNode, shape: ModelShape
) -> tuple[int, ...]:
    if values is None:
        return tuple(range(count))
    for value in values:
        if not 0 <= value < count:
            raise PatchingError(
                f"{what} contains {value}, out of range: expected 0 <= value < {count}{_context(node, shape)}."
            )
    return values


def resolve_sweep(node: IterNode, shape: ModelShape, tokens: torch.Tensor, seq_pos: SeqPos = None) -> list[Sweep]:
    """One Sweep per component of `node`; dims are (seq_pos, layer, head|kv_head|neuron) as applicable."""
    batch, seq_len = tokens.shape
    sweeps = []
    for component in node.components:
        check_component_exists(component, shape, node)
        dims, coords = [], {}
        if node.seq_pos == "each":
            dims.append("seq_pos")
            coords["seq_pos"] = tuple(range(seq_len))
        if component.layered:
            dims.append("layer")
            coords["layer"] = _restrict(node.layers, shape.n_layers, "layers", node, shape)
        if component.unit is not None:
            count = shape.unit_count(component.unit)
            dim = (
                "kv_head"
                if component.unit == "kv_head" and shape.n_kv_heads != shape.n_heads
                else ("head" if component.has_heads else "neuron")
            )
            restriction = node.neurons if component.unit == "neuron" else node.heads
            dims.append(dim)
            coords[dim] = _restrict(restriction, count, f"{dim}s", node, shape)
        if component.name in MLP_COMPONENTS and not shape.has_mlps:
            raise PatchingError(
                f"This model has no MLPs (attention-only), so IterNode({component.name!r}) has nothing to sweep."
            )
        cells = []
        resolved_positions: dict = {}
        for values in itertools.product(*(coords[dim] for dim in dims)):
            cell = dict(zip(dims, values))
            unit = next((cell[d] for d in ("head", "kv_head", "neuron") if d in cell), None)
            cell_pos = cell["seq_pos"] if "seq_pos" in cell else (None if node.seq_pos == "each" else node.seq_pos)
            spec = cell_pos if seq_pos is None else seq_pos
            if spec not in resolved_positions:
                positions = resolve_positions(spec, batch, seq_len)
                resolved_positions[spec] = (positions, None if positions is None else positions.to(tokens.device))
            layer = cell.get("layer")
            resolved = Node._valid(
                component.name,
                layer,
                unit if component.has_heads else None,
                unit if component.unit == "neuron" else None,
                None,
            )
            cells.append([PatchSite(resolved, component.hook_name(layer), unit, *resolved_positions[spec])])
        sweeps.append(Sweep(component.name, tuple(dims), coords, cells))
    return sweeps


def resolve_spec(
    spec, shape: ModelShape, tokens: torch.Tensor, what: str, seq_pos: SeqPos = None
) -> list[PatchSite] | list[Sweep]:
    """Resolve a Node, a list of Nodes (sites patched together) or an IterNode (sweeps)."""
    if isinstance(spec, IterNode):
        return resolve_sweep(spec, shape, tokens, seq_pos)
    nodes = [spec] if isinstance(spec, Node) else list(spec) if isinstance(spec, (list, tuple)) else None
    if not nodes or not all(isinstance(node, Node) for node in nodes):
        raise PatchingError(f"{what} must be a Node, a non-empty list of Nodes or an IterNode; got {spec!r}.")
    batch, seq_len = tokens.shape
    return [resolve_node(node, shape, batch, seq_len, tokens.device, seq_pos) for node in nodes]
