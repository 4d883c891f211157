"""Test doubles for IOIDataset: tokenizers whose tokens are words or characters, and the datasets
whose draws must not depend on the process. A support module, not tests: the determinism test
imports it in a fresh process where only the dataset's own modules are loaded."""

from __future__ import annotations

import re
import warnings

from transformer_lens_patching._tasks.ioi.dataset import IOIDataset


class WordTokenizer:
    """A tokenizer test double: one token per word or punctuation mark, with its leading space,
    so every name is a single token. Ids are handed out in order of first appearance."""

    def __init__(self, bos: bool = True):
        self.pad_token_id, self.eos_token_id = 0, 1
        self.bos_token_id = 2 if bos else None
        self.pieces = ["<pad>", "<eos>", "<bos>"]
        self.ids = {piece: index for index, piece in enumerate(self.pieces)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else []
        for piece in re.findall(r" ?\w+| ?[^\w\s]", text):
            if piece not in self.ids:
                self.ids[piece] = len(self.pieces)
                self.pieces.append(piece)
            ids.append(self.ids[piece])
        return ids

    def decode(self, ids) -> str:
        return "".join(self.pieces[int(i)] for i in ids)


class CharTokenizer(WordTokenizer):
    """A tokenizer test double with one token per character: no name is a single token."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = []
        for char in text:
            if char not in self.ids:
                self.ids[char] = len(self.pieces)
                self.pieces.append(char)
            ids.append(self.ids[char])
        return ids


def quiet_dataset(*args, **kwargs) -> IOIDataset:
    """An IOIDataset, without the warning about names that are not single tokens."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return IOIDataset(*args, **kwargs)


def snapshot(ds: IOIDataset) -> dict:
    return {
        "sentences": ds.sentences,
        "toks": ds.toks.tolist(),
        "word_idx": {key: value.tolist() for key, value in ds.word_idx.items()},
        "answers": ds.answers.tolist(),
    }


def snapshots(tok) -> dict:
    """Datasets whose draws must not depend on the process (its PYTHONHASHSEED, set order)."""
    mixed = quiet_dataset("mixed", N=40, tokenizer=tok, seed=7)
    return {
        "mixed": snapshot(mixed),
        "ABC mixed": snapshot(quiet_dataset("ABC mixed", N=40, tokenizer=tok, seed=7)),
        "flipped XYZ": snapshot(mixed.flipped("ABB->XYZ, BAB->XYZ")),
        "flipped CDD": snapshot(mixed.flipped("ABB->CDD, BAB->DCD")),
    }
