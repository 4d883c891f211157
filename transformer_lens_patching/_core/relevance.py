"""RelP's propagation rules: the orig run's backward pass with the model's nonlinearities linearised.

Relevance patching (RelP, Jafari et al. 2025) is attribution patching with the gradient
replaced by the coefficients of layer-wise relevance propagation. Each rule below keeps
the forward pass's values exactly and changes only what flows back:

- normalisation (every `hook_scale`: LayerNorm and RMSNorm, pre-, post- and final norms):
  the scale is a constant, so the norm is linear in its input with its live scale;
- attention: the pattern is a constant to everything upstream of the queries and keys, so
  relevance reaches the residual stream through the values only; the queries, keys, scores
  and pattern themselves keep the pattern's gradient (the softmax's, from downstream);
- an elementwise MLP activation `post = act(pre)`: relevance passes through unchanged (the
  identity rule: `d post / d pre` is `post / pre`, 0 where `pre` is 0);
- a gated MLP `post = act(gate) * up (+ b_in)`: the identity rule on the activation and the
  half rule on the product (`d post / d gate = p / (2 gate)`, `d post / d up = p / (2 up)`,
  with `p = post - b_in`), so each factor gets half of the product's relevance.

Everything else (embeddings, projections, residual sums, the unembedding and the metric's
own gradient with respect to the logits) is linear or differentiated as it is.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from .. import _tl
from ..errors import PatchingError
from .components import hook_name, mlp_hook

SCALE_HOOK = "hook_scale"
"""The hook every normalisation in TransformerLens reports its scale at."""


def check_relevance_rules(model, method: str, edges: bool = False) -> None:
    """Raise a PatchingError where one of the model's nonlinearities has no rule here (and, for
    edges, where a norm follows each block's output: a sender's write would need its rule too)."""
    shape = _tl.model_shape(model)
    if edges and _tl.post_norms(model):
        raise PatchingError(
            f"method={method!r} (RelP) for edges and paths is not available on a model that normalises each "
            f"block's output before adding it ({', '.join(_tl.post_norms(model))}): a sender's write would have to "
            "pass that norm by RelP's rule. Use method='atp' or 'ig' for edges, or attr_patch(method='relp') for "
            "nodes."
        )
    names = _tl.hook_names(model)
    if shape.n_experts:
        raise PatchingError(
            f"method={method!r} (RelP) has no propagation rule for mixture-of-experts MLPs (their router's "
            "weights multiply the experts' outputs): use method='atp' or 'ig' on this model."
        )
    if shape.has_mlps and mlp_hook("mid", 0) in names:
        raise PatchingError(
            f"method={method!r} (RelP) has no propagation rule for a layer-normalised MLP activation (SoLU, "
            "mlp.hook_mid): use method='atp' or 'ig' on this model."
        )
    failure = _tl.scale_edit_failure(model)
    if failure is not None:
        raise PatchingError(
            f"method={method!r} (RelP) holds every norm's scale constant through its hook_scale, and this model "
            f"cannot run with that hook edited ({failure}): use method='atp' or 'ig' on this model."
        )
    needed = [hook_name("q", 0), hook_name("k", 0)]
    if shape.has_mlps:
        needed += [hook_name("pre", 0), hook_name("post", 0)]
        needed += [mlp_hook("pre_linear", 0)] if mlp_hook("pre_linear", 0) in names else []
    needed += sorted(name for name in names if name.endswith(SCALE_HOOK))
    fired = _tl.hooks_that_fire(model, [name for name in needed if name in names])
    missing = [name for name in needed if name not in fired]
    if missing:
        raise PatchingError(
            f"method={method!r} (RelP) applies its rules at every norm's scale, the queries, the keys and the MLP "
            f"activations, and on this model hook {missing[0]!r} is missing or never fires: use method='atp' or "
            "'ig' on this model."
        )


class RelevanceRules:
    """Installs the rules in one gradient pass's `PatchProgram` (before any other step there)."""

    def __init__(self, model):
        names = _tl.hook_names(model)
        shape = _tl.model_shape(model)
        self._model = model
        self._scales = sorted(name for name in names if name.endswith(SCALE_HOOK))
        self._layers = range(shape.n_layers)
        self._mlps = shape.has_mlps
        self._gated = shape.has_mlps and mlp_hook("pre_linear", 0) in names
        self._product_bias = _tl.gated_product_bias(model) if self._gated else None

    @contextmanager
    def on_final_norm(self) -> Iterator[None]:
        """A context in which the final norm, run outside the forward pass (by a metric's logit
        reader), holds its scale constant too."""
        final = [(name, _constant) for name in self._scales if name.startswith("ln_final.")]
        with _tl.hooks(self._model, final), _tl.quiet_norm_edits():
            yield

    def install(self, program) -> None:
        """Add the rules' steps to `program`."""
        for name in self._scales:
            program.stop_gradient(name)
        split = bool(getattr(self._model.cfg, "use_split_qkv_input", False))
        cuts = ("q_input", "k_input") if split else ("q", "k")
        for layer in self._layers:
            for part in cuts:
                program.stop_gradient(hook_name(part, layer))
            if self._mlps:
                self._mlp_rule(program, layer)

    def _mlp_rule(self, program, layer: int) -> None:
        live: dict[str, Tensor] = {}
        program.keep(hook_name("pre", layer), live, "pre")
        if self._gated:
            program.keep(mlp_hook("pre_linear", layer), live, "pre_linear")
            bias = None if self._product_bias is None else self._product_bias[layer]
            program.substitute_gradient(hook_name("post", layer), lambda post: _half_rule(live, post, bias))
        else:
            program.substitute_gradient(hook_name("post", layer), lambda post: _identity_rule(live["pre"], post))


def _constant(activation: Tensor, hook=None) -> Tensor:
    return activation.detach()


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, 0 where the denominator is 0 (a constant: no gradient)."""
    numerator, denominator = numerator.detach(), denominator.detach()
    safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return torch.where(denominator == 0, torch.zeros_like(numerator), numerator / safe)


def _identity_rule(pre: Tensor, post: Tensor) -> Tensor:
    """A function of `pre` whose value is `post` and whose derivative is post / pre."""
    return pre * _ratio(post, pre.to(post))


def _half_rule(live: dict[str, Tensor], post: Tensor, bias: Tensor | None) -> Tensor:
    """A function of the gate and `up` whose derivatives are half the product over each factor."""
    gate, up = live["pre"], live["pre_linear"]
    product = post if bias is None else post - bias.to(post)
    return 0.5 * gate * _ratio(product, gate.to(post)) + 0.5 * up * _ratio(product, up.to(post))
