"""The component table: every activation a Node can name, and what it can be indexed by.

Each component maps to one TransformerLens hook point. The table says exactly which
components have a head axis (and whether it counts query heads or key/value heads),
which have a neuron axis, where the (query) position axis sits, and where each component
reads from or writes to the residual stream, so that path patching can tell which
senders reach which receivers. Nothing here needs a model.
"""

import difflib
import re
from dataclasses import dataclass
from typing import Literal

from ..errors import PatchingError

Unit = Literal["head", "kv_head", "neuron"]
"""What a `head=` or `neuron=` index counts in a component."""


@dataclass(frozen=True)
class Component:
    """One activation a Node can name."""

    name: str
    """Short name, as accepted by TransformerLens' `get_act_name` (`"z"`, `"resid_pre"`)."""
    hook: str
    """Hook-name template; `{layer}` is replaced by the layer number."""
    unit: Unit | None = None
    """What `head=`/`neuron=` indexes, or None where neither is allowed."""
    unit_axis: int | None = None
    """Axis of that unit in the activation (axis 0 is the batch)."""
    pos_axis: int = 1
    """Axis of the sequence position (the query position for attention patterns)."""
    read_offset: int | None = None
    """Where a receiver reads the residual stream: point `2 * layer + read_offset`."""
    write_offset: int | None = None
    """Where a sender writes to the residual stream: point `2 * layer + write_offset`."""

    @property
    def has_heads(self) -> bool:
        """Whether the component has a head axis (query heads or key/value heads)."""
        return self.unit in ("head", "kv_head")

    @property
    def layered(self) -> bool:
        """Whether the component exists once per layer."""
        return "{layer}" in self.hook

    def hook_name(self, layer: int | None) -> str:
        """The full hook name at `layer`."""
        return self.hook.format(layer=layer) if self.layered else self.hook


def _head(name: str, hook: str, unit: Unit = "head", **kw) -> Component:
    return Component(name, hook, unit=unit, unit_axis=2, **kw)


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in [
        Component("embed", "hook_embed"),
        Component("pos_embed", "hook_pos_embed"),
        Component("resid_pre", "blocks.{layer}.hook_resid_pre", read_offset=0, write_offset=0),
        Component("resid_mid", "blocks.{layer}.hook_resid_mid", read_offset=1, write_offset=1),
        Component("resid_post", "blocks.{layer}.hook_resid_post", read_offset=2, write_offset=2),
        Component("attn_out", "blocks.{layer}.hook_attn_out", write_offset=1),
        Component("mlp_out", "blocks.{layer}.hook_mlp_out", write_offset=2),
        Component("mlp_in", "blocks.{layer}.hook_mlp_in", read_offset=1),
        _head("q", "blocks.{layer}.attn.hook_q", read_offset=0),
        _head("k", "blocks.{layer}.attn.hook_k", "kv_head", read_offset=0),
        _head("v", "blocks.{layer}.attn.hook_v", "kv_head", read_offset=0),
        _head("z", "blocks.{layer}.attn.hook_z", read_offset=0, write_offset=1),
        _head("result", "blocks.{layer}.attn.hook_result"),
        Component("pattern", "blocks.{layer}.attn.hook_pattern", "head", 1, pos_axis=2, read_offset=0),
        Component("attn_scores", "blocks.{layer}.attn.hook_attn_scores", "head", 1, pos_axis=2),
        _head("q_input", "blocks.{layer}.hook_q_input", read_offset=0),
        _head("k_input", "blocks.{layer}.hook_k_input", "kv_head", read_offset=0),
        _head("v_input", "blocks.{layer}.hook_v_input", "kv_head", read_offset=0),
        Component("pre", "blocks.{layer}.mlp.hook_pre", "neuron", 2, read_offset=1),
        Component("post", "blocks.{layer}.mlp.hook_post", "neuron", 2, write_offset=2),
    ]
}

ALIASES: dict[str, str] = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "query": "q",
    "key": "k",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_post": "post",
}
"""Other short names TransformerLens' `get_act_name` accepts for the same activations."""

_EXTRA_FULL_SUFFIXES: dict[str, str] = {
    "hook_in": "resid_pre",
    "hook_out": "resid_post",
    "attn.hook_q_input": "q_input",
    "attn.hook_k_input": "k_input",
    "attn.hook_v_input": "v_input",
}
"""TransformerLens 4's canonical spellings of hooks the table names differently."""


def normed_mlp_input(layer: int) -> str:
    """A bridge's hook of MLP `layer`'s input after its norm (`mlp.hook_in`): the receiver hook of an
    MLP whose own input has no hook (see `wiring.Wiring`). Not a node: it is not the residual stream."""
    return f"blocks.{layer}.mlp.hook_in"


def mlp_hook(part: str, layer: int) -> str:
    """MLP `layer`'s hook `mlp.hook_{part}`, for the MLP's internals that are not nodes (`hook_name`
    builds the nodes' hooks): a gated MLP's linear half (`pre_linear`), SoLU's normalised activation
    (`mid`). RelP's rules read them.

    >>> mlp_hook("pre_linear", 3)
    'blocks.3.mlp.hook_pre_linear'
    """
    return f"blocks.{layer}.mlp.hook_{part}"


MLP_COMPONENTS = ("mlp_in", "pre", "post", "mlp_out")
"""Components that attention-only models do not have."""

SENDERS = ("z", "attn_out", "post", "mlp_out", "resid_pre", "resid_mid", "resid_post")
"""Components path patching accepts as senders."""
RECEIVERS = (
    "q",
    "k",
    "v",
    "q_input",
    "k_input",
    "v_input",
    "pattern",
    "z",
    "resid_pre",
    "resid_mid",
    "resid_post",
    "pre",
)
"""Components path patching accepts as receivers."""


def hook_name(component: str, layer: int | None = None) -> str:
    """The full hook name of a component at a layer.

    >>> hook_name("resid_post", 11)
    'blocks.11.hook_resid_post'
    """
    return COMPONENTS[component].hook_name(layer)


def residual_hooks(n_layers: int) -> list[str]:
    """The hooks holding the residual stream entering each layer, then the final residual stream.

    >>> residual_hooks(2)
    ['blocks.0.hook_resid_pre', 'blocks.1.hook_resid_pre', 'blocks.1.hook_resid_post']
    """
    return [hook_name("resid_pre", layer) for layer in range(n_layers)] + [hook_name("resid_post", n_layers - 1)]


_FULL_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def lookup(name: str) -> tuple[Component, int | None]:
    """Find the component a short or full hook name means, and the layer a full name carries.

    >>> lookup("z")[0].hook
    'blocks.{layer}.attn.hook_z'
    >>> lookup("blocks.11.attn.hook_z")[1]
    11
    """
    if not isinstance(name, str):
        raise PatchingError(f"A component name must be a str, got {type(name).__name__}.")
    short = ALIASES.get(name, name)
    if short in COMPONENTS:
        return COMPONENTS[short], None
    for component in COMPONENTS.values():
        if not component.layered and name == component.hook:
            return component, None
    match = _FULL_NAME.match(name)
    if match:
        layer, suffix = int(match.group(1)), match.group(2)
        for component in COMPONENTS.values():
            if component.layered and component.hook.split("}.", 1)[1] == suffix:
                return component, layer
        if suffix in _EXTRA_FULL_SUFFIXES:
            return COMPONENTS[_EXTRA_FULL_SUFFIXES[suffix]], layer
        known = [c.hook.split("}.", 1)[1] for c in COMPONENTS.values() if c.layered]
        raise PatchingError(
            f"Unknown hook name {name!r}: no component ends in {suffix!r}.{_suggest(suffix, known)} "
            f"Valid suffixes: {', '.join(known)}."
        )
    valid = list(COMPONENTS) + list(ALIASES)
    raise PatchingError(
        f"Unknown component {name!r}.{_suggest(name, valid)} "
        f"Valid components: {', '.join(COMPONENTS)} (or a full hook name such as "
        f"'blocks.0.attn.hook_z')."
    )
