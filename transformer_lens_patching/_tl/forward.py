"""Forward passes: with hooks, from a later layer, without some attention, only the unembedding, or timed."""

import time
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import torch

from .devices import layer_device, model_device, moved, norm_device, output_device
from .version import TL_MAJOR


@contextmanager
def hooks(model, fwd_hooks: list) -> Iterator[None]:
    """Add `fwd_hooks` for the duration of the block; remove exactly those afterwards."""
    with model.hooks(fwd_hooks=fwd_hooks, reset_hooks_end=True):
        yield


def hooks_that_fire(model, names: list[str]) -> set[str]:
    """Which of the hooks `names` fire in a forward pass (of one token, without gradients):
    a bridge may list a hook that its architecture never calls. Probed once per model and
    names (what an architecture calls does not change)."""
    probed = _FIRED.setdefault(model, {})
    key = tuple(sorted(names))
    if key not in probed:
        fired: set[str] = set()
        record = [(name, lambda activation, hook, name=name: fired.add(name)) for name in names]
        token = torch.zeros((1, 1), dtype=torch.long, device=model_device(model))
        with torch.no_grad(), hooks(model, record):
            model(token)
        probed[key] = fired
    return set(probed[key])


def scale_edit_failure(model) -> str | None:
    """Why the model cannot run with its norms' `hook_scale` edited (TransformerLens 4's bridge of a
    norm without a weight, such as OLMo's, fails to recompute the norm from an edited scale), or None.
    Probed once per model, on one token."""
    if model not in _SCALE_EDITS:
        edit = [(name, lambda scale, hook: scale.clone()) for name in model.hook_dict if name.endswith("hook_scale")]
        token = torch.zeros((1, 1), dtype=torch.long, device=model_device(model))
        try:
            with torch.no_grad(), hooks(model, edit), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model(token)
            _SCALE_EDITS[model] = None
        except (AttributeError, RuntimeError) as error:
            _SCALE_EDITS[model] = f"{type(error).__name__}: {error}"
    return _SCALE_EDITS[model]


_SCALE_EDITS: "weakref.WeakKeyDictionary[object, str | None]" = weakref.WeakKeyDictionary()


_FIRED: "weakref.WeakKeyDictionary[object, dict[tuple[str, ...], set[str]]]" = weakref.WeakKeyDictionary()
"""Per model: the hooks found to fire, per tuple of names probed."""


def forward_logits(model, model_input: torch.Tensor, start_layer: int = 0) -> torch.Tensor:
    """The model's logits: from tokens, or from `model_input` = the residual stream entering
    `start_layer` (0 < start_layer < n_layers; see `can_start_late`) without computing the
    layers before it; that residual stream is moved to the device of `start_layer` first."""
    if start_layer == 0:
        return model(model_input, return_type="logits")
    model_input = moved(model_input, layer_device(model, start_layer))
    if TL_MAJOR >= 4:
        with _blocks_skipped(model, start_layer):
            return model(model_input, start_at_layer=start_layer)
    return model(model_input, start_at_layer=start_layer)


class _EndOfLayers(Exception):
    """Raised at the last layer's output: a timed pass need not unembed."""


def time_layers(model, tokens: torch.Tensor, copies: int) -> float:
    """The seconds one layer takes on one copy of `tokens` when `copies` of them are stacked, as
    plans stack variants: from the residual stream entering the first layer to the one leaving
    the last (the pass stops there), the median of three passes after one that warms up."""
    n_layers = model.cfg.n_layers
    marks: list[float] = []

    def mark(activation, hook):
        if activation.is_cuda:
            torch.cuda.synchronize(activation.device)
        marks.append(time.perf_counter())

    def mark_and_stop(activation, hook):
        mark(activation, hook)
        raise _EndOfLayers

    ends = [("blocks.0.hook_resid_pre", mark), (f"blocks.{n_layers - 1}.hook_resid_post", mark_and_stop)]
    stacked = tokens.repeat(copies, 1)
    with torch.no_grad(), hooks(model, ends):
        for _ in range(4):
            with suppress(_EndOfLayers):
                forward_logits(model, stacked)
    timed = sorted(end - start for start, end in zip(marks[2::2], marks[3::2]))
    return timed[1] / (n_layers * copies)


def unembed(model, residual: torch.Tensor) -> torch.Tensor:
    """Logits from the final residual stream: the final LayerNorm, the unembedding (each on
    its own device) and the model's own transform of its output (`output_transform`)."""
    residual = moved(residual, norm_device(model))
    if TL_MAJOR >= 4:
        return output_transform(model, model.unembed(moved(model.ln_final(residual), output_device(model))))
    return model(residual, start_at_layer=model.cfg.n_layers)


def output_transform(model, logits: torch.Tensor) -> torch.Tensor:
    """What the model does to its unembedding's output, elementwise: Gemma-2's soft cap
    (cap * tanh(logits / cap)), Cohere's and Granite's scaling; the identity on most models.
    TransformerLens 4 bridges say it through their adapter; HookedTransformer has the soft cap
    (`cfg.output_logits_soft_cap`) alone."""
    if TL_MAJOR >= 4:
        transform = getattr(getattr(model, "adapter", None), "apply_output_logits_transform", None)
        return logits if transform is None else transform(logits)
    cap = float(getattr(model.cfg, "output_logits_soft_cap", 0.0) or 0.0)
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


def final_norm(model, residual: torch.Tensor) -> torch.Tensor:
    """The final LayerNorm (or RMSNorm) of `residual`, which may hold any subset of positions,
    on the norm's device; the identity on models without one."""
    norm = getattr(model, "ln_final", None)
    return residual if norm is None else norm(moved(residual, norm_device(model)))


def output_hooked(model) -> bool:
    """Whether hooks (e.g. the user's) are attached to the final norm or the unembedding:
    they may expect full logits, so those must then be computed."""
    return any(point.fwd_hooks for name, point in model.hook_dict.items() if name.startswith(("ln_final.", "unembed.")))


def unembed_columns(model, token_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The unembedding's weight (d_model, n) and bias (n,) for `token_ids` (None: all tokens),
    on the unembedding's device."""
    weight, bias = model.W_U, model.b_U
    if token_ids is None:
        return weight, bias
    token_ids = moved(token_ids, weight.device)
    return weight[:, token_ids], bias.to(weight.device)[token_ids]


def can_start_late(model) -> bool:
    """Whether a forward pass can start at a later layer without running the ones before.

    HookedTransformer can, except with shortformer positions (its `start_at_layer` passes give the
    blocks no positional embeddings); of TransformerLens 4 bridges, those over a Hugging Face model
    (`boot_transformers`) can, except with ALiBi positions (Bloom, whose blocks cannot be
    skipped one by one), and native ones (`boot_native`) run every block.
    """
    if TL_MAJOR < 4:
        return getattr(model.cfg, "positional_embedding_type", None) != "shortformer"
    from transformers import PreTrainedModel

    alibi = getattr(model.cfg, "positional_embedding_type", None) == "alibi"
    return isinstance(model.original_model, PreTrainedModel) and not alibi


def enters_final_residual(model) -> bool:
    """Whether a pass can start at the final residual stream and run only the unembedding: its hook
    (`blocks.{n_layers - 1}.hook_resid_post`) fires, so the orig run's value can be cached (the
    bridge of post-LN OpenAI GPT lists it but never calls it)."""
    name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    return name in hooks_that_fire(model, [name])


@contextmanager
def attention_replaced(model, layers) -> Iterator[None]:
    """Skip the attention of `layers`: each returns zeros, which the `hook_attn_out` hooks
    of whoever replaced it then fill in. Only for models where `can_start_late`."""
    if not layers:
        yield
        return
    attentions = [model.blocks[layer].attn for layer in sorted(layers)]
    for attention in attentions:
        object.__setattr__(attention, "forward", _zero_attention(attention, model.cfg.d_model))
    try:
        yield
    finally:
        for attention in attentions:
            attention.__dict__.pop("forward", None)


def _zero_attention(attention, d_model: int):
    def forward(*args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("query_input"))
        zeros = hidden.new_zeros(*hidden.shape[:2], d_model)
        if TL_MAJOR >= 4:
            return attention.hook_out(zeros), None
        return zeros

    return forward


def _pass_through(*args, **kwargs):
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def _blocks_skipped(model, count: int) -> Iterator[None]:
    """Make the first `count` blocks return their input unchanged.

    TransformerLens 4.3's `start_at_layer` still runs the blocks before it and then discards
    their output; skipping them is what makes starting late cheaper. The override goes into
    the block's own `__dict__`: the bridge's `__setattr__` would forward it to the wrapped
    Hugging Face module.
    """
    blocks = list(model.blocks)[:count]
    for block in blocks:
        object.__setattr__(block, "forward", _pass_through)
    try:
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
