"""The prior art's demo notebook, run on this library on SmolLM2-135M.

The prior art is callummcdougall/path_patching (`path_patching.py`, `ioi_dataset.py` and its
`path_patching_demo.ipynb`). Its cells are copied here as they were, with four kinds of
change:

- the imports (`from path_patching import ...` -> `from transformer_lens_patching import ...`,
  `from ioi_dataset import ...` -> `from transformer_lens_patching.ioi import ...`; on
  TransformerLens 4, `transformer_lens.utils` is `transformer_lens.utilities`);
- GPT-2 small's layer numbers become SmolLM2's (30 layers, 9 heads, 3 key/value heads; the final
  residual stream is `Node("resid_post", 29)`), and the name movers and other heads come from the
  results, not from the IOI paper;
- fewer patches, for CI time: `IterNode(..., layers=...)` (sometimes `heads=`) restricts most
  sweeps to the last layers, and the IOI dataset has 4 prompts. The prior art swept every layer;
  with the notebook's plain-function metrics every patch computes SmolLM2's full 49152-token
  logits, so a full sweep of heads takes minutes on a CPU. One sweep of every head runs, where
  it is cheap;
- the typos of path patching example 2 (a missing comma, `corrupted_tokens` for `flipped_tokens`).

The library differs on purpose in one way the cells see: over an IterNode, a metric that does not
return a Python float (a 0-d tensor, a per-prompt tensor, a tuple) gives a tensor with the sweep's
dims (plus "batch" and "output" dims), where the prior art gave a flat list. docs/migration.md
lists every difference.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch as t
from jaxtyping import Float
from torch import Tensor

try:
    from transformer_lens import utils  # TransformerLens 2, as in the notebook
except ImportError:
    from transformer_lens import utilities as utils  # TransformerLens 4 renamed the module
from tests.helpers import assert_close, model_state

# The prior art's imports were:
#   from ioi_dataset import NAMES, IOIDataset
#   from path_patching import Node, IterNode, path_patch, act_patch
from transformer_lens_patching import IterNode, Node, act_patch, path_patch
from transformer_lens_patching.ioi import NAMES, IOIDataset

from transformer_lens_patching import PatchingError, PatchResult  # isort: skip (not in the prior art)

pytestmark = pytest.mark.skipif(bool(os.environ.get("TLP_FAST")), reason="TLP_FAST set: SmolLM2 skipped")

LATE = [28, 29]
"""The layers most sweeps run over (the prior art: every layer, all 12 of GPT-2 small)."""


@pytest.fixture(scope="module")
def nb(smollm2_model):
    """The notebook's set-up cells (Neel's 8 prompts, then the IOI paper's dataset), run once."""
    model = smollm2_model
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_key_value_heads) == (30, 9, 3)
    before = model_state(model)
    device = model.cfg.device
    with t.no_grad():  # the notebook: t.set_grad_enabled(False)
        # ---- Neel's data (and metric functions) --------------------------------------------------
        prompt_format = [
            "When John and Mary went to the shops,{} gave the bag to",
            "When Tom and James went to the park,{} gave the ball to",
            "When Dan and Sid went to the shops,{} gave an apple to",
            "After Martin and Amy went to the park,{} gave a drink to",
        ]
        name_pairs = [
            (" John", " Mary"),
            (" Tom", " James"),
            (" Dan", " Sid"),
            (" Martin", " Amy"),
        ]

        # Define 8 prompts, in 4 groups of 2 (with adjacent prompts having answers swapped)
        prompts = [prompt.format(name) for (prompt, names) in zip(prompt_format, name_pairs) for name in names[::-1]]
        # Define the answers for each prompt, in the form (correct, incorrect)
        answers = [names[::i] for names in name_pairs for i in (1, -1)]
        # Define the answer tokens (same shape as the answers)
        answer_tokens = t.concat([model.to_tokens(names, prepend_bos=False).T for names in answers])

        def logits_to_ave_logit_diff(
            logits: Float[Tensor, "batch seq d_vocab"],
            answer_tokens: Float[Tensor, "batch 2"] = answer_tokens,
            per_prompt: bool = False,
        ):
            # Only the final logits are relevant for the answer
            final_logits: Float[Tensor, "batch d_vocab"] = logits[:, -1, :]
            # Get the logits corresponding to the indirect object / subject tokens respectively
            answer_logits: Float[Tensor, "batch 2"] = final_logits.gather(dim=-1, index=answer_tokens)
            # Find logit difference
            correct_logits, incorrect_logits = answer_logits.unbind(dim=-1)
            answer_logit_diff = correct_logits - incorrect_logits
            return answer_logit_diff if per_prompt else answer_logit_diff.mean()

        clean_tokens = model.to_tokens(prompts, prepend_bos=True).to(device)
        flipped_indices = [i + 1 if i % 2 == 0 else i - 1 for i in range(len(clean_tokens))]
        flipped_tokens = clean_tokens[flipped_indices]

        clean_logits, clean_cache = model.run_with_cache(clean_tokens)
        flipped_logits, flipped_cache = model.run_with_cache(flipped_tokens)

        clean_logit_diff = logits_to_ave_logit_diff(clean_logits, answer_tokens)
        flipped_logit_diff = logits_to_ave_logit_diff(flipped_logits, answer_tokens)

        def ioi_metric_denoising(
            logits: Float[Tensor, "batch seq d_vocab"],
            answer_tokens: Float[Tensor, "batch 2"] = answer_tokens,
            flipped_logit_diff: float = flipped_logit_diff,
            clean_logit_diff: float = clean_logit_diff,
        ) -> Float[Tensor, ""]:
            patched_logit_diff = logits_to_ave_logit_diff(logits, answer_tokens)
            return ((patched_logit_diff - flipped_logit_diff) / (clean_logit_diff - flipped_logit_diff)).item()

        labels = [f"{tok} {i}" for i, tok in enumerate(model.to_str_tokens(clean_tokens[0]))]

        # ---- Data (and metric functions) from authors of paper ------------------------------------
        N = 4  # the notebook: 30
        with pytest.warns(UserWarning):  # SmolLM2 splits a few of the names: they are left out
            ioi_dataset = IOIDataset(
                prompt_type="mixed",
                N=N,
                tokenizer=model.tokenizer,
                prepend_bos=False,
                seed=42,
                device=str(device),
            )
        abc_dataset = ioi_dataset.gen_flipped_prompts("ABB->XYZ, BAB->XYZ")

        def logits_to_ave_logit_diff_2(
            logits: Float[Tensor, "batch seq d_vocab"], ioi_dataset: IOIDataset = ioi_dataset, per_prompt=False
        ):
            # Get the logits corresponding to the indirect object / subject tokens respectively
            io_logits = logits[range(logits.size(0)), ioi_dataset.word_idx["end"], ioi_dataset.io_tokenIDs]
            s_logits = logits[range(logits.size(0)), ioi_dataset.word_idx["end"], ioi_dataset.s_tokenIDs]
            # Find logit difference
            answer_logit_diff = io_logits - s_logits
            return answer_logit_diff if per_prompt else answer_logit_diff.mean()

        model.reset_hooks(including_permanent=True)

        ioi_logits_original, ioi_cache = model.run_with_cache(ioi_dataset.toks)
        abc_logits_original, abc_cache = model.run_with_cache(abc_dataset.toks)

        ioi_per_prompt_diff = logits_to_ave_logit_diff_2(ioi_logits_original, per_prompt=True)
        abc_per_prompt_diff = logits_to_ave_logit_diff_2(abc_logits_original, per_prompt=True)

        ioi_average_logit_diff = logits_to_ave_logit_diff_2(ioi_logits_original).item()
        abc_average_logit_diff = logits_to_ave_logit_diff_2(abc_logits_original).item()

        def ioi_metric_noising(
            logits: Float[Tensor, "batch seq d_vocab"],
            clean_logit_diff: float = ioi_average_logit_diff,
            corrupted_logit_diff: float = abc_average_logit_diff,
            ioi_dataset: IOIDataset = ioi_dataset,
        ) -> float:
            patched_logit_diff = logits_to_ave_logit_diff_2(logits, ioi_dataset)
            return ((patched_logit_diff - clean_logit_diff) / (clean_logit_diff - corrupted_logit_diff)).item()

    yield SimpleNamespace(**{name: value for name, value in locals().items() if name != "before"})
    assert model_state(model) == before, "the notebook's cells changed the model's hooks or flags"


def printed(call):
    """What `call()` returns, and what it printed (the fixtures are module-scoped, capsys is not)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = call()
    return result, out.getvalue()


def top_heads(result: PatchResult, k: int) -> list[tuple[int, int]]:
    """The (layer, head) coordinates of the k most negative cells of a (layer, head) result."""
    n_heads = result.shape[1]
    cells = result.flatten().argsort()[:k].tolist()
    return [(result.coords["layer"][i // n_heads], result.coords["head"][i % n_heads]) for i in cells]


@pytest.fixture(scope="module")
def heads(nb):
    """Activation patching example 1: head outputs, corrupted -> clean; and what verbose=True printed."""
    return printed(
        lambda: act_patch(
            model=nb.model,
            orig_input=nb.flipped_tokens,
            new_cache=nb.clean_cache,
            patching_nodes=IterNode("z", layers=LATE),  # the notebook: IterNode("z"), every head of every layer
            patching_metric=nb.ioi_metric_denoising,
            verbose=True,
        )
    )


@pytest.fixture(scope="module")
def by_position(nb):
    """Activation patching example 2: the residual stream and MLP outputs at each position."""
    return printed(
        lambda: act_patch(
            model=nb.model,
            orig_input=nb.flipped_tokens,
            new_cache=nb.clean_cache,
            patching_nodes=IterNode(["resid_pre", "attn_out", "mlp_out"], seq_pos="each", layers=[29]),
            patching_metric=nb.ioi_metric_denoising,
            verbose=True,
        )
    )


@pytest.fixture(scope="module")
def to_logits(nb):
    """Path patching example 1: each head -> the final residual stream, both meanings of "direct"."""
    model, ioi_dataset, abc_dataset = nb.model, nb.ioi_dataset, nb.abc_dataset
    ioi_metric_noising = nb.ioi_metric_noising
    results = path_patch(
        model,
        orig_input=ioi_dataset.toks,
        new_input=abc_dataset.toks,
        sender_nodes=IterNode("z", layers=LATE),  # the notebook: IterNode("z")
        receiver_nodes=Node("resid_post", 29),
        patching_metric=ioi_metric_noising,
    )
    results_direct = path_patch(
        model,
        orig_input=ioi_dataset.toks,
        new_input=abc_dataset.toks,
        sender_nodes=IterNode("z", layers=LATE),
        receiver_nodes=Node("resid_post", 29),
        patching_metric=ioi_metric_noising,
        direct_includes_mlps=False,
    )
    # The name movers: the heads whose direct effect lowers the logit difference most.
    NAME_MOVER_HEADS = top_heads(results["z"], 3)
    return SimpleNamespace(results=results, results_direct=results_direct, NAME_MOVER_HEADS=NAME_MOVER_HEADS)


# ---- Set-up -------------------------------------------------------------------------------------


def test_setup_cells(nb):
    # Adjacent prompts swap their names and answers, so the flipped logit diff is minus the clean one.
    assert nb.clean_logit_diff > 1
    assert_close(nb.flipped_logit_diff, -nb.clean_logit_diff)
    assert nb.labels[10] == " Mary 10"  # S2, where clean and flipped differ (the prior art's 'Mary_10')
    differs = (nb.clean_tokens != nb.flipped_tokens).nonzero()[:, 1].unique().tolist()
    assert differs == [10]

    ioi_dataset, abc_dataset = nb.ioi_dataset, nb.abc_dataset
    assert len(ioi_dataset) == ioi_dataset.N == nb.N and len(ioi_dataset.sentences) == nb.N
    assert ioi_dataset.toks.shape == (nb.N, ioi_dataset.max_len) and ioi_dataset.toks.dtype == t.long
    assert all(isinstance(token, int) for token in ioi_dataset.io_tokenIDs + ioi_dataset.s_tokenIDs)
    assert all(prompt["IO"] in NAMES and prompt["S"] in NAMES for prompt in ioi_dataset.ioi_prompts)
    # The flipped prompts keep the clean positions and the device, and differ in the names only.
    assert abc_dataset.toks.device == ioi_dataset.toks.device == ioi_dataset.word_idx["end"].device
    assert t.equal(abc_dataset.word_idx["end"], ioi_dataset.word_idx["end"])
    assert abc_dataset.sentences != ioi_dataset.sentences
    # The model reads the answer at word_idx["end"]: the token before the final IO name.
    rows = range(nb.N)
    assert ioi_dataset.toks[rows, ioi_dataset.word_idx["end"] + 1].tolist() == ioi_dataset.io_tokenIDs
    assert (nb.ioi_per_prompt_diff > 0).all() and nb.ioi_average_logit_diff > nb.abc_average_logit_diff
    assert_close(nb.ioi_per_prompt_diff.mean(), nb.ioi_average_logit_diff)
    # The same seed gives the same prompts (the prior art reseeded the global RNGs instead).
    with pytest.warns(UserWarning):
        again = IOIDataset(prompt_type="mixed", N=nb.N, tokenizer=nb.model.tokenizer, prepend_bos=False, seed=42)
    assert again.sentences == ioi_dataset.sentences
    assert again.gen_flipped_prompts("ABB->XYZ, BAB->XYZ").sentences == abc_dataset.sentences


def test_node_call_forms():
    """The Node and IterNode forms of the notebook's markdown and the prior art's docstrings."""
    assert Node("q", 9, head=9).activation_name == "blocks.9.attn.hook_q"
    assert Node("attn_out", 8).activation_name == "blocks.8.hook_attn_out"
    assert Node("post", 7, neuron=100).activation_name == "blocks.7.mlp.hook_post"
    assert Node("resid_pre", 1, seq_pos=0).seq_pos == 0
    assert Node("pre", 5, neuron=1337).component_name == "pre"
    assert Node("blocks.1.attn.hook_attn_scores").layer == 1
    assert Node("blocks.11.hook_resid_post").layer == 11  # the prior art's regex read one digit only
    assert Node("z", layer=9, head=9) == Node("z", 9, head=9)
    assert IterNode(node_names=["q", "k", "v"], seq_pos="each").component_names == ["q", "k", "v"]
    with pytest.raises(PatchingError, match="no head axis"):  # the prior art accepted it silently
        Node("resid_pre", 1, head=2)


# ---- Activation patching ------------------------------------------------------------------------


def test_act_patch_head_outputs(nb, heads, capsys):
    """Example 1: IterNode("z") with new_cache=clean_cache; the same from new_input; a single Node."""
    results, out = heads
    assert out == "results['z'].shape = (layer=2, head=9)\n"
    assert list(results) == ["z"]
    z = results["z"]
    assert isinstance(z, PatchResult) and z.dims == ("layer", "head") and z.coords["layer"] == (28, 29)
    assert z.shape == (2, 9) and z.dtype == t.float32 and z.device.type == "cpu"
    # The notebook's imshow: px.imshow(utils.to_numpy(results['z'] * 100), ...)
    shown = utils.to_numpy(results["z"] * 100)
    assert isinstance(shown, np.ndarray) and shown.shape == (2, 9)
    assert not isinstance(results["z"] * 100, PatchResult)

    # Single instance: a float, equal to the matching cell of the sweep.
    layer, head = 29, int(z.sel(layer=29).abs().argmax())
    single = act_patch(
        model=nb.model,
        orig_input=nb.flipped_tokens,
        new_cache=nb.clean_cache,
        patching_nodes=Node("z", layer=layer, head=head),
        patching_metric=nb.ioi_metric_denoising,
        verbose=True,
    )
    assert type(single) is float
    assert capsys.readouterr().out == ""  # verbose prints dims for IterNode results only
    assert_close(single, z.sel(layer=layer, head=head))
    assert_close(single, z[1, head])
    assert abs(single) > 1e-3, "the largest head at layer 29 matters"

    # new_cache=clean_cache and new_input=clean_tokens patch in the same values.
    from_input = act_patch(
        model=nb.model,
        orig_input=nb.flipped_tokens,
        new_input=nb.clean_tokens,
        patching_nodes=IterNode("z", layers=LATE, heads=[0, head]),
        patching_metric=nb.ioi_metric_denoising,
    )
    assert_close(from_input["z"], z[:, [0, head]])


def test_act_patch_several_components(nb, heads, capsys):
    """Example 1, multiple components. SmolLM2 has 3 key/value heads, so k and v have 3 heads."""
    model = nb.model
    results = act_patch(
        model=model,
        orig_input=nb.flipped_tokens,
        new_cache=nb.clean_cache,
        patching_nodes=IterNode(["z", "q", "k", "v", "pattern"], layers=[29]),
        patching_metric=nb.ioi_metric_denoising,
        verbose=True,
    )
    assert capsys.readouterr().out == (
        "results['z'].shape = (layer=1, head=9)\n"
        "results['q'].shape = (layer=1, head=9)\n"
        "results['k'].shape = (layer=1, kv_head=3)\n"
        "results['v'].shape = (layer=1, kv_head=3)\n"
        "results['pattern'].shape = (layer=1, head=9)\n"
    )
    assert results.keys() == {"z", "q", "k", "v", "pattern"}
    assert list(results) == ["z", "q", "k", "v", "pattern"]
    assert [r.shape == (1, 9) for r in results.values()] == [True, True, False, False, True]
    assert results["k"].shape == results["v"].shape == (1, 3) and results["k"].dims == ("layer", "kv_head")
    assert_close(results["z"][0], heads[0]["z"].sel(layer=29))

    # The notebook's t.stack(tuple(results.values())) needs equal shapes: true on GPT-2, not with GQA.
    with pytest.raises(RuntimeError):
        t.stack(tuple(results.values()))
    stacked = t.stack(tuple(results[name] for name in ("z", "q", "pattern"))) * 100
    assert stacked.shape == (3, 1, 9)

    # A k or v head is a key/value head: Node("k", 29, head=kv) is kv head `kv`, read by 3 query heads.
    kv = int(results["k"][0].abs().argmax())
    single = act_patch(
        model=model,
        orig_input=nb.flipped_tokens,
        new_cache=nb.clean_cache,
        patching_nodes=Node("k", 29, head=kv),
        patching_metric=nb.ioi_metric_denoising,
    )
    assert_close(single, results["k"].sel(layer=29, kv_head=kv))
    assert_close(single, results["k"].sel(layer=29, head=kv))  # head= names kv_head where there is no head dim
    with pytest.raises(PatchingError, match="out of range"):  # kv heads are 0, 1, 2
        act_patch(
            model=model,
            orig_input=nb.flipped_tokens,
            new_cache=nb.clean_cache,
            patching_nodes=Node("k", 29, head=3),
            patching_metric=nb.ioi_metric_denoising,
        )


def test_stacking_all_five_components_without_gqa(tok):
    """The notebook's multi-component cell verbatim, on a (random, 2-layer) model with as many
    key/value heads as heads."""
    from tests.oracles import models

    model = models.gpt2_like(n_layers=2, tok=tok)
    generator = t.Generator().manual_seed(0)
    clean_tokens = t.randint(100, 2000, (4, 6), generator=generator)
    flipped_tokens = clean_tokens.flip(0)
    _, clean_cache = model.run_with_cache(clean_tokens)

    def metric(logits):
        return (logits[:, -1, 5] - logits[:, -1, 6]).mean().item()

    results = act_patch(
        model=model,
        orig_input=flipped_tokens,
        new_cache=clean_cache,
        patching_nodes=IterNode(["z", "q", "k", "v", "pattern"]),
        patching_metric=metric,
    )
    assert results.keys() == {"z", "q", "k", "v", "pattern"}
    assert all([r.shape == (2, 4) for r in results.values()])  # noqa: C419 (the notebook's line)
    assert utils.to_numpy(t.stack(tuple(results.values())) * 100).shape == (5, 2, 4)


def test_per_prompt_positions_of_an_iternode():
    """The prior art's per-prompt positions: `seq_pos` a (batch, k) tensor in an IterNode, with a
    metric of the logits and with apply_metric_to_cache=True; each layer's cell equals a hand-made
    hook that writes the clean residual stream at those positions, and the IterNode prints."""
    from tests.oracles import models

    model = models.gpt2_like(n_layers=2)
    generator = t.Generator().manual_seed(0)
    clean_tokens = t.randint(100, 2000, (3, 6), generator=generator)
    flipped_tokens = clean_tokens.flip(0)
    _, clean_cache = model.run_with_cache(clean_tokens)
    positions = t.tensor([1, 2]).repeat(3, 1)
    positions[2] = t.tensor([3, 5])
    nodes = IterNode("resid_pre", seq_pos=positions)
    assert "IterNode('resid_pre', seq_pos=" in repr(nodes)
    last_resid = utils.get_act_name("resid_post", 1)

    def metric(logits):
        return (logits[:, -1, 5] - logits[:, -1, 6]).mean().item()

    def cache_metric(cache):
        return cache[last_resid][:, -1, 0].mean().item()

    results = act_patch(
        model=model, orig_input=flipped_tokens, new_cache=clean_cache, patching_nodes=nodes, patching_metric=metric
    )
    on_cache = act_patch(
        model=model,
        orig_input=flipped_tokens,
        new_cache=clean_cache,
        patching_nodes=nodes,
        patching_metric=cache_metric,
        apply_metric_to_cache=True,
    )
    rows = t.arange(3)[:, None]
    for layer in range(2):
        name = utils.get_act_name("resid_pre", layer)

        def write_clean(activation, hook, name=name):
            activation = activation.clone()
            activation[rows, positions] = clean_cache[name][rows, positions]
            return activation

        with model.hooks(fwd_hooks=[(name, write_clean)]):
            logits, cache = model.run_with_cache(flipped_tokens)
        assert_close(results["resid_pre"].sel(layer=layer), metric(logits))
        assert_close(on_cache["resid_pre"].sel(layer=layer), cache_metric(cache))


def test_act_patch_residual_stream_by_position(nb, by_position, capsys):
    """Example 2: IterNode([...], seq_pos="each") is (seq_pos, layer), as in the prior art; then one position."""
    results, out = by_position
    assert out == "".join(
        f"results[{name!r}].shape = (seq_pos=15, layer=1)\n" for name in ("resid_pre", "attn_out", "mlp_out")
    )
    assert results.keys() == {"resid_pre", "attn_out", "mlp_out"}
    for name, result in results.items():
        assert result.dims == ("seq_pos", "layer") and result.shape == (15, 1)
        # Before S2 (position 10) clean and flipped prompts are the same, so patching there changes nothing.
        assert result[:10].abs().max() < 1e-3, name
    assert results["resid_pre"][10:].abs().max() > 0.01
    # we transpose so layer is on the y-axis
    facets = t.stack([r.T for r in results.values()]) * 100
    assert facets.shape == (3, 1, 15) and utils.to_numpy(facets).shape == (3, 1, 15)

    # A fixed position, the same in every iteration: dims (layer,).
    results_s2 = act_patch(
        model=nb.model,
        orig_input=nb.flipped_tokens,
        new_cache=nb.clean_cache,
        patching_nodes=IterNode(["resid_pre", "attn_out", "mlp_out"], seq_pos=10, layers=LATE),
        patching_metric=nb.ioi_metric_denoising,
        verbose=True,
    )
    assert capsys.readouterr().out == "".join(
        f"results[{name!r}].shape = (layer=2)\n" for name in ("resid_pre", "attn_out", "mlp_out")
    )
    for name, result in results_s2.items():
        assert result.dims == ("layer",) and result.shape == (2,)
        assert_close(result.sel(layer=29), results[name][10, 0])
    assert (t.stack(list(results_s2.values())).T * 100).shape == (2, 3)


# ---- Path patching ------------------------------------------------------------------------------


def test_path_patch_head_to_final_residual_stream(nb, to_logits):
    """Example 1: one head, then every head, then the name movers together -> Node("resid_post", 29)."""
    model, ioi_dataset, abc_dataset = nb.model, nb.ioi_dataset, nb.abc_dataset
    ioi_metric_noising = nb.ioi_metric_noising
    results, results_direct = to_logits.results, to_logits.results_direct
    for result in (results["z"], results_direct["z"]):
        assert result.dims == ("layer", "head") and result.shape == (2, 9) and result.coords["layer"] == (28, 29)
    # The two meanings of "direct path" differ (by the paths through the later MLPs), but not by much.
    assert not t.allclose(results["z"], results_direct["z"], atol=1e-4)
    assert t.corrcoef(t.stack([results["z"].flatten(), results_direct["z"].flatten()]))[0, 1] > 0.9
    assert utils.to_numpy(t.stack([results["z"], results_direct["z"]])).shape == (2, 2, 9)

    layer, head = to_logits.NAME_MOVER_HEADS[0]
    head_to_resid_post_final = path_patch(
        model,
        orig_input=ioi_dataset.toks,
        new_input=abc_dataset.toks,
        sender_nodes=Node("z", layer, head=head),
        receiver_nodes=Node("resid_post", 29),
        patching_metric=ioi_metric_noising,
        direct_includes_mlps=False,
    )
    assert type(head_to_resid_post_final) is float and head_to_resid_post_final < 0
    assert_close(head_to_resid_post_final, results_direct["z"].sel(layer=layer, head=head))

    # A layer-29 head reaches the logits directly and through MLP 29 only: its path effect (MLPs
    # included) is its total effect, which activation patching measures.
    last = int(results["z"].sel(layer=29).abs().argmax())
    total = act_patch(
        model=model,
        orig_input=ioi_dataset.toks,
        new_input=abc_dataset.toks,
        patching_nodes=Node("z", 29, head=last),
        patching_metric=ioi_metric_noising,
    )
    assert_close(total, results["z"].sel(layer=29, head=last))

    # The name movers together (the notebook printed "Performance is worse than zero!" for GPT-2).
    NAME_MOVER_HEADS = to_logits.NAME_MOVER_HEADS
    together = path_patch(
        model,
        orig_input=ioi_dataset.toks,
        new_input=abc_dataset.toks,
        sender_nodes=[Node("z", layer, head=head) for layer, head in NAME_MOVER_HEADS],
        receiver_nodes=Node("resid_post", 29),
        patching_metric=ioi_metric_noising,
    )
    assert type(together) is float and together < results["z"].sel(layer=layer, head=head)


def test_path_patch_residual_stream_by_position(nb, by_position, capsys):
    """Example 2, with its typos fixed (a missing comma; corrupted_tokens -> flipped_tokens)."""
    results = path_patch(
        nb.model,
        orig_input=nb.flipped_tokens,
        new_input=nb.clean_tokens,
        sender_nodes=IterNode(["resid_pre", "attn_out", "mlp_out"], seq_pos="each", layers=[29]),
        receiver_nodes=Node("resid_post", 29),
        patching_metric=nb.ioi_metric_denoising,
        direct_includes_mlps=False,  # gives similar results to direct_includes_mlps=True
        verbose=True,
    )
    assert capsys.readouterr().out.splitlines()[0] == "results['resid_pre'].shape = (seq_pos=15, layer=1)"
    # We get a dictionary where each key is a node name, and each value is a tensor of (seq_pos, layer)
    assert list(results.keys()) == ["resid_pre", "attn_out", "mlp_out"]
    assert results["resid_pre"].shape == (15, 1)
    results_stacked = t.stack([results.T for results in results.values()])
    assert results_stacked.shape == (3, 1, 15)
    assert results["mlp_out"][:10].abs().max() < 1e-3
    act_results = by_position[0]
    # MLP 29 writes straight into resid_post 29: its path effect is its total effect.
    assert_close(results["mlp_out"], act_results["mlp_out"])
    # The direct paths of attn_out 29 and resid_pre 29 skip MLP 29 (and resid_pre 29 skips attention
    # 29), which activation patching recomputes.
    for name in ("resid_pre", "attn_out"):
        assert not t.allclose(results[name], act_results[name], atol=1e-4), name


def test_path_patch_head_to_head(nb, to_logits, capsys):
    """Example 3: into the name movers' queries, then into the values of the heads that feed them most."""
    model, ioi_dataset, abc_dataset = nb.model, nb.ioi_dataset, nb.abc_dataset
    ioi_metric_noising = nb.ioi_metric_noising
    NAME_MOVER_HEADS = to_logits.NAME_MOVER_HEADS
    senders = [min(layer for layer, _ in NAME_MOVER_HEADS) - 1]
    results = path_patch(
        model,
        orig_input=ioi_dataset.toks,
        new_input=abc_dataset.toks,
        sender_nodes=IterNode("z", layers=senders),  # the notebook: IterNode("z"), then results['z'][:9]
        receiver_nodes=[Node("q", layer, head=head) for layer, head in NAME_MOVER_HEADS],
        patching_metric=ioi_metric_noising,
        verbose=True,
    )
    assert capsys.readouterr().out == "results['z'].shape = (layer=1, head=9)\n"
    assert results["z"].coords["layer"] == tuple(senders) and (results["z"][:1] * 100).shape == (1, 9)

    # On SmolLM2 a value head is a key/value head, read by 3 query heads: query head h reads kv head h // 3.
    group = model.cfg.n_heads // model.cfg.n_key_value_heads
    S_INHIBITION_HEADS = list(dict.fromkeys((layer, head // group) for layer, head in top_heads(results["z"], 2)))
    results = path_patch(
        model,
        orig_input=ioi_dataset.toks,
        new_input=abc_dataset.toks,
        sender_nodes=IterNode("z", layers=[senders[0] - 1]),
        receiver_nodes=[Node("v", layer, head=head) for layer, head in S_INHIBITION_HEADS],
        patching_metric=ioi_metric_noising,
    )
    assert results["z"].shape == (1, 9) and results["z"].abs().max() > 0

    # Every head of every layer, into the values of layer 1: only layer 0 can send to them. The other
    # cells score the unpatched run (0 for a noising metric), as in the prior art.
    results = path_patch(
        model,
        orig_input=ioi_dataset.toks,
        new_input=abc_dataset.toks,
        sender_nodes=IterNode("z"),
        receiver_nodes=[Node("v", 1, head=head) for head in range(model.cfg.n_key_value_heads)],
        patching_metric=ioi_metric_noising,
        verbose=True,
    )
    assert capsys.readouterr().out == "results['z'].shape = (layer=30, head=9)\n"
    assert results["z"].shape == (30, 9)
    unpatched = float(results["z"][1, 0])
    assert_close(results["z"][1:], t.full((29, 9), unpatched))
    assert abs(unpatched) < 1e-4
    assert results["z"][0].std() > 0
    assert utils.to_numpy(results["z"][:1] * 100).shape == (1, 9)


def test_direct_paths_into_values(nb, to_logits):
    """direct_includes_mlps=False into q/k/v receivers: no need to set use_split_qkv_input first."""
    model, ioi_dataset, abc_dataset = nb.model, nb.ioi_dataset, nb.abc_dataset
    layer, head = to_logits.NAME_MOVER_HEADS[0]
    group = model.cfg.n_heads // model.cfg.n_key_value_heads
    assert model.cfg.use_split_qkv_input is False  # the notebook: model.set_use_split_qkv_input(True)
    results_direct = path_patch(
        model,
        orig_input=ioi_dataset.toks,
        new_input=abc_dataset.toks,
        sender_nodes=IterNode("z", layers=[layer - 1]),
        receiver_nodes=Node("v", layer, head=head // group),  # the kv head that query head reads
        patching_metric=nb.ioi_metric_noising,
        direct_includes_mlps=False,
    )
    assert model.cfg.use_split_qkv_input is False  # switched on for the call, then restored
    assert results_direct["z"].shape == (1, 9) and results_direct["z"].abs().max() > 0


# ---- Metrics that do not return a float ---------------------------------------------------------


def test_metrics_returning_tensors_over_an_iternode(nb, heads):
    """The one deliberate difference: over an IterNode, a metric that does not return a float gives a
    tensor with the sweep's dims (the prior art: a flat list in (layer, head) order, so results['z'][i]
    was the i-th node; here results['z'][i] is layer i, and results['z'].flatten(0, 1)[i] the i-th node)."""
    model, flipped_tokens, clean_cache = nb.model, nb.flipped_tokens, nb.clean_cache
    flipped_logit_diff, clean_logit_diff = nb.flipped_logit_diff, nb.clean_logit_diff
    float_results = heads[0]["z"]

    def ioi_metric_denoising_tensor(logits):  # the notebook's metric without .item(): a 0-d tensor
        patched_logit_diff = nb.logits_to_ave_logit_diff(logits, nb.answer_tokens)
        return (patched_logit_diff - flipped_logit_diff) / (clean_logit_diff - flipped_logit_diff)

    results = act_patch(
        model=model,
        orig_input=flipped_tokens,
        new_cache=clean_cache,
        patching_nodes=IterNode("z", layers=LATE, heads=[0, 4]),
        patching_metric=ioi_metric_denoising_tensor,
    )
    z = results["z"]
    assert isinstance(z, PatchResult) and z.dims == ("layer", "head") and z.shape == (2, 2)
    assert z.coords == {"layer": (28, 29), "head": (0, 4)}
    assert_close(z, float_results[:, [0, 4]])
    prior_art_list = list(z.flatten(0, 1))  # what the prior art returned: one 0-d tensor per node
    assert len(prior_art_list) == 4
    assert_close(prior_art_list[3], z.sel(layer=29, head=4))
    assert_close(z[1], z.sel(layer=29))  # results['z'][i] is now a layer

    # One value per prompt: a trailing "batch" dim.
    def per_prompt_logit_diff(logits):
        return nb.logits_to_ave_logit_diff(logits, nb.answer_tokens, per_prompt=True)

    results = act_patch(
        model=model,
        orig_input=flipped_tokens,
        new_cache=clean_cache,
        patching_nodes=IterNode("z", layers=[29], heads=[4]),
        patching_metric=per_prompt_logit_diff,
    )
    z = results["z"]
    assert z.dims == ("layer", "head", "batch") and z.shape == (1, 1, 8)
    normalised = (z.mean(-1) - flipped_logit_diff) / (clean_logit_diff - flipped_logit_diff)
    assert_close(normalised, float_results[1:, 4:5])
    single = act_patch(
        model=model,
        orig_input=flipped_tokens,
        new_cache=clean_cache,
        patching_nodes=Node("z", 29, head=4),
        patching_metric=per_prompt_logit_diff,
    )
    assert type(single) is Tensor and single.shape == (8,)
    assert_close(single, z.sel(layer=29, head=4))

    # A tuple of per-prompt values: an "output" dim (one entry per element of the tuple), then "batch".
    def io_and_s_logits(logits):
        final = logits[:, -1].gather(-1, nb.answer_tokens)
        return final[:, 0], final[:, 1]

    results = act_patch(
        model=model,
        orig_input=flipped_tokens,
        new_cache=clean_cache,
        patching_nodes=IterNode("z", layers=[29], heads=[4]),
        patching_metric=io_and_s_logits,
    )
    z = results["z"]
    assert z.dims == ("layer", "head", "output", "batch") and z.shape == (1, 1, 2, 8)
    io_logits, s_logits = z.sel(layer=29, head=4)  # the prior art: results["z"][0] was this tuple
    assert_close(io_logits - s_logits, single)


def test_metrics_of_the_patched_cache(nb, to_logits):
    """apply_metric_to_cache=True (winning_money_from_neel.ipynb, in the Node API): a tuple of
    per-prompt tensors, unpacked; a 0-d tensor over an IterNode. And path_patch's positional order."""
    model, ioi_dataset, abc_dataset, ioi_cache = nb.model, nb.ioi_dataset, nb.abc_dataset, nb.ioi_cache
    N = nb.N
    mover_layer, mover_head = to_logits.NAME_MOVER_HEADS[0]
    # A sender one layer before: that layer's most negative head in path example 1, if it was swept.
    sender_layer = mover_layer - 1
    swept = sender_layer in to_logits.results["z"].coords["layer"]
    sender = (sender_layer, int(to_logits.results["z"].sel(layer=sender_layer).argmin()) if swept else 0)
    pattern_name = utils.get_act_name("pattern", mover_layer)

    def get_io_attn_change_for_nmh(patched_cache, ioi_dataset, ioi_cache, neg_nmh=(mover_layer, mover_head)):
        layer, head = neg_nmh
        end_seq_pos, io_seq_pos = ioi_dataset.word_idx["end"], ioi_dataset.word_idx["IO"]
        attn_pattern_patched = patched_cache["pattern", layer][:, head]
        attn_pattern_clean = ioi_cache["pattern", layer][:, head]
        return (
            attn_pattern_patched[range(N), end_seq_pos, io_seq_pos],
            attn_pattern_clean[range(N), end_seq_pos, io_seq_pos],
        )

    # The prior art's positional order: model, orig_input, new_input, sender_nodes, receiver_nodes,
    # patching_metric, orig_cache, new_cache, seq_pos, apply_metric_to_cache,
    # names_filter_for_cache_metric, direct_includes_mlps, verbose.
    metric = functools.partial(get_io_attn_change_for_nmh, ioi_dataset=ioi_dataset, ioi_cache=ioi_cache)
    result_patched, result_clean = path_patch(
        model,
        ioi_dataset.toks,
        abc_dataset.toks,
        Node("z", sender[0], head=sender[1]),
        Node("q", mover_layer, head=mover_head),
        metric,
        None,
        None,
        None,
        True,
        lambda name: name == pattern_name,
        True,
        False,
    )
    assert result_patched.shape == result_clean.shape == (N,)
    pattern = ioi_cache["pattern", mover_layer][:, mover_head]
    clean = pattern[range(N), ioi_dataset.word_idx["end"], ioi_dataset.word_idx["IO"]]
    assert_close(result_clean, clean)
    assert not t.allclose(result_patched, result_clean, atol=1e-6)  # patching the query moved the attention
    results_patched = []
    results_patched.extend(result_patched.tolist())
    assert len(results_patched) == N

    def get_io_attn(patched_cache, layer=mover_layer, head=mover_head) -> Float[Tensor, ""]:
        attn = patched_cache["pattern", layer][:, head]
        return attn[range(N), ioi_dataset.word_idx["end"], ioi_dataset.word_idx["IO"]].mean()

    results = path_patch(
        model,
        orig_input=ioi_dataset.toks,
        new_input=abc_dataset.toks,
        sender_nodes=IterNode("z", layers=[sender[0]], heads=[sender[1]]),
        receiver_nodes=Node("q", mover_layer, head=mover_head),
        patching_metric=get_io_attn,
        apply_metric_to_cache=True,
        names_filter_for_cache_metric=lambda name: name == pattern_name,
    )
    assert results["z"].dims == ("layer", "head") and results["z"].shape == (1, 1)
    assert_close(results["z"].sel(layer=sender[0], head=sender[1]), result_patched.mean())


def test_zero_ablation(nb):
    """new_cache="zero", in both functions."""
    model = nb.model
    # Zeroing the residual stream entering the last layer zeroes everything after it (RMSNorm, no
    # biases), so every logit is 0: the logit difference is 0, halfway between flipped and clean.
    results = act_patch(
        model=model,
        orig_input=nb.clean_tokens,
        patching_nodes=IterNode("resid_pre", layers=[29]),
        patching_metric=nb.ioi_metric_denoising,
        new_cache="zero",
    )
    assert results["resid_pre"].dims == ("layer",)
    assert_close(results["resid_pre"], [0.5])

    # A layer-29 head zeroed on its direct paths (MLP 29 included) is the head zeroed.
    head = 4
    path = path_patch(
        model,
        orig_input=nb.clean_tokens,
        sender_nodes=Node("z", 29, head=head),
        receiver_nodes=Node("resid_post", 29),
        patching_metric=nb.ioi_metric_denoising,
        new_cache="zero",
    )
    act = act_patch(
        model=model,
        orig_input=nb.clean_tokens,
        patching_nodes=Node("z", 29, head=head),
        patching_metric=nb.ioi_metric_denoising,
        new_cache="zero",
    )
    assert type(path) is float and type(act) is float
    assert_close(path, act)
