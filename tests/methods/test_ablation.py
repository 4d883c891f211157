"""mean_ablation_cache's groups (one label per prompt, or lists of prompt indices such as
IOIDataset.groups): each prompt gets the mean of its own group, and groups that do not cover
every prompt exactly once are refused. (The caches' plugin methods: tests/properties/test_plugin.py.)"""

from __future__ import annotations

import torch

from tests.helpers import make_inputs, raises
from transformer_lens_patching import IOIDataset, mean_ablation_cache


def test_mean_ablation_groups_from_an_ioi_dataset(wide_model, tok):
    dataset = IOIDataset("mixed", N=12, tokenizer=tok, seed=0, nb_templates=4)
    _, cache = wide_model.run_with_cache(dataset.toks)
    by_groups = mean_ablation_cache(cache, groups=dataset.groups)
    labels = [p.template_index for p in dataset.prompts]
    by_labels = mean_ablation_cache(cache, groups=labels)
    name = "blocks.0.attn.hook_z"
    assert len(dataset.groups) > 1
    torch.testing.assert_close(by_groups[name], by_labels[name], rtol=0, atol=0)
    for rows in dataset.groups:
        group_mean = cache[name][rows].mean(0, keepdim=True)
        torch.testing.assert_close(by_groups[name][rows], group_mean.expand_as(cache[name][rows]))


def test_mean_ablation_groups_must_cover_each_prompt_once(gpt2_model):
    orig, _ = make_inputs(gpt2_model)
    _, cache = gpt2_model.run_with_cache(orig)
    with raises(r"every prompt in exactly one group: prompts \[2\] are in no group"):
        mean_ablation_cache(cache, groups=[torch.tensor([0]), torch.tensor([1])])
    with raises(r"prompts \[1\] are in several groups"):
        mean_ablation_cache(cache, groups=[[0, 1], [1, 2]])
    with raises(r"groups lists prompt 5, but the cache has 3 prompts"):
        mean_ablation_cache(cache, groups=[[0, 1, 2], [5]])
    with raises(r"groups has 2 labels, but the cache has 3 prompts.*IOIDataset.groups"):
        mean_ablation_cache(cache, groups=["a", "b"])
