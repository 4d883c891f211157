"""Sweep benchmark: this library against TransformerLens 4.3's patching helpers and the
prior art's one-or-two-full-passes-per-node algorithm, measured in one process.

    python benchmarks/sweeps.py            # GPT-2-small shape (random weights) and SmolLM2-135M
    python benchmarks/sweeps.py --quick    # one repeat, small model: checks that it runs

For each sweep it prints the median wall time of each method over the repeats, their ratio,
and the transformer-block evaluations performed (one block on one copy of the batch) against
the minimum the sweep needs (a patch at layer l needs blocks l and later only).
"""

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from transformer_lens_patching import IterNode, Node, act_patch, path_patch  # noqa: E402

BATCH, SEQ_LEN = 8, 15


def gpt2_small_shape(tokenizer, quick: bool):
    """A random GPT-2-small-shaped TransformerBridge (12 layers, 12 heads, d_model 768)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    size = dict(n_layer=4, n_head=4, n_embd=128) if quick else dict(n_layer=12, n_head=12, n_embd=768)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, **size)).eval()
    model = TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=tokenizer, device="cpu")
    model.enable_compatibility_mode()
    return model


class BlockCounter:
    """Counts block evaluations: each firing of `blocks.L.hook_resid_pre` on `rows` rows is
    rows / batch evaluations of one block on one copy of the batch."""

    def __init__(self, model):
        self.model = model
        self.count = 0.0
        self.handles = []

    def __enter__(self):
        for layer in range(self.model.cfg.n_layers):
            hook_point = self.model.hook_dict[f"blocks.{layer}.hook_resid_pre"]
            self.handles.append(hook_point.register_forward_hook(self._count))
        return self

    def _count(self, module, inputs, output):
        self.count += output.shape[0] / BATCH

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def timed(function: Callable, repeats: int, model) -> tuple[float, float]:
    """Median seconds over `repeats` runs, and the block evaluations of one run."""
    times = []
    for _ in range(repeats):
        with BlockCounter(model) as counter:
            start = time.perf_counter()
            with torch.no_grad():
                function()
            times.append(time.perf_counter() - start)
    return statistics.median(times), counter.count


def prior_art_path_patch(model, orig, new, senders, receivers, metric):
    """The prior art's direct_includes_mlps=True: per sender, a pass with heads frozen, then a
    pass patching the receivers; every pass a full forward on one batch."""
    with torch.no_grad():
        _, orig_cache = model.run_with_cache(orig)
        _, new_cache = model.run_with_cache(new)
    results = []
    for layer, head in senders:
        recorded = {}

        def freeze(act, hook, frozen_layer):
            out = orig_cache[f"blocks.{frozen_layer}.attn.hook_z"].clone()
            if frozen_layer == layer:
                out[:, :, head] = new_cache[f"blocks.{layer}.attn.hook_z"][:, :, head]
            return out

        hooks = [(f"blocks.{i}.attn.hook_z", lambda act, hook, i=i: freeze(act, hook, i)) for i in range(model.cfg.n_layers)]
        hooks += [(name, lambda act, hook, name=name: recorded.setdefault(name, act.clone())) for name, _ in receivers]
        with torch.no_grad():
            model.run_with_hooks(orig, fwd_hooks=hooks)

        def patch(act, hook, name, index):
            out = act.clone()
            out[index] = recorded[name][index]
            return out

        patches = [(name, lambda act, hook, name=name, index=index: patch(act, hook, name, index)) for name, index in receivers]
        with torch.no_grad():
            results.append(metric(model.run_with_hooks(orig, fwd_hooks=patches)))
    return torch.stack(results)


def prior_art_direct_path_patch(model, orig, new, senders, receiver_layer, receiver_heads, metric):
    """The prior art's direct_includes_mlps=False: per sender, one full pass adding
    `(z_new - z_orig) @ W_O` to the receivers' per-head query inputs."""
    with torch.no_grad():
        _, orig_cache = model.run_with_cache(orig)
        _, new_cache = model.run_with_cache(new)
        w_o = model.W_O
    results = []
    model.set_use_split_qkv_input(True)
    try:
        for layer, head in senders:
            z = f"blocks.{layer}.attn.hook_z"
            delta = (new_cache[z] - orig_cache[z])[:, :, head] @ w_o[layer, head]
            active = layer < receiver_layer

            def add(act, hook, delta=delta, active=active):
                out = act.clone()
                if active:
                    out[:, :, receiver_heads] += delta.unsqueeze(2)
                return out

            with torch.no_grad():
                results.append(metric(model.run_with_hooks(orig, fwd_hooks=[(f"blocks.{receiver_layer}.hook_q_input", add)])))
    finally:
        model.set_use_split_qkv_input(False)
    return torch.stack(results)


def one_forward_per_neuron(model, orig, new_cache, layer, neurons, metric):
    name = f"blocks.{layer}.mlp.hook_post"
    results = []
    for neuron in neurons:
        def patch(act, hook, neuron=neuron):
            out = act.clone()
            out[..., neuron] = new_cache[name][..., neuron]
            return out

        with torch.no_grad():
            results.append(metric(model.run_with_hooks(orig, fwd_hooks=[(name, patch)])))
    return torch.stack(results)


def macs_per_token(model) -> tuple[float, float]:
    """Multiply-adds per token of one block and of the unembedding (attention scores ignored)."""
    cfg = model.cfg
    attention = 2 * cfg.d_model * cfg.n_heads * cfg.d_head + 2 * cfg.d_model * (cfg.n_key_value_heads or cfg.n_heads) * cfg.d_head
    mlp = (3 if getattr(cfg, "gated_mlp", False) else 2) * cfg.d_model * cfg.d_mlp
    return attention + mlp, cfg.d_model * cfg.d_vocab


def bound(model, layers_per_cell: list[int]) -> float:
    """Speed-up bound of skipping blocks before each patch, against full forwards."""
    block, unembed = macs_per_token(model)
    full = model.cfg.n_layers * block + unembed
    needed = [(model.cfg.n_layers - layer) * block + unembed for layer in layers_per_cell]
    return full * len(needed) / sum(needed)


def path_bound(model, sender_layers: list[int], receiver_layer: int | None, mlps_direct: bool) -> float:
    """Speed-up bound for path patching each sender into receivers at `receiver_layer`
    (None: the final residual stream), against the prior art's full passes.

    Pass 1 needs only the MLPs between the sender and the receiver (every head is frozen);
    pass 2 needs the blocks from the receiver on. Without MLPs, one pass from the receiver on.
    """
    cfg = model.cfg
    block, unembed = macs_per_token(model)
    mlp = (3 if getattr(cfg, "gated_mlp", False) else 2) * cfg.d_model * cfg.d_mlp
    full = cfg.n_layers * block + unembed
    start = cfg.n_layers if receiver_layer is None else receiver_layer
    after_receiver = (cfg.n_layers - start) * block + unembed
    prior, needed = 0.0, 0.0
    for layer in sender_layers:
        prior += (2 if mlps_direct else 1) * full
        if layer < start:
            needed += ((start - layer) * mlp if mlps_direct else 0) + after_receiver
    return prior / needed


def path_minimum(model, sender_layers: list[int], receiver_layer: int | None, mlps_direct: bool) -> int:
    """Minimum block evaluations: pass 1 from the sender's layer to the receiver's (MLPs only),
    pass 2 from the receiver's layer on; senders at or after the receiver need nothing."""
    start = model.cfg.n_layers if receiver_layer is None else receiver_layer
    reaching = [layer for layer in sender_layers if layer < start]
    pass_one = sum(start - layer for layer in reaching) if mlps_direct else 0
    return pass_one + len(reaching) * (model.cfg.n_layers - start)


def report(name: str, ours: tuple[float, float], theirs: tuple[float, float], minimum: float, arithmetic: float) -> None:
    (t_ours, b_ours), (t_theirs, b_theirs) = ours, theirs
    print(f"{name}\n  ours {t_ours:7.2f} s  baseline {t_theirs:7.2f} s  speed-up {t_theirs / t_ours:5.2f}x "
          f"(arithmetic bound {arithmetic:.2f}x)\n  block evaluations: ours {b_ours:.0f}, baseline {b_theirs:.0f}, "
          f"minimum {minimum:.0f}")  # fmt: skip


def run(model, label: str, repeats: int) -> None:
    from transformer_lens import patching

    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    generator = torch.Generator().manual_seed(0)
    orig = torch.randint(100, 20000, (BATCH, SEQ_LEN), generator=generator)
    new = torch.randint(100, 20000, (BATCH, SEQ_LEN), generator=generator)
    with torch.no_grad():
        _, new_cache = model.run_with_cache(new)

    def metric(logits):
        return (logits[:, -1, 5] - logits[:, -1, 6]).mean()

    print(f"\n== {label}: {n_layers} layers, {n_heads} heads, d_model {model.cfg.d_model}, batch {BATCH} x {SEQ_LEN} ==")
    head_layers = [layer for layer in range(n_layers) for _ in range(n_heads)]
    report(
        'act_patch IterNode("z") vs get_act_patch_attn_head_out_all_pos',
        timed(lambda: act_patch(model, orig, IterNode("z"), metric, new_input=new), repeats, model),
        timed(lambda: patching.get_act_patch_attn_head_out_all_pos(model, orig, new_cache, metric), repeats, model),
        sum(n_layers - layer for layer in head_layers), bound(model, head_layers),
    )
    block_layers = [layer for _ in range(3) for layer in range(n_layers) for _ in range(SEQ_LEN)]
    report(
        'act_patch IterNode(["resid_pre", "attn_out", "mlp_out"], seq_pos="each") vs get_act_patch_block_every',
        timed(lambda: act_patch(model, orig, IterNode(["resid_pre", "attn_out", "mlp_out"], seq_pos="each"), metric,
                                new_input=new), repeats, model),
        timed(lambda: patching.get_act_patch_block_every(model, orig, new_cache, metric), repeats, model),
        sum(n_layers - layer for layer in block_layers), bound(model, block_layers),
    )
    senders = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    last = n_layers - 1
    head_layers = [layer for layer, _ in senders]
    report(
        f'path_patch IterNode("z") -> resid_post {last}, MLPs direct, vs two full passes per sender',
        timed(lambda: path_patch(model, orig, new, IterNode("z"), Node("resid_post", last), metric), repeats, model),
        timed(lambda: prior_art_path_patch(model, orig, new, senders, [(f"blocks.{last}.hook_resid_post", (slice(None),))],
                                           metric), repeats, model),
        path_minimum(model, head_layers, None, True), path_bound(model, head_layers, None, True),
    )
    receiver_layer = min(9, n_layers - 1)
    heads = list(range(min(3, n_heads)))
    receivers = [Node("q", receiver_layer, head=h) for h in heads]
    receiver_hooks = [(f"blocks.{receiver_layer}.attn.hook_q", (slice(None), slice(None), h)) for h in heads]
    for direct in (True, False):
        report(
            f"path_patch IterNode(\"z\") -> q of {len(heads)} layer-{receiver_layer} heads, direct_includes_mlps={direct}",
            timed(lambda: path_patch(model, orig, new, IterNode("z"), receivers, metric, direct_includes_mlps=direct),
                  repeats, model),
            timed(lambda: prior_art_path_patch(model, orig, new, senders, receiver_hooks, metric) if direct
                  else prior_art_direct_path_patch(model, orig, new, senders, receiver_layer, heads, metric), repeats, model),
            path_minimum(model, head_layers, receiver_layer, direct), path_bound(model, head_layers, receiver_layer, direct),
        )
    layer = n_layers // 2
    neurons = list(range(min(256, model.cfg.d_mlp)))
    report(
        f'act_patch IterNode("post", layers=[{layer}]) on {len(neurons)} neurons vs one forward per neuron',
        timed(lambda: act_patch(model, orig, IterNode("post", layers=[layer], neurons=neurons), metric, new_input=new),
              repeats, model),
        timed(lambda: one_forward_per_neuron(model, orig, new_cache, layer, neurons, metric), repeats, model),
        len(neurons) * (n_layers - layer), bound(model, [layer] * len(neurons)),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat on a small model: a smoke test")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from transformer_lens_patching.embedded_model import hf_folder, load_smollm2

    torch.set_num_threads(os.cpu_count() or 1)
    repeats = 1 if args.quick else args.repeats
    tokenizer = AutoTokenizer.from_pretrained(str(hf_folder()))
    run(gpt2_small_shape(tokenizer, args.quick), "GPT-2-small shape, random weights", repeats)
    if not args.quick:
        run(load_smollm2(), "SmolLM2-135M", repeats)


if __name__ == "__main__":
    sys.exit(main())
