"""A hand-set 2-layer attention-only induction model whose circuit is known by construction.

The residual stream is a sum of one-hot subspaces: TOK (current token), PREV (previous
token), POS (position), OUT (the prediction) and JUNK (written, never read).

- L0H0, previous-token head: attends from t to t-1 by position, copies TOK into PREV.
- L0H1, decoy: the same attention and values as L0H0, but writes into JUNK.
- L1H0, induction head: query TOK, key PREV, so t attends to the s whose previous token
  is t's token; copies TOK of s into OUT, scaled by ALPHA.
- L1H1, decoy: the same attention and values as L1H0, but writes into JUNK.
- W_U reads only OUT. Token BOS (0) starts every sequence.

`induction_logits` computes the logits such a circuit gives with plain tensor code, so
tests derive expected values from the construction instead of from a model run.
"""

from __future__ import annotations

import importlib.metadata

import torch
from torch import Tensor

D_VOCAB = 8
N_CTX = 16
D_HEAD = max(D_VOCAB, N_CTX)
N_HEADS = 2
N_LAYERS = 2
BOS = 0
ALPHA = 10.0
"""The logit the induction head gives the token it copies."""
HARD = 40.0
"""Query/key entries: a match scores HARD**2 / sqrt(D_HEAD) = 400, so softmax is exactly one-hot."""

TOK = 0
PREV = TOK + D_VOCAB
POS = PREV + D_VOCAB
OUT = POS + N_CTX
JUNK = OUT + D_VOCAB
D_MODEL = JUNK + D_VOCAB


def _map(rows: int, cols: int, pairs, scale: float = 1.0) -> Tensor:
    """A (rows, cols) matrix with `scale` at each (row, col) in `pairs`."""
    matrix = torch.zeros(rows, cols)
    for row, col in pairs:
        matrix[row, col] = scale
    return matrix


def _read(start: int, n: int, scale: float = 1.0, shift: int = 0) -> Tensor:
    """(d_model, d_head): residual dim `start + i` to head dim `i + shift`, for i + shift < d_head."""
    return _map(D_MODEL, D_HEAD, [(start + i, i + shift) for i in range(n) if i + shift < D_HEAD], scale)


def _write(start: int, scale: float = 1.0) -> Tensor:
    """(d_head, d_model): head dim `i` to residual dim `start + i`, for i < d_vocab."""
    return _map(D_HEAD, D_MODEL, [(i, start + i) for i in range(D_VOCAB)], scale)


def _heads() -> list[list[tuple[Tensor, Tensor, Tensor, Tensor]]]:
    """[layer][head] -> (W_Q, W_K, W_V, W_O)."""
    prev_q, prev_k = _read(POS, N_CTX, HARD), _read(POS, N_CTX, HARD, shift=1)
    ind_q, ind_k = _read(TOK, D_VOCAB, HARD), _read(PREV, D_VOCAB, HARD)
    copy_tok = _read(TOK, D_VOCAB)
    return [
        [(prev_q, prev_k, copy_tok, _write(PREV)), (prev_q, prev_k, copy_tok, _write(JUNK))],
        [(ind_q, ind_k, copy_tok, _write(OUT, ALPHA)), (ind_q, ind_k, copy_tok, _write(JUNK))],
    ]


def induction_state_dict() -> dict[str, Tensor]:
    """The weights, with HookedTransformer keys and per-head shapes."""
    state = {
        "embed.W_E": _map(D_VOCAB, D_MODEL, [(v, TOK + v) for v in range(D_VOCAB)]),
        "pos_embed.W_pos": _map(N_CTX, D_MODEL, [(p, POS + p) for p in range(N_CTX)]),
        "unembed.W_U": _map(D_MODEL, D_VOCAB, [(OUT + v, v) for v in range(D_VOCAB)]),
        "unembed.b_U": torch.zeros(D_VOCAB),
    }
    for layer, heads in enumerate(_heads()):
        for index, key in enumerate(("W_Q", "W_K", "W_V", "W_O")):
            state[f"blocks.{layer}.attn.{key}"] = torch.stack([head[index] for head in heads])
        for key in ("b_Q", "b_K", "b_V"):
            state[f"blocks.{layer}.attn.{key}"] = torch.zeros(N_HEADS, D_HEAD)
        state[f"blocks.{layer}.attn.b_O"] = torch.zeros(D_MODEL)
    return state


def _config_kwargs() -> dict:
    """Config fields that HookedTransformerConfig and TransformerBridgeConfig both accept."""
    return dict(
        d_model=D_MODEL,
        d_head=D_HEAD,
        n_heads=N_HEADS,
        n_layers=N_LAYERS,
        n_ctx=N_CTX,
        d_vocab=D_VOCAB,
        attn_only=True,
        normalization_type=None,
        positional_embedding_type="standard",
        attention_dir="causal",
        act_fn="relu",
        default_prepend_bos=False,
        seed=0,
    )


def _tl_major() -> int:
    return int(importlib.metadata.version("transformer-lens").split(".")[0])


def _build_bridge():
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

    bridge = TransformerBridge.boot_native(TransformerBridgeConfig(**_config_kwargs()))
    bridge.load_state_dict(convert_tl_checkpoint(induction_state_dict(), bridge.cfg), strict=True)
    return bridge


def _build_hooked_transformer():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    model = HookedTransformer(HookedTransformerConfig(**_config_kwargs()))
    missing, unexpected = model.load_state_dict(induction_state_dict(), strict=False)
    leftover = [key for key in missing if not key.endswith((".mask", ".IGNORE"))]
    if leftover or unexpected:
        raise RuntimeError(
            f"Induction weights do not fit HookedTransformer: missing {leftover}, unexpected {unexpected}."
        )
    return model


def build_induction_model():
    """The induction model as a TransformerBridge (TransformerLens 4) or HookedTransformer (2)."""
    model = _build_bridge() if _tl_major() >= 4 else _build_hooked_transformer()
    return model.eval()


def repeated_tokens(batch: int, half: int, seed: int = 0) -> Tensor:
    """(batch, 1 + 2 * half): BOS, then `half` distinct non-BOS tokens, repeated once."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        first = torch.randperm(D_VOCAB - 1, generator=generator)[:half] + 1
        rows.append(torch.cat([torch.tensor([BOS]), first, first]))
    return torch.stack(rows)


def reverse_first_half(tokens: Tensor) -> Tensor:
    """The same sequences with the first repeat reversed: the induction answers change."""
    half = (tokens.shape[1] - 1) // 2
    corrupted = tokens.clone()
    corrupted[:, 1 : half + 1] = tokens[:, 1 : half + 1].flip(1)
    return corrupted


def previous_tokens(tokens: Tensor) -> Tensor:
    """What the previous-token head writes at each position (position 0 attends to itself)."""
    return torch.cat([tokens[:, :1], tokens[:, :-1]], dim=1)


def induction_pattern(query_tokens: Tensor, key_prev_tokens: Tensor) -> Tensor:
    """(batch, query_pos, key_pos) attention of the induction head, computed from the construction.

    Position t attends uniformly to the positions s <= t whose previous token (as the keys
    see it) is t's token (as the query sees it), or uniformly to all s <= t if there is none.
    """
    seq = query_tokens.shape[1]
    causal = torch.ones(seq, seq).tril().bool()
    match = (query_tokens[:, :, None] == key_prev_tokens[:, None, :]) & causal
    allowed = torch.where(match.any(-1, keepdim=True), match, causal.expand_as(match)).float()
    return allowed / allowed.sum(-1, keepdim=True)


def induction_logits(query_tokens: Tensor, key_prev_tokens: Tensor, value_tokens: Tensor) -> Tensor:
    """(batch, pos, d_vocab): ALPHA times the one-hot value tokens the induction head attends to."""
    values = torch.nn.functional.one_hot(value_tokens, D_VOCAB).float()
    return ALPHA * induction_pattern(query_tokens, key_prev_tokens) @ values


def clean_logits(tokens: Tensor) -> Tensor:
    """The logits the model should give on `tokens`."""
    return induction_logits(tokens, previous_tokens(tokens), tokens)
