"""IOI quickstart: activation and path patching on the embedded SmolLM2-135M, offline.

Runs the indirect-object-identification experiment on 8 prompts ("When John and Mary went
to the shops, John gave the bag to" -> " Mary"): activation patching of every head's
output (denoising: corrupted run, clean values patched in), then path patching from every
head to the final residual stream (noising), and prints the heads that matter most.

    python demos/ioi_quickstart.py
"""

import time

import torch

from transformer_lens_patching import IterNode, Node, act_patch, path_patch
from transformer_lens_patching.embedded_model import load_smollm2
from transformer_lens_patching.ioi import example_prompts
from transformer_lens_patching.metrics import logit_diff

def top_heads(result, k=5):
    """The k (layer, head) cells with the largest absolute effect, with their values."""
    flat = result.as_tensor().flatten()
    order = flat.abs().argsort(descending=True)[:k]
    n_heads = result.shape[1]
    return [((int(i) // n_heads, int(i) % n_heads), float(flat[i])) for i in order]


def main():
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    model = load_smollm2()
    clean, corrupted, answers = example_prompts(model)
    clean_ld = float(logit_diff(model(clean), answers))
    corrupted_ld = float(logit_diff(model(corrupted), answers))
    print(f"SmolLM2-135M: clean logit diff {clean_ld:.3f}, corrupted {corrupted_ld:.3f} ({len(clean)} prompts)")

    def recovered(logits):
        return (logit_diff(logits, answers) - corrupted_ld) / (clean_ld - corrupted_ld)

    heads = act_patch(model, corrupted, IterNode("z"), recovered, new_input=clean, verbose=True)["z"]
    print(f"\nActivation patching, head outputs {heads.dims} (fraction of the clean logit diff recovered):")
    for (layer, head), value in top_heads(heads):
        print(f"  head {layer}.{head}: {value:+.3f}")

    def damage(logits):
        return (logit_diff(logits, answers) - clean_ld) / (clean_ld - corrupted_ld)

    last = model.cfg.n_layers - 1
    paths = path_patch(model, clean, corrupted, IterNode("z"), Node("resid_post", last), damage, verbose=True)["z"]
    print(f"\nPath patching, each head -> resid_post {last} (change as a fraction of clean - corrupted):")
    for (layer, head), value in top_heads(paths):
        print(f"  head {layer}.{head}: {value:+.3f}")
    print(f"\nDone in {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
