"""The TransformerLens plugin: patching methods on models, Node indexing on caches.

`import transformer_lens_patching` installs it; so does loading the entry point
`transformer_lens_patching` of group `transformer_lens.plugins`, which `load_plugins()`
does for every plugin registered there.
"""

import functools
import importlib.metadata

from . import _tl
from .ablation import mean_ablation_cache, zero_ablation_cache
from .activation_patching import act_patch
from .errors import PatchingError
from .nodes import Node
from .path_patching import path_patch
from .plan import resolve_layer, resolve_node

ENTRY_POINT_GROUP = "transformer_lens.plugins"
"""The entry-point group TransformerLens plugins register under."""


def _as_method(function):
    @functools.wraps(function)
    def method(self, *args, **kwargs):
        return function(self, *args, **kwargs)

    return method


def node_slice(cache, node: Node):
    """The slice of `cache` that `node` names, e.g. one head's z at one position per prompt.

    >>> cache[Node("z", 9, head=9, seq_pos=-1)].shape  # doctest: +SKIP
    torch.Size([8, 1, 64])
    """
    shape = _tl.model_shape(cache.model)
    layer = None if node.layer is None else resolve_layer(node, node.layer, shape)
    hook_name = node.component.hook_name(layer)
    tensors = _tl.cache_items(cache)
    if hook_name not in tensors:
        raise PatchingError(f"This cache has no activation {hook_name!r} (for {node!r}).")
    tensor = tensors[hook_name]
    batch, seq_len = tensor.shape[0], tensor.shape[node.component.pos_axis]
    site = resolve_node(node, shape, batch, seq_len)
    return tensor[site.index(0, batch, tensor.device)]


def _wrap_getitem(original):
    @functools.wraps(original)
    def __getitem__(self, key):
        if isinstance(key, Node):
            return node_slice(self, key)
        return original(self, key)

    __getitem__.patching_plugin = True
    return __getitem__


def install() -> None:
    """Add `act_patch`/`path_patch` methods to TransformerLens models and Node indexing,
    `zero_ablated()` and `mean_ablated(groups)` to ActivationCache. Safe to call twice.

    >>> install()
    >>> hasattr(_tl.MODEL_CLASSES[0], "act_patch")
    True
    """
    for model_class in _tl.MODEL_CLASSES:
        model_class.act_patch = _as_method(act_patch)
        model_class.path_patch = _as_method(path_patch)
    cache_class = _tl.ActivationCache
    if not getattr(cache_class.__getitem__, "patching_plugin", False):
        cache_class.__getitem__ = _wrap_getitem(cache_class.__getitem__)
    cache_class.zero_ablated = _as_method(zero_ablation_cache)
    cache_class.mean_ablated = _as_method(mean_ablation_cache)


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
