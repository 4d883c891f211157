"""Naive reference implementations, written as literally as the algorithms read.

One full forward pass per activation patch; two full passes per path patch with every
head frozen. Positions are visited with Python loops, one prompt at a time. Nothing here
uses the library's planning or hook code, only `Node` attributes and plain TransformerLens.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from tests.helpers import TL_MAJOR
from transformer_lens_patching import Node

HEAD_COMPONENTS = {"q", "k", "v", "z", "result", "q_input", "k_input", "v_input", "pattern", "attn_scores"}
HOOK = {
    "embed": "hook_embed",
    "pos_embed": "hook_pos_embed",
    "resid_pre": "blocks.{}.hook_resid_pre",
    "resid_mid": "blocks.{}.hook_resid_mid",
    "resid_post": "blocks.{}.hook_resid_post",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "q": "blocks.{}.attn.hook_q",
    "k": "blocks.{}.attn.hook_k",
    "v": "blocks.{}.attn.hook_v",
    "z": "blocks.{}.attn.hook_z",
    "pattern": "blocks.{}.attn.hook_pattern",
    "attn_scores": "blocks.{}.attn.hook_attn_scores",
    "q_input": "blocks.{}.hook_q_input",
    "k_input": "blocks.{}.hook_k_input",
    "v_input": "blocks.{}.hook_v_input",
    "pre": "blocks.{}.mlp.hook_pre",
    "post": "blocks.{}.mlp.hook_post",
}


def hook_of(name: str, layer: int | None) -> str:
    return HOOK[name].format(layer)


def positions_per_prompt(seq_pos, batch: int, seq_len: int) -> list[list[int]] | None:
    """The positions to patch in each prompt, as plain lists (None: all positions)."""
    if seq_pos is None:
        return None
    if isinstance(seq_pos, int):
        return [[seq_pos % seq_len] for _ in range(batch)]
    rows = torch.as_tensor(seq_pos).tolist()
    return [[p % seq_len for p in (row if isinstance(row, list) else [row])] for row in rows]


def assign(act: torch.Tensor, src, name: str, unit: int | None, positions) -> None:
    """act[b, p, unit] = src[b, p, unit] for every prompt b and each of its positions p, in place.

    For attention patterns the position is the query position (axis 2) and the head is axis 1.
    `src` may be 0 (zero ablation).
    """
    batch, seq_len = act.shape[0], act.shape[2 if name in ("pattern", "attn_scores") else 1]
    for b in range(batch):
        for p in range(seq_len) if positions is None else positions[b]:
            value = src if isinstance(src, (int, float)) else None
            if name in ("pattern", "attn_scores"):
                target = (b, slice(None), p) if unit is None else (b, unit, p)
            else:
                target = (b, p) if unit is None else (b, p, unit)
            act[target] = value if value is not None else src[target]


def run_with_patches(model, tokens, patches):
    """Logits of one forward pass with `patches`: (hook name, fn(activation copy) -> None) in order.

    resid_post = resid_mid + mlp_out. TransformerLens 4 hooks resid_mid only where it enters
    the MLP, so there a change made at resid_mid is also added to resid_post.
    """
    changes: dict[str, torch.Tensor] = {}

    def make(name, fn):
        def hook(act, hook=None):
            out = act.clone()
            fn(out)
            if name.endswith("hook_resid_mid") and TL_MAJOR >= 4:
                target = name.replace("resid_mid", "resid_post")
                changes[target] = changes.get(target, 0) + out - act
            return out

        return hook

    carried_to = dict.fromkeys(n.replace("resid_mid", "resid_post") for n, _ in patches if n.endswith("hook_resid_mid"))
    hooks = [(n, lambda act, hook, n=n: act + changes.pop(n, 0)) for n in carried_to]
    hooks += [(name, make(name, fn)) for name, fn in patches]
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=hooks)


@contextmanager
def split_qkv_input(model, on: bool):
    """Switch use_split_qkv_input on for the block (when `on`), off afterwards."""
    if on:
        model.set_use_split_qkv_input(True)
    try:
        yield
    finally:
        if on:
            model.set_use_split_qkv_input(False)


def full_cache(model, tokens) -> dict:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return {name: cache[name] for name in cache.keys()}


def layer_of(model, node: Node) -> int | None:
    return None if node.layer is None else node.layer % model.cfg.n_layers


def naive_act_patch(model, orig, nodes: list[Node], metric, new_cache):
    """Patch every node at once from `new_cache` (a dict, or 0 for zeros) in one forward pass."""
    with split_qkv_input(model, any(node.name.endswith("_input") for node in nodes)):
        return _naive_act_patch(model, orig, nodes, metric, new_cache)


def _naive_act_patch(model, orig, nodes, metric, new_cache):
    patches = []
    seq_len = orig.shape[1]
    for node in nodes:
        unit = node.head if node.head is not None else node.neuron
        positions = positions_per_prompt(node.seq_pos, orig.shape[0], seq_len)
        name = hook_of(node.name, layer_of(model, node))
        src = new_cache if new_cache == 0 else new_cache[name]
        patches.append(
            (
                name,
                lambda act, src=src, node=node, unit=unit, positions=positions: assign(
                    act, src, node.name, unit, positions
                ),
            )
        )
    return metric(run_with_patches(model, orig, patches))


def _kv(model, head: int) -> int:
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads
    return head // (model.cfg.n_heads // n_kv)


def naive_path_patch(
    model, orig, new, senders: list[Node], receivers: list[Node], metric, seq_pos=None, mlps_direct=True
):
    """The two-pass algorithm, literally.

    Pass 1: run orig with every head's z replaced by its orig value (and, when MLPs are not
    direct, every MLP's post too), the senders set to their new values; record what each
    receiver needs. Pass 2: run orig with the receivers set to the recorded values.
    """
    batch, seq_len = orig.shape
    positions = positions_per_prompt(seq_pos, batch, seq_len)
    gqa = (getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads) != model.cfg.n_heads
    with split_qkv_input(model, any(r.name.endswith("_input") for r in receivers)):
        return _naive_path_patch(model, orig, new, senders, receivers, metric, positions, gqa, mlps_direct)


def _naive_path_patch(model, orig, new, senders, receivers, metric, positions, gqa, mlps_direct):
    orig_cache, new_cache = full_cache(model, orig), full_cache(model, new)
    patches = []
    for layer in range(model.cfg.n_layers):
        z_name = hook_of("z", layer)
        patches.append((z_name, lambda act, n=z_name: act.copy_(orig_cache[n])))
        if not mlps_direct:
            post_name = hook_of("post", layer)
            patches.append((post_name, lambda act, n=post_name: act.copy_(orig_cache[n])))
    for sender in senders:
        name = hook_of(sender.name, layer_of(model, sender))
        unit = sender.head if sender.head is not None else sender.neuron
        patches.append((name, lambda act, n=name, s=sender, u=unit: assign(act, new_cache[n], s.name, u, positions)))
    recorded: dict[str, torch.Tensor] = {}
    to_record = set()
    for receiver in receivers:
        layer = layer_of(model, receiver)
        if receiver.name == "pattern":
            to_record |= {hook_of("pattern", layer)} if gqa else {hook_of("q", layer), hook_of("k", layer)}
        elif receiver.name == "z":
            to_record |= (
                {hook_of("pattern", layer), hook_of("v", layer)}
                if gqa
                else {hook_of("q", layer), hook_of("k", layer), hook_of("v", layer)}
            )
        else:
            to_record.add(hook_of(receiver.name, layer))
    for name in sorted(to_record):
        patches.append((name, lambda act, n=name: recorded.__setitem__(n, act.clone())))
    run_with_patches(model, orig, patches)

    final = []
    for receiver in receivers:
        layer, head = layer_of(model, receiver), receiver.head
        if receiver.name == "pattern" and not gqa:
            for part in ("q", "k"):
                n = hook_of(part, layer)
                final.append((n, lambda act, n=n, part=part, h=head: assign(act, recorded[n], part, h, positions)))
        elif receiver.name == "pattern":
            n = hook_of("pattern", layer)
            final.append((n, lambda act, n=n, h=head: assign(act, recorded[n], "pattern", h, None)))
        elif receiver.name == "z" and not gqa:
            for part in ("q", "k", "v"):
                n = hook_of(part, layer)
                final.append((n, lambda act, n=n, part=part, h=head: assign(act, recorded[n], part, h, positions)))
        elif receiver.name == "z":
            pattern, v = recorded[hook_of("pattern", layer)], recorded[hook_of("v", layer)]
            heads = range(model.cfg.n_heads) if head is None else [head]
            z_new = {h: torch.einsum("bts,bsd->btd", pattern[:, h], v[:, :, _kv(model, h)]) for h in heads}

            def set_z(act, z_new=z_new):
                for h, value in z_new.items():
                    act[:, :, h] = value

            final.append((hook_of("z", layer), set_z))
        else:
            n = hook_of(receiver.name, layer)
            unit = head if head is not None else receiver.neuron
            final.append((n, lambda act, n=n, r=receiver, u=unit: assign(act, recorded[n], r.name, u, positions)))
    return metric(run_with_patches(model, orig, final))
