"""The jaxtyping shape annotations are enforced at run time in the test suite (typeguard import hook)."""

from __future__ import annotations

import pytest
import torch

from transformer_lens_patching import lm_loss


def test_wrongly_shaped_tokens_fail_loudly():
    with pytest.raises(Exception, match="batch pos|Int\\[Tensor"):
        lm_loss(torch.zeros(5, dtype=torch.long))


def test_float_tokens_fail_loudly():
    with pytest.raises(Exception, match="Int\\[Tensor|int"):
        lm_loss(torch.zeros(2, 5))


def test_well_shaped_tokens_pass():
    metric = lm_loss(torch.zeros(2, 5, dtype=torch.long))
    assert metric(torch.zeros(2, 5, 7)).shape == ()
