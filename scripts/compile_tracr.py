"""Compile a small RASP program with tracr and save its weights, labels and outputs as numpy arrays.

Runs in a separate virtual environment holding tracr and jax (requirements/tracr.txt), never in
the package's own. The program is tracr's `make_sort(tokens, tokens, max_seq_len=5, min_key=1)`
over the vocabulary {1, 2, 3}: three layers (an MLP that makes the keys unique, a selector-width
attention and MLP that count the smaller keys, an attention that moves each value to its place).

    /tmp/tracr-venv/bin/python scripts/compile_tracr.py OUT.npz

OUT.npz holds, with TransformerLens names and shapes: W_E (d_vocab, d_model), W_pos (n_ctx,
d_model), per layer L `L.W_Q`, `L.W_K`, `L.W_V` (n_heads, d_model, d_head), `L.b_Q`, `L.b_K`,
`L.b_V` (n_heads, d_head), `L.W_O` (n_heads, d_head, d_model), `L.b_O` (d_model,), `L.W_in`
(d_model, d_mlp), `L.b_in`, `L.W_out` (d_mlp, d_model), `L.b_out`; W_U (d_model, d_out), which
reads the output SOp's directions; the config (n_layers, n_heads, d_head, d_mlp, d_model);
residual_labels; the input and output encodings (input_names/input_ids, output_values/output_ids,
bos_id, output_label); and, for every input of the vocabulary at full length (BOS first), the
token ids `inputs`, tracr's residual stream after the embeddings and after each half-layer
`residuals` (inputs, 1 + 2 * n_layers, positions, d_model) and its decoded output ids `outputs`
(the argmax of its unembedding; position 0, BOS, is -1). Last, the program's own values, from
RASP's evaluator rather than the compiled model: `sop_labels` names every SOp of the program and
`sop_values` (SOps, inputs, MAX_SEQ_LEN) holds each one's value at each position of each input
(without BOS), written as tracr writes values in the residual stream's labels ("sop:value").
"""

import itertools
import sys
import time

import numpy as np

VOCAB = (1, 2, 3)
MAX_SEQ_LEN = 5
BOS = "BOS"


def compile_program():
    """The sort program's output SOp and its assembled tracr model."""
    from tracr.compiler import compiling, lib
    from tracr.rasp import rasp

    program = lib.make_sort(rasp.tokens, rasp.tokens, max_seq_len=MAX_SEQ_LEN, min_key=1)
    model = compiling.compile_rasp_to_model(program, vocab=set(VOCAB), max_seq_len=MAX_SEQ_LEN, compiler_bos=BOS)
    return program, model


def layer_weights(params, config, layer: int, d_model: int) -> dict:
    """One layer's attention and MLP weights in TransformerLens shapes (zeros for a missing half)."""
    heads, d_head = config.num_heads, config.key_size
    prefix = f"transformer/layer_{layer}"
    out = {}
    for name, key in (("query", "Q"), ("key", "K"), ("value", "V")):
        part = params.get(f"{prefix}/attn/{name}")
        weight = np.zeros((d_model, heads * d_head)) if part is None else np.asarray(part["w"])
        bias = np.zeros(heads * d_head) if part is None else np.asarray(part["b"])
        out[f"{layer}.W_{key}"] = weight.reshape(d_model, heads, d_head).transpose(1, 0, 2)
        out[f"{layer}.b_{key}"] = bias.reshape(heads, d_head)
    linear = params.get(f"{prefix}/attn/linear")
    w_o = np.zeros((heads * d_head, d_model)) if linear is None else np.asarray(linear["w"])
    out[f"{layer}.W_O"] = w_o.reshape(heads, d_head, d_model)
    out[f"{layer}.b_O"] = np.zeros(d_model) if linear is None else np.asarray(linear["b"])
    for name, weight, bias, shape in (
        ("linear_1", "W_in", "b_in", (d_model, config.mlp_hidden_size)),
        ("linear_2", "W_out", "b_out", (config.mlp_hidden_size, d_model)),
    ):
        part = params.get(f"{prefix}/mlp/{name}")
        out[f"{layer}.{weight}"] = np.zeros(shape) if part is None else np.asarray(part["w"])
        out[f"{layer}.{bias}"] = np.zeros(shape[1]) if part is None else np.asarray(part["b"])
    return out


def unembedding(labels: list[str], output_label: str, output_encoding: dict) -> np.ndarray:
    """(d_model, d_out): tracr's unembedding, the projection onto the output SOp's directions."""
    matrix = np.zeros((len(labels), len(output_encoding)))
    for value, index in output_encoding.items():
        matrix[labels.index(f"{output_label}:{value}"), index] = 1.0
    return matrix


def run_all(model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids, residual streams and output ids of every full-length input, in one batch."""
    import jax.numpy as jnp

    ids = np.array(
        [model.input_encoder.encode([BOS, *values]) for values in itertools.product(VOCAB, repeat=MAX_SEQ_LEN)]
    )
    result = model.forward(model.params, jnp.array(ids))
    stream = [result.transformer_output.input_embeddings, *result.transformer_output.residuals]
    outputs = np.array(result.unembedded_output)
    outputs[:, 0] = -1
    return ids, np.stack([np.asarray(r) for r in stream], axis=1), outputs


def program_values(program) -> tuple[np.ndarray, np.ndarray]:
    """Every SOp of the program and its value at each position of every full-length input, as text."""
    from tracr.rasp import rasp

    sops, stack = {}, [program]
    while stack:
        expr = stack.pop()
        if isinstance(expr, rasp.SOp) and expr.label not in sops:
            sops[expr.label] = expr
        stack.extend(expr.children)
    inputs = list(itertools.product(VOCAB, repeat=MAX_SEQ_LEN))
    values = [[[str(v) for v in rasp.evaluate(sop, list(row))] for row in inputs] for sop in sops.values()]
    return np.array(list(sops)), np.array(values)


def main(path: str) -> None:
    began = time.time()
    program, model = compile_program()
    params, config, labels = model.params, model.model_config, list(model.residual_labels)
    d_model = len(labels)
    output_encoding = dict(model.output_encoder.encoding_map)
    input_encoding = dict(model.input_encoder.encoding_map)
    arrays = {
        "W_E": np.asarray(params["token_embed"]["embeddings"]),
        "W_pos": np.asarray(params["pos_embed"]["embeddings"]),
        "W_U": unembedding(labels, program.label, output_encoding),
        "n_layers": config.num_layers,
        "n_heads": config.num_heads,
        "d_head": config.key_size,
        "d_mlp": config.mlp_hidden_size,
        "d_model": d_model,
        "residual_labels": np.array(labels),
        "input_names": np.array([str(k) for k in input_encoding]),
        "input_ids": np.array(list(input_encoding.values())),
        "output_values": np.array(list(output_encoding)),
        "output_ids": np.array(list(output_encoding.values())),
        "bos_id": input_encoding[BOS],
        "output_label": program.label,
    }
    for layer in range(config.num_layers):
        arrays |= layer_weights(params, config, layer, d_model)
    compiled = time.time()
    arrays["inputs"], arrays["residuals"], arrays["outputs"] = run_all(model)
    arrays["sop_labels"], arrays["sop_values"] = program_values(program)
    np.savez(path, **arrays)
    print(f"compiled in {compiled - began:.1f}s, ran {len(arrays['inputs'])} inputs in {time.time() - compiled:.1f}s")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: compile_tracr.py OUT.npz")
    main(sys.argv[1])
