"""A tracr-compiled model as a TransformerLens 2 HookedTransformer, and its compile step.

`scripts/compile_tracr.py` runs in a separate virtual environment that holds tracr and jax
(`requirements/tracr.txt`; the package's own environments never get jax): the environment
variable TLP_TRACR_PYTHON names its python. It writes the compiled weights, the residual
stream's labels, the token encodings and tracr's own outputs on every input to an npz file,
kept under ~/.cache/transformer_lens_patching/tracr/ under a key of everything that decides it
(`compile_key`: the script, the tracr environment's Python and installed packages, the platform
and the processor), so no test reads a compile made by another version or on another machine.

tracr's model is a stack of layers, each an attention block then an MLP, with no LayerNorm,
ReLU MLPs, bidirectional attention scaled by 1/sqrt(key_size), one-hot embeddings and an
unembedding that projects onto the output SOp's directions: a HookedTransformer with
normalization_type=None and attention_dir="bidirectional" computes the same function.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compile_tracr.py"
CACHE = Path.home() / ".cache" / "transformer_lens_patching" / "tracr"
COMPILE_TIMEOUT = 900
BLOCK_KEYS = ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O")
MLP_KEYS = ("W_in", "b_in", "W_out", "b_out")


@dataclass(frozen=True)
class TracrModel:
    """The converted model with what tracr says about it.

    Attributes:
        model: The HookedTransformer.
        labels: The residual stream's directions, as tracr names them ("tokens:2", "one", ...).
        arrays: Everything the compile script saved (weights, encodings, inputs, outputs).
    """

    model: object
    labels: tuple[str, ...]
    arrays: dict

    def token_ids(self, values) -> torch.Tensor:
        """(batch, 1 + len) token ids of BOS followed by each sequence of vocabulary values."""
        encoding = dict(zip(self.arrays["input_names"].tolist(), self.arrays["input_ids"].tolist()))
        return torch.tensor([[encoding["BOS"]] + [encoding[str(v)] for v in row] for row in values])


def tracr_python() -> str | None:
    """The tracr environment's python (TLP_TRACR_PYTHON), or None when it is not set up."""
    python = os.environ.get("TLP_TRACR_PYTHON")
    return python if python and os.access(python, os.X_OK) else None


ENVIRONMENT = (
    "import importlib.metadata as m, platform, sys; "
    "print(sys.version, platform.platform(), *sorted(f'{d.name}=={d.version}' for d in m.distributions()))"
)
"""Prints what the tracr environment is: its Python, its platform and every installed package's version."""


def processor() -> str:
    """The processor's model and features (which decide how jax's kernels round), where Linux says them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def compile_key(python: str) -> str:
    """A digest of everything that decides the compiled npz: the compile script, the tracr
    environment (Python, platform, installed packages) and the processor."""
    environment = subprocess.run([python, "-c", ENVIRONMENT], check=True, capture_output=True, text=True).stdout
    parts = (SCRIPT.read_bytes(), environment.encode(), platform.machine().encode(), processor().encode())
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def compiled_npz(python: str) -> Path:
    """The compile script's npz, compiled with `python` unless the cache holds one made with the
    same `compile_key`."""
    path = CACHE / f"sort-{compile_key(python)}.npz"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
    done = subprocess.run(
        [python, str(SCRIPT), str(partial)],
        check=False,
        capture_output=True,
        text=True,
        timeout=COMPILE_TIMEOUT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    if done.returncode:
        raise RuntimeError(f"{SCRIPT.name} failed with {python} (exit {done.returncode}):\n{done.stderr[-4000:]}")
    print(done.stdout.strip(), file=sys.stderr)
    partial.replace(path)
    return path


def load(path: Path) -> TracrModel:
    """The HookedTransformer holding the weights of the compile script's npz."""
    arrays = dict(np.load(path))
    return TracrModel(hooked_transformer(arrays), tuple(arrays["residual_labels"].tolist()), arrays)


def hooked_transformer(arrays: dict):
    """A HookedTransformer (TransformerLens 2) with the compiled weights, in float32 as tracr runs."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    n_layers = int(arrays["n_layers"])
    config = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=int(arrays["d_model"]),
        n_heads=int(arrays["n_heads"]),
        d_head=int(arrays["d_head"]),
        d_mlp=int(arrays["d_mlp"]),
        d_vocab=arrays["W_E"].shape[0],
        d_vocab_out=arrays["W_U"].shape[1],
        n_ctx=arrays["W_pos"].shape[0],
        act_fn="relu",
        normalization_type=None,
        attention_dir="bidirectional",
        positional_embedding_type="standard",
        default_prepend_bos=False,
        dtype=torch.float32,
        device="cpu",
        seed=0,
    )
    model = HookedTransformer(config)
    state = {
        "embed.W_E": arrays["W_E"],
        "pos_embed.W_pos": arrays["W_pos"],
        "unembed.W_U": arrays["W_U"],
        "unembed.b_U": np.zeros(arrays["W_U"].shape[1]),
    }
    for layer in range(n_layers):
        state |= {f"blocks.{layer}.attn.{key}": arrays[f"{layer}.{key}"] for key in BLOCK_KEYS}
        state |= {f"blocks.{layer}.mlp.{key}": arrays[f"{layer}.{key}"] for key in MLP_KEYS}
    tensors = {key: torch.tensor(np.asarray(value), dtype=torch.float32) for key, value in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    leftover = [key for key in missing if not key.endswith((".mask", ".IGNORE"))]
    if leftover or unexpected:
        raise RuntimeError(
            f"The tracr weights do not fit HookedTransformer: missing {leftover}, unexpected {unexpected}."
        )
    return model.eval()
