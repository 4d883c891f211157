"""A naive reference for RelP (relevance patching, Jafari et al. 2025), for TransformerLens 2.

RelP is attribution patching with the metric's gradient replaced by a relevance gradient:
the orig run's backward pass with these local Jacobians replaced (the rest is the ordinary
gradient): every norm's scale is a constant; the attention pattern is a constant; an MLP
activation's derivative is `post / pre`; a gated MLP's product `p = act(gate) * up` sends
`0.5 * p / gate` to the gate and `0.5 * p / up` to `up` (0 where the denominator is 0).

`relevance_gradients` walks back from the logits layer by layer by hand with the model's
weights and the orig run's cache. `rules=False` uses the true local Jacobians instead (the
norm scale's dependence on its input, the activation's derivative, the product rule, the
softmax into queries and keys, rotary embeddings): the ordinary gradient, to check the walk.
Nothing here uses the library.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SUPPORTED_NORMS = (None, "LN", "LNPre", "RMS", "RMSPre")
SUPPORTED_ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "silu", "relu")


def hook_names(n_layers: int) -> list[str]:
    """The hooks whose relevance gradients `relevance_gradients` returns."""
    names = []
    for layer in range(n_layers):
        names += [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_resid_pre"]
    return names


def check_supported(model) -> None:
    """Refuse configurations the walk does not model."""
    cfg = model.cfg
    unsupported = {
        "normalization_type": cfg.normalization_type not in SUPPORTED_NORMS,
        "act_fn": not cfg.attn_only and cfg.act_fn not in SUPPORTED_ACTS,
        "positional_embedding_type": cfg.positional_embedding_type not in ("standard", "rotary"),
        "parallel_attn_mlp": cfg.parallel_attn_mlp,
        "use_normalization_before_and_after": cfg.use_normalization_before_and_after,
        "use_qk_norm": getattr(cfg, "use_qk_norm", False),
        "attn_scores_soft_cap": cfg.attn_scores_soft_cap > 0,
        "output_logits_soft_cap": cfg.output_logits_soft_cap > 0,
        "attention_dir": cfg.attention_dir != "causal",
        "use_split_qkv_input": cfg.use_split_qkv_input or cfg.use_attn_in,
        "ungroup_grouped_query_attention": getattr(cfg, "ungroup_grouped_query_attention", False),
    }
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise NotImplementedError(f"relp_reference does not model: {', '.join(bad)}")


def ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, 0 where the denominator is 0."""
    zero = denominator == 0
    return torch.where(zero, torch.zeros_like(numerator), numerator / torch.where(zero, 1.0, denominator))


def activation(name: str, x: Tensor) -> Tensor:
    """The MLP activation, written out."""
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if name == "gelu":
        return x * 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    if name == "silu":
        return x * torch.sigmoid(x)
    if name == "relu":
        return x.clamp(min=0)
    raise NotImplementedError(name)


def activation_derivative(name: str, x: Tensor) -> Tensor:
    """The MLP activation's true derivative, written out."""
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        c = math.sqrt(2 / math.pi)
        t = torch.tanh(c * (x + 0.044715 * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * c * (1 + 3 * 0.044715 * x**2)
    if name == "gelu":
        return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-(x**2) / 2) / math.sqrt(2 * math.pi)
    if name == "silu":
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    if name == "relu":
        return (x > 0).to(x.dtype)
    raise NotImplementedError(name)


def norm_backward(model, norm, x: Tensor, scale: Tensor, grad_out: Tensor, rules: bool) -> Tensor:
    """The gradient at a norm's input `x` from the gradient at its output.

    LN: y = w * (x - mean(x)) / scale + b; RMS: y = w * x / scale; the "Pre" kinds have no w, b.
    With rules the scale is a constant; without, its dependence on x is differentiated too.
    """
    kind = model.cfg.normalization_type
    if kind is None:
        return grad_out
    centred = kind in ("LN", "LNPre")
    grad_hat = grad_out * norm.w if kind in ("LN", "RMS") else grad_out
    if centred:
        x = x - x.mean(-1, keepdim=True)
    if rules:
        grad_x = grad_hat / scale
    else:
        x_hat = x / scale
        grad_x = (grad_hat - x_hat * (grad_hat * x_hat).mean(-1, keepdim=True)) / scale
    if centred:
        grad_x = grad_x - grad_x.mean(-1, keepdim=True)
    return grad_x


def rotate(x: Tensor, adjacent_pairs: bool) -> Tensor:
    """TransformerLens's rotary helper: pairs (x_a, x_b) become (-x_b, x_a)."""
    out = torch.empty_like(x)
    if adjacent_pairs:
        out[..., ::2] = -x[..., 1::2]
        out[..., 1::2] = x[..., ::2]
    else:
        n = x.shape[-1] // 2
        out[..., :n] = -x[..., n:]
        out[..., n:] = x[..., :n]
    return out


def rotary_backward(model, attn, grad_rotated: Tensor) -> Tensor:
    """The gradient at q (or k) before rotary from the gradient after it.

    Forward: x_rot * cos + rotate(x_rot) * sin on the first rotary_dim dims; rotate's
    transpose is minus itself, so the backward is g * cos - rotate(g * sin).
    """
    r = model.cfg.rotary_dim
    n_pos = grad_rotated.shape[1]
    cos = attn.rotary_cos[None, :n_pos, None, :]
    sin = attn.rotary_sin[None, :n_pos, None, :]
    g = grad_rotated[..., :r]
    back = g * cos - rotate(g * sin, model.cfg.rotary_adjacent_pairs)
    return torch.cat([back, grad_rotated[..., r:]], dim=-1)


def kv_weights(attn, name: str) -> Tensor:
    """W_K or W_V per key/value head (n_kv, d_model, d_head): GroupedQueryAttention keeps them in _W_K, _W_V."""
    return getattr(attn, f"_{name}") if hasattr(attn, f"_{name}") else getattr(attn, name)


def per_kv_head(per_head: Tensor, n_kv: int) -> Tensor:
    """Sum (batch, pos, head, d) over the query heads sharing each key/value head (repeat_interleave's transpose)."""
    batch, n_pos, n_heads, d = per_head.shape
    return per_head.reshape(batch, n_pos, n_kv, n_heads // n_kv, d).sum(3)


def mlp_backward(model, layer: int, cache, grad_post: Tensor, rules: bool) -> Tensor:
    """The gradient at the MLP's input (ln2's output) from the gradient at hook_post."""
    mlp = model.blocks[layer].mlp
    act = model.cfg.act_fn
    pre = cache[f"blocks.{layer}.mlp.hook_pre"]
    post = cache[f"blocks.{layer}.mlp.hook_post"]
    if model.cfg.gated_mlp:
        up = cache[f"blocks.{layer}.mlp.hook_pre_linear"]
        if rules:
            product = post - mlp.b_in
            grad_gate = grad_post * 0.5 * ratio(product, pre)
            grad_up = grad_post * 0.5 * ratio(product, up)
        else:
            grad_gate = grad_post * activation_derivative(act, pre) * up
            grad_up = grad_post * activation(act, pre)
        return grad_gate @ mlp.W_gate.T + grad_up @ mlp.W_in.T
    local = ratio(post, pre) if rules else activation_derivative(act, pre)
    return (grad_post * local) @ mlp.W_in.T


def attention_backward(model, layer: int, cache, grad_z: Tensor, rules: bool) -> Tensor:
    """The gradient at the attention's input (ln1's output) from the gradient at hook_z.

    z[b, q, h] = sum_k pattern[b, h, q, k] v[b, k, h // rep]; with rules the pattern is a
    constant, without it the gradient also goes through the softmax, the scores, rotary, q and k.
    """
    attn = model.blocks[layer].attn
    n_heads = model.cfg.n_heads
    n_kv = model.cfg.n_key_value_heads or n_heads
    rep = n_heads // n_kv
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
    grad_v = per_kv_head(torch.einsum("bhqk,bqhe->bkhe", pattern, grad_z), n_kv)
    grad_in = torch.einsum("bkge,gde->bkd", grad_v, kv_weights(attn, "W_V"))
    if rules:
        return grad_in
    rotary = model.cfg.positional_embedding_type == "rotary"
    q = cache[f"blocks.{layer}.attn.hook_rot_q" if rotary else f"blocks.{layer}.attn.hook_q"]
    k = cache[f"blocks.{layer}.attn.hook_rot_k" if rotary else f"blocks.{layer}.attn.hook_k"]
    v = cache[f"blocks.{layer}.attn.hook_v"]
    grad_pattern = torch.einsum("bqhe,bkhe->bhqk", grad_z, v.repeat_interleave(rep, dim=2))
    grad_scores = pattern * (grad_pattern - (pattern * grad_pattern).sum(-1, keepdim=True))
    grad_q = torch.einsum("bhqk,bkhe->bqhe", grad_scores, k.repeat_interleave(rep, dim=2)) / attn.attn_scale
    grad_k = per_kv_head(torch.einsum("bhqk,bqhe->bkhe", grad_scores, q) / attn.attn_scale, n_kv)
    if rotary:
        grad_q = rotary_backward(model, attn, grad_q)
        grad_k = rotary_backward(model, attn, grad_k)
    grad_in = grad_in + torch.einsum("bqhe,hde->bqd", grad_q, attn.W_Q)
    return grad_in + torch.einsum("bkge,gde->bkd", grad_k, kv_weights(attn, "W_K"))


@torch.no_grad()
def relevance_gradients(model, tokens: Tensor, metric, rules: bool = True) -> dict[str, Tensor]:
    """The relevance gradient (rules=True) or the true gradient (rules=False) of `metric` (one
    number) at every layer's `attn.hook_z`, `mlp.hook_post` and `hook_resid_pre` in the run of
    `tokens`, keyed by hook name."""
    check_supported(model)
    cfg = model.cfg
    logits, cache = model.run_with_cache(tokens)
    with torch.enable_grad():
        leaf = logits.detach().requires_grad_(True)
        value = metric(leaf)
        if value.numel() != 1:
            raise ValueError("the metric must return one number")
        (grad,) = torch.autograd.grad(value.sum(), leaf)
    grads = {}
    grad = grad @ model.W_U.T
    last = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
    grad = norm_backward(model, model.ln_final, cache[last], cache.cache_dict.get("ln_final.hook_scale"), grad, rules)
    for layer in reversed(range(cfg.n_layers)):
        block = model.blocks[layer]
        if not cfg.attn_only:
            grad_post = grad @ block.mlp.W_out.T
            grads[f"blocks.{layer}.mlp.hook_post"] = grad_post
            grad_ln2 = mlp_backward(model, layer, cache, grad_post, rules)
            mid = cache[f"blocks.{layer}.hook_resid_mid"]
            scale = cache.cache_dict.get(f"blocks.{layer}.ln2.hook_scale")
            grad = grad + norm_backward(model, block.ln2, mid, scale, grad_ln2, rules)
        grad_z = torch.einsum("bpd,hed->bphe", grad, block.attn.W_O)
        grads[f"blocks.{layer}.attn.hook_z"] = grad_z
        grad_ln1 = attention_backward(model, layer, cache, grad_z, rules)
        resid_pre = cache[f"blocks.{layer}.hook_resid_pre"]
        scale = cache.cache_dict.get(f"blocks.{layer}.ln1.hook_scale")
        grad = grad + norm_backward(model, block.ln1, resid_pre, scale, grad_ln1, rules)
        grads[f"blocks.{layer}.hook_resid_pre"] = grad
    return grads


@torch.no_grad()
def relp_deltas(model, orig_tokens: Tensor, new_tokens: Tensor, metric, rules: bool = True) -> dict[str, Tensor]:
    """The RelP change estimates (AtP's with rules=False) of patching each cell of
    IterNode(["z", "post", "resid_pre"]) from `new_tokens` into `orig_tokens`: the sum over
    prompts, positions and the cell's slice of (new - orig) * gradient. Shapes: "z" (layer, head),
    "post" (layer, neuron), "resid_pre" (layer,)."""
    grads = relevance_gradients(model, orig_tokens, metric, rules=rules)
    _, orig = model.run_with_cache(orig_tokens)
    _, new = model.run_with_cache(new_tokens)
    layers = range(model.cfg.n_layers)

    def term(name: str, dims: tuple[int, ...]) -> Tensor:
        hooks = [name.format(layer) for layer in layers]
        return torch.stack([((new[hook] - orig[hook]) * grads[hook]).sum(dims) for hook in hooks])

    return {
        "z": term("blocks.{}.attn.hook_z", (0, 1, 3)),
        "post": term("blocks.{}.mlp.hook_post", (0, 1)),
        "resid_pre": term("blocks.{}.hook_resid_pre", (0, 1, 2)),
    }
