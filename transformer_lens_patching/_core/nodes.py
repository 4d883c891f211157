"""Node and IterNode: immutable descriptions of what to patch. They need no model."""

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..errors import PatchingError
from .components import COMPONENTS, Component, lookup

SeqPos = None | int | tuple[int, ...] | tuple[tuple[int, ...], ...]
"""A normalised position spec: all positions, one position for every prompt, one per
prompt (shape `(batch,)`), or several per prompt (shape `(batch, k)`)."""


def normalize_seq_pos(seq_pos) -> SeqPos:
    """Turn an int, list, numpy array or tensor (on any device) into an immutable SeqPos.

    >>> normalize_seq_pos(torch.tensor([3, 4]))
    (3, 4)
    >>> normalize_seq_pos([[1, 2], [3, 4]])
    ((1, 2), (3, 4))
    """
    if seq_pos is None:
        return None
    if isinstance(seq_pos, bool):
        raise PatchingError(f"seq_pos must be None, an int, or a 1-D or 2-D integer sequence; got {seq_pos!r}.")
    if isinstance(seq_pos, int):
        return seq_pos
    try:
        tensor = (
            torch.as_tensor(seq_pos).detach().cpu() if not isinstance(seq_pos, torch.Tensor) else seq_pos.detach().cpu()
        )
    except (TypeError, ValueError, RuntimeError) as error:
        raise PatchingError(
            f"seq_pos must be None, an int, or a 1-D or 2-D integer sequence; got {seq_pos!r}."
        ) from error
    if tensor.numel() == 0:
        tensor = tensor.long()
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.is_complex():
        raise PatchingError(f"seq_pos must hold integer positions, got dtype {tensor.dtype}.")
    if tensor.ndim == 0:
        return int(tensor)
    if tensor.ndim == 1:
        return tuple(int(p) for p in tensor)
    if tensor.ndim == 2:
        return tuple(tuple(int(p) for p in row) for row in tensor)
    raise PatchingError(
        f"seq_pos must be None, an int, a 1-D (batch,) or a 2-D (batch, k) sequence; got {tensor.ndim} dims "
        f"(shape {tuple(tensor.shape)})."
    )


def _check_index(value, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise PatchingError(f"{what} must be an int or None, got {value!r}.")


def _check_unit_allowed(component: Component, head, neuron) -> None:
    if head is not None and not component.has_heads:
        with_heads = [c.name for c in COMPONENTS.values() if c.has_heads]
        raise PatchingError(
            f"Component {component.name!r} has no head axis, so head={head} is not allowed. "
            f"Components with heads: {', '.join(with_heads)}."
        )
    if neuron is not None and component.unit != "neuron":
        raise PatchingError(
            f"Component {component.name!r} has no neuron axis, so neuron={neuron} is not allowed. "
            f"Components with neurons: pre, post."
        )


@dataclass(frozen=True, init=False)
class Node:
    """One activation, or a slice of it, to patch, send from or receive at.

    Args:
        node_name: A short component name (`"z"`, `"resid_pre"`, ...) or a full hook name
            (`"blocks.11.attn.hook_z"`, whose layer is then read from the name). The node
            keeps the short name as `name` (and `component_name`).
        layer: The layer (negative counts from the end). Required for per-layer components.
        head: One head, for components with a head axis. For `k`, `v`, `k_input` and
            `v_input` of grouped-query models this is a key/value head.
        neuron: One MLP neuron, for `pre` and `post`.
        seq_pos: None (all positions), an int (the same position in every prompt), a
            `(batch,)` sequence (one position per prompt) or a `(batch, k)` one.

    >>> Node("z", 9, head=6)
    Node('z', 9, head=6)
    >>> Node("blocks.11.hook_resid_post").layer
    11
    """

    name: str
    layer: int | None = None
    head: int | None = None
    neuron: int | None = None
    seq_pos: SeqPos = None

    def __init__(
        self, node_name: str, layer: int | None = None, head: int | None = None, neuron: int | None = None, seq_pos=None
    ):
        component, name_layer = lookup(node_name)
        _check_index(layer, "layer")
        _check_index(head, "head")
        _check_index(neuron, "neuron")
        if name_layer is not None:
            if layer is not None and layer != name_layer:
                raise PatchingError(f"Hook name {node_name!r} is at layer {name_layer}, but layer={layer} was given.")
            layer = name_layer
        if component.layered and layer is None:
            raise PatchingError(f"Component {component.name!r} needs a layer, e.g. Node({component.name!r}, 0).")
        if not component.layered and layer is not None:
            raise PatchingError(f"Component {component.name!r} is not per layer, so layer={layer} is not allowed.")
        _check_unit_allowed(component, head, neuron)
        _freeze(self, name=component.name, layer=layer, head=head, neuron=neuron, seq_pos=normalize_seq_pos(seq_pos))

    @classmethod
    def _valid(cls, name: str, layer: int | None, head: int | None, neuron: int | None, seq_pos: SeqPos) -> "Node":
        """A Node from values already checked (a short component name, a normalised seq_pos):
        sweeps make one per cell, tens of thousands for every neuron."""
        node = object.__new__(cls)
        _freeze(node, name=name, layer=layer, head=head, neuron=neuron, seq_pos=seq_pos)
        return node

    @property
    def component(self) -> Component:
        """The component table entry of this node."""
        return COMPONENTS[self.name]

    @property
    def component_name(self) -> str:
        """The short component name (the prior-art spelling of `name`)."""
        return self.name

    @property
    def activation_name(self) -> str:
        """The full hook name, e.g. `blocks.9.attn.hook_z` (needs a non-negative layer)."""
        if self.layer is not None and self.layer < 0:
            raise PatchingError(f"{self!r} has a negative layer; its hook name depends on the model.")
        return self.component.hook_name(self.layer)

    def __repr__(self) -> str:
        parts = [repr(self.name)]
        for key in ("layer", "head", "neuron", "seq_pos"):
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{key}={value}" if key != "layer" else str(value))
        return f"Node({', '.join(parts)})"


def _int_tuple(values, what: str) -> tuple[int, ...] | None:
    if values is None:
        return None
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, Iterable):
        raise PatchingError(f"{what} must be an int or a sequence of ints, got {values!r}.")
    out = tuple(values)
    for value in out:
        _check_index(value, what)
    if not out:
        raise PatchingError(f"{what} must not be empty.")
    if len(set(out)) != len(out):
        raise PatchingError(f"{what} has repeated entries: {list(out)}.")
    return out


@dataclass(frozen=True, init=False)
class IterNode:
    """A sweep: patch each layer (and head, or neuron) of each component, one at a time.

    Args:
        node_names: One component name or a list of them (`"z"`, `["q", "k", "v"]`); the
            sweep keeps them as `names` (and `component_names`).
        seq_pos: None (all positions), `"each"` (also iterate over every position), or a
            fixed position spec as for `Node`.
        layers: Restrict the sweep to these layers (default: all).
        heads: Restrict head components to these heads (default: all).
        neurons: Restrict `pre`/`post` to these neurons (default: all).

    >>> IterNode(["q", "k"], seq_pos="each")
    IterNode(['q', 'k'], seq_pos='each')
    """

    names: tuple[str, ...]
    seq_pos: SeqPos | Literal["each"] = None
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    neurons: tuple[int, ...] | None = None
    _components: tuple[Component, ...] = field(default=(), repr=False, compare=False)

    def __init__(self, node_names, seq_pos=None, layers=None, heads=None, neurons=None):
        names = node_names
        raw = [names] if isinstance(names, str) else list(names) if isinstance(names, Iterable) else None
        if not raw:
            raise PatchingError(f"IterNode needs a component name or a non-empty list of them, got {names!r}.")
        components = []
        for name in raw:
            component, layer = lookup(name)
            if layer is not None:
                raise PatchingError(
                    f"IterNode takes component names, not a hook name with a layer ({name!r}); "
                    f"use IterNode({component.name!r}, layers=[{layer}])."
                )
            if component in components:
                raise PatchingError(f"IterNode lists component {component.name!r} twice.")
            components.append(component)
        if isinstance(seq_pos, str) and seq_pos != "each":
            raise PatchingError(f"IterNode seq_pos must be None, 'each' or a position spec; got {seq_pos!r}.")
        heads_t = _int_tuple(heads, "heads")
        neurons_t = _int_tuple(neurons, "neurons")
        if heads_t is not None and not any(c.has_heads for c in components):
            raise PatchingError(f"heads= restricts head components, but none of {raw} has heads.")
        if neurons_t is not None and not any(c.unit == "neuron" for c in components):
            raise PatchingError(f"neurons= restricts 'pre'/'post', but none of {raw} has neurons.")
        _freeze(
            self,
            names=tuple(c.name for c in components),
            seq_pos=seq_pos if seq_pos == "each" else normalize_seq_pos(seq_pos),
            layers=_int_tuple(layers, "layers"),
            heads=heads_t,
            neurons=neurons_t,
            _components=tuple(components),
        )

    @property
    def components(self) -> tuple[Component, ...]:
        """The component table entries swept over."""
        return self._components

    @property
    def component_names(self) -> list[str]:
        """The short component names (the prior-art spelling of `names`)."""
        return list(self.names)

    def __repr__(self) -> str:
        parts = [repr(list(self.names)) if len(self.names) > 1 else repr(self.names[0])]
        for key in ("seq_pos", "layers", "heads", "neurons"):
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{key}={_compact(value)}")
        return f"IterNode({', '.join(parts)})"


def _compact(value) -> str:
    """A restriction as `range(a, b)` when it is one, else as given."""
    if (
        isinstance(value, tuple)
        and len(value) > 2
        and all(isinstance(v, int) for v in value)
        and value == tuple(range(value[0], value[-1] + 1))
    ):
        return f"range({value[0]}, {value[-1] + 1})"
    return repr(value)


def _freeze(instance, **fields) -> None:
    """Set the fields of a frozen dataclass from its own `__init__`."""
    for name, value in fields.items():
        object.__setattr__(instance, name, value)
