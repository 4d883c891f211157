"""Activation patching and path patching for TransformerLens models."""

from .ablation import mean_ablation_cache, zero_ablation_cache
from .activation_patching import act_patch
from .errors import PatchingError
from .metrics import LogitDiff, LogitsAt, TokenLogit, TokenProbability, lm_loss, logit_diff
from .nodes import IterNode, Node
from .path_patching import path_patch
from .plugin import install, load_plugins
from .results import PatchResult

__all__ = [
    "IterNode",
    "LogitDiff",
    "LogitsAt",
    "Node",
    "PatchResult",
    "PatchingError",
    "TokenLogit",
    "TokenProbability",
    "act_patch",
    "install",
    "lm_loss",
    "load_plugins",
    "logit_diff",
    "mean_ablation_cache",
    "path_patch",
    "zero_ablation_cache",
]

install()
