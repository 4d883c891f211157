"""Shape-annotated tensor types for public signatures (checked at run time in the tests).

Aliases, rather than inline `Int[Tensor, "batch pos"]`, keep the dim strings out of the
annotations that typeguard's import hook rewrites.
"""

from jaxtyping import Float, Int
from torch import Tensor

Tokens = Int[Tensor, "batch pos"]
"""Token ids of the orig run."""
OtherTokens = Int[Tensor, "other_batch other_pos"]
"""Token ids of another run; the library checks they match the orig run's shape itself."""
Logits = Float[Tensor, "batch pos d_vocab"]
"""Logits of one run."""
ModelInput = str | list[str] | Tokens
"""What a model accepts: a string, a list of strings or tokens."""
OtherModelInput = str | list[str] | OtherTokens
"""Input of the second run (new_input)."""
