"""Which TransformerLens is installed, and its model and cache classes."""

import importlib.metadata

from transformer_lens import ActivationCache

from ..errors import PatchingError
from .devices import check_placed

TL_VERSION: str = importlib.metadata.version("transformer-lens")
TL_MAJOR: int = int(TL_VERSION.split(".")[0])

if TL_MAJOR >= 4:
    from transformer_lens.model_bridge import TransformerBridge

    MODEL_CLASSES: tuple[type, ...] = (TransformerBridge,)
else:
    from transformer_lens import HookedTransformer

    MODEL_CLASSES = (HookedTransformer,)

CACHE_CLASS: type = ActivationCache
"""TransformerLens' activation cache class."""


def check_model(model) -> None:
    """Raise a PatchingError unless `model` is a TransformerLens model of this version, with
    every parameter on a real device (see `check_placed`)."""
    if not isinstance(model, MODEL_CLASSES):
        expected = " or ".join(cls.__name__ for cls in MODEL_CLASSES)
        raise PatchingError(f"Expected a TransformerLens {TL_VERSION} model ({expected}), got {type(model).__name__}.")
    check_placed(model)
