"""The TransformerLens plugin: patching methods on models, Node indexing on caches.

`PatchingMixin` holds the methods TransformerLens models gain (`model.act_patch(...)`,
`model.path_patch(...)`, `model.attr_patch(...)`, `model.confirm(...)`, `model.attr_edges(...)`,
`model.attr_path_patch(...)`, `model.confirm_paths(...)`, `model.evaluate_circuit(...)`,
`model.faithfulness_curve(...)`, `model.mib_faithfulness(...)`, `model.exact_edge_scores(...)`,
`model.learn_edge_masks(...)`, `model.confirm_edges(...)`, `model.plan_act_patch(...)`,
`model.plan_path_patch(...)`, `model.plan_circuit_evaluation(...)`);
`CachePatchingMixin` those ActivationCache gains (`cache[Node(...)]`, `cache.zero_ablated()`,
`cache.mean_ablated(groups)`). `install()` sets them on TransformerLens' classes.

Importing `transformer_lens_patching` installs the plugin, so `model.path_patch` works
in any code that imported the package; so does loading the entry point
`transformer_lens_patching` of group `transformer_lens.plugins`, which `load_plugins()`
does for every plugin registered there. Installing adds methods and nothing else: no
TransformerLens method changes, except that `ActivationCache.__getitem__` also accepts a
`Node` (any other key goes to TransformerLens' own `__getitem__`).
"""

import functools
import importlib.metadata
from collections.abc import Callable, Sequence

import torch

from . import _tl
from ._core.nodes import IterNode, Node
from ._core.sites import resolve_layer, resolve_node
from ._methods.ablation import mean_ablation_cache, zero_ablation_cache
from ._methods.activation import act_patch, plan_act_patch
from ._methods.attribution import attr_patch
from ._methods.circuit_discovery import confirm_edges, exact_edge_scores
from ._methods.circuit_evaluation import evaluate_circuit, plan_circuit_evaluation
from ._methods.confirmation import confirm
from ._methods.edge_paths import attr_path_patch
from ._methods.edges import attr_edges
from ._methods.faithfulness import faithfulness_curve, mib_faithfulness
from ._methods.learned_masks import learn_edge_masks
from ._methods.path import path_patch, plan_path_patch
from ._methods.path_confirmation import confirm_paths
from .errors import PatchingError

ENTRY_POINT_GROUP = "transformer_lens.plugins"
"""The entry-point group TransformerLens plugins register under."""


def _method_of(function: Callable) -> Callable:
    """`function(model, ...)` as a method: the same signature without `model`, the same docs."""

    @functools.wraps(function)
    def method(self, *args, **kwargs):
        return function(self, *args, **kwargs)

    return method


class PatchingMixin:
    """The methods the plugin gives TransformerLens models; each is the function of the
    same name with the model as its first argument.

    >>> results = model.act_patch(corrupted, IterNode("z"), metric, new_input=clean)
    >>> last = Node("resid_post", model.cfg.n_layers - 1)
    >>> plan = model.plan_path_patch(clean, corrupted, IterNode("z"), last, metric)
    >>> print(plan)  # doctest: +ELLIPSIS
    path_patch plan
    ...
    """

    act_patch = _method_of(act_patch)
    path_patch = _method_of(path_patch)
    attr_patch = _method_of(attr_patch)
    confirm = _method_of(confirm)
    confirm_paths = _method_of(confirm_paths)
    attr_edges = _method_of(attr_edges)
    attr_path_patch = _method_of(attr_path_patch)
    plan_act_patch = _method_of(plan_act_patch)
    plan_path_patch = _method_of(plan_path_patch)
    evaluate_circuit = _method_of(evaluate_circuit)
    plan_circuit_evaluation = _method_of(plan_circuit_evaluation)
    faithfulness_curve = _method_of(faithfulness_curve)
    mib_faithfulness = _method_of(mib_faithfulness)
    exact_edge_scores = _method_of(exact_edge_scores)
    learn_edge_masks = _method_of(learn_edge_masks)
    confirm_edges = _method_of(confirm_edges)


def node_slice(cache, node: Node) -> torch.Tensor:
    """The slice of `cache` that `node` names, e.g. one head's z at one position per prompt.

    >>> cache[Node("z", 2, head=3, seq_pos=-1)].shape  # (prompts, 1 position, d_head)
    torch.Size([4, 1, 16])
    """
    shape = _tl.model_shape(cache.model)
    layer = None if node.layer is None else resolve_layer(node, node.layer, shape)
    hook_name = node.component.hook_name(layer)
    tensors = _tl.cache_items(cache)
    if hook_name not in tensors:
        raise PatchingError(f"This cache has no activation {hook_name!r} (for {node!r}).")
    tensor = tensors[hook_name]
    batch, seq_len = tensor.shape[0], tensor.shape[node.component.pos_axis]
    site = resolve_node(node, shape, batch, seq_len, tensor.device)
    return tensor[site.index(0, batch, tensor.device)]


class CachePatchingMixin:
    """The methods the plugin gives ActivationCache.

    >>> cache[Node("z", 2, head=3)].shape  # (prompts, positions, d_head)
    torch.Size([4, 6, 16])
    >>> means = cache.mean_ablated(groups=templates)
    >>> act_patch(model, tokens, IterNode("z"), metric, new_cache=means)["z"].dims
    ('layer', 'head')
    """

    def zero_ablated(self):
        """This cache with every activation set to zero (see `zero_ablation_cache`)."""
        return zero_ablation_cache(self)

    def mean_ablated(self, groups: Sequence | torch.Tensor | None = None):
        """This cache with every activation replaced by its mean over prompts, or over the
        prompts of each group (see `mean_ablation_cache`)."""
        return mean_ablation_cache(self, groups)


def _getitem_with_nodes(original: Callable) -> Callable:
    @functools.wraps(original)
    def __getitem__(self, key):
        if isinstance(key, Node):
            return node_slice(self, key)
        if isinstance(key, IterNode):
            raise PatchingError(f"A cache is indexed by one Node, not an IterNode ({key!r}).")
        return original(self, key)

    __getitem__.patching_plugin = True
    return __getitem__


def _set_methods(cls: type, mixin: type) -> None:
    for name, value in vars(mixin).items():
        if not name.startswith("_"):
            setattr(cls, name, value)


def install() -> None:
    """Give TransformerLens' model classes the methods of `PatchingMixin`, and ActivationCache
    those of `CachePatchingMixin` and Node indexing. Safe to call twice.

    >>> install()
    >>> hasattr(_tl.MODEL_CLASSES[0], "plan_act_patch")
    True
    """
    for model_class in _tl.MODEL_CLASSES:
        _set_methods(model_class, PatchingMixin)
    cache_class = _tl.CACHE_CLASS
    _set_methods(cache_class, CachePatchingMixin)
    if not getattr(cache_class.__getitem__, "patching_plugin", False):
        cache_class.__getitem__ = _getitem_with_nodes(cache_class.__getitem__)


def load_plugins(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Load every plugin registered in the entry-point `group` and return their names.

    An entry point may name a callable (it is called with no arguments) or a module
    (importing it is the installation).

    >>> "transformer_lens_patching" in load_plugins()
    True
    """
    loaded = []
    for entry_point in importlib.metadata.entry_points(group=group):
        target = entry_point.load()
        if callable(target):
            target()
        loaded.append(entry_point.name)
    return loaded


__all__ = ["ENTRY_POINT_GROUP", "CachePatchingMixin", "PatchingMixin", "install", "load_plugins", "node_slice"]
