"""IOIDataset: seeded prompts, their tokens and word positions, and the flipped (corrupted) copies.

Expectations come from the IOI spec (shared/spec/reference-numbers.md section 7), from the
templates themselves, or from re-tokenizing the sentences; never from earlier runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import raises
from tests.tasks.ioi_doubles import CharTokenizer, WordTokenizer, quiet_dataset, snapshots
from transformer_lens_patching._tasks.ioi import words as ioi_words
from transformer_lens_patching._tasks.ioi.dataset import FLIPS, IOIDataset

REPO = Path(__file__).resolve().parents[2]

REFERENCE_MIXED_SEED1 = [
    "When Victoria and Jane got a snack at the store, Jane decided to give it to Victoria",
    "When Sullivan and Rose got a necklace at the garden, Sullivan decided to give it to Rose",
    "When Alan and Alex got a drink at the store, Alex decided to give it to Alan",
    "Then, Jessica and Crystal had a long argument, and afterwards Jessica said to Crystal",
    "Then, Jonathan and Kevin were working at the school. Kevin decided to give a necklace to Jonathan",
]
"""ARENA 3.0's first 5 prompts for ("mixed", N=25, seed=1), from the spec."""

REFERENCE_IO_S = [
    ("Victoria", "Jane"),
    ("Rose", "Sullivan"),
    ("Alan", "Alex"),
    ("Crystal", "Jessica"),
    ("Jonathan", "Kevin"),
]
"""The (IO, S) names of those prompts, read off the sentences: S is the name said twice."""

SPEC_FLIPS = {
    "ABB->XYZ, BAB->XYZ",
    "ABB->CDD, BAB->DCD",
    "ABB->BAA, BAB->ABA",
    "ABB->BAB, BAB->ABB",
    "ABB->DCD, BAB->CDD",
    "ABB->ABA, BAB->BAA",
}
"""The flips the spec lists (the paper's 2 x 3 design)."""

ANSWER_LETTERS = {
    "XYZ": ("Y", "Z"),
    "CDD": ("C", "D"),
    "DCD": ("C", "D"),
    "BAA": ("B", "A"),
    "ABA": ("B", "A"),
    "BAB": ("A", "B"),
    "ABB": ("A", "B"),
}
"""For each new name order: the letter of the flipped prompt's IO (the name of the first clause
that is not repeated; the second one when neither is) and of its S (the last name slot)."""

SMOLLM2_MULTI_TOKEN = {"Brandon", "Connor", "Kyle"}


def fill(template: str, io: str, s: str, c: str | None = None, place: str = "", obj: str = "") -> str:
    text = template.replace("[PLACE]", place).replace("[OBJECT]", obj).replace("[A]", io).replace("[B]", s)
    return text.replace("[C]", c) if c is not None else text


def slot_names(prompt, text: str) -> tuple[str, ...]:
    """The names in the name slots of `prompt`'s template, as they appear in `text` (which must be
    the template, with `prompt`'s place and object, and any names in the slots)."""
    filled = prompt.template.replace("[PLACE]", prompt.place).replace("[OBJECT]", prompt.object)
    pattern = re.escape(filled)
    for slot in ("[A]", "[B]", "[C]"):
        pattern = pattern.replace(re.escape(slot), r"(\w+)")
    match = re.fullmatch(pattern, text)
    assert match is not None, f"{text!r} does not follow the template {prompt.template!r}"
    return match.groups()


def parse_flip(flip: str) -> dict[str, str]:
    """{"ABB": new order, "BAB": new order} from a flip string such as "ABB->XYZ, BAB->XYZ"."""
    return dict(part.strip().split("->") for part in flip.split(","))


SNAPSHOT_SCRIPT = """
import json, sys, types
package = types.ModuleType("transformer_lens_patching")
package.__path__ = [sys.argv[1]]
sys.modules["transformer_lens_patching"] = package
from tests.tasks.ioi_doubles import WordTokenizer, snapshots
print(json.dumps(snapshots(WordTokenizer())))
"""
"""Prints `snapshots` in a fresh process. The package is registered without running its
__init__, which imports TransformerLens (seconds per process) and nothing the dataset uses;
so is the dataset's own module, not the public `transformer_lens_patching.ioi`."""


@pytest.fixture(scope="module")
def smol(tok):
    """IOIDatasets on the SmolLM2 tokenizer, built once per argument set."""
    cache: dict = {}

    def build(prompt_type="mixed", N=120, seed=0, **kwargs) -> IOIDataset:
        key = (str(prompt_type), N, seed, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = quiet_dataset(prompt_type, N=N, tokenizer=tok, seed=seed, **kwargs)
        return cache[key]

    return build


# Determinism and the reference prompts


def test_same_seed_gives_the_same_dataset_in_processes_with_other_hash_seeds():
    package_dir = str(Path(ioi_words.__file__).parents[2])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SNAPSHOT_SCRIPT, package_dir],
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for hash_seed in ("1", "2")
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    here = snapshots(WordTokenizer())
    assert set(here) == set(results[0]) == set(results[1])
    assert len(here["mixed"]["sentences"]) == 40 and len(here["flipped XYZ"]["sentences"]) == 40
    for name in here:
        assert results[0][name] == results[1][name], f"{name} differs between PYTHONHASHSEED=1 and 2"
        assert results[0][name] == here[name], f"{name} differs between a subprocess and this process"


def test_same_seed_same_prompts_other_seed_other_prompts(smol, tok):
    again = quiet_dataset("mixed", N=120, tokenizer=tok, seed=0)
    assert again.sentences == smol().sentences
    assert torch.equal(again.toks, smol().toks)
    assert smol(seed=1).sentences != smol().sentences


def test_first_prompts_match_the_reference():
    ds = IOIDataset("mixed", N=25, tokenizer=WordTokenizer(), seed=1)
    assert ds.sentences[:5] == REFERENCE_MIXED_SEED1
    assert [(p.io, p.s) for p in ds.prompts[:5]] == REFERENCE_IO_S
    assert len(ds) == 25


def test_reference_flipped_prompts_keep_the_template_and_final_word():
    ds = IOIDataset("mixed", N=25, tokenizer=WordTokenizer(), seed=1)
    for flip in sorted(SPEC_FLIPS):
        flipped = ds.flipped(flip)
        for clean, new, (io, _) in zip(ds.prompts[:5], flipped.prompts[:5], REFERENCE_IO_S):
            assert new.template == clean.template
            assert slot_names(clean, new.text)[-1] == io
            assert new.text.split(" ")[-1] == io


@pytest.mark.parametrize(
    "flip, expected",
    [
        (
            "ABB->BAA, BAB->ABA",
            [
                "When Jane and Victoria got a snack at the store, Victoria decided to give it to Victoria",
                "When Rose and Sullivan got a necklace at the garden, Rose decided to give it to Rose",
            ],
        ),
        (
            "ABB->ABA, BAB->BAA",
            [
                "When Victoria and Jane got a snack at the store, Victoria decided to give it to Victoria",
                "When Sullivan and Rose got a necklace at the garden, Rose decided to give it to Rose",
            ],
        ),
        (
            "ABB->BAB, BAB->ABB",
            [
                "When Jane and Victoria got a snack at the store, Jane decided to give it to Victoria",
                "When Rose and Sullivan got a necklace at the garden, Sullivan decided to give it to Rose",
            ],
        ),
    ],
)
def test_flips_of_known_names_by_hand(flip, expected):
    """Prompt 1 is ABBA (IO Victoria, S Jane), prompt 2 BABA (IO Rose, S Sullivan)."""
    ds = IOIDataset("mixed", N=25, tokenizer=WordTokenizer(), seed=1)
    assert ds.flipped(flip).sentences[:2] == expected


def test_xyz_flip_gives_the_reference_names():
    ds = IOIDataset("mixed", N=25, tokenizer=WordTokenizer(), seed=1)
    flipped = ds.flipped("ABB->XYZ, BAB->XYZ")
    first_clause = [slot_names(clean, new.text)[:3] for clean, new in zip(ds.prompts[:5], flipped.prompts[:5])]
    assert [names[:2] for names in first_clause] == [
        ("Alan", "Sullivan"),
        ("Marcus", "Max"),
        ("Jay", "Jason"),
        ("Joshua", "Jack"),
        ("Alice", "Mark"),
    ]
    assert [names[2] for names in first_clause] == ["Adam", "Jeremy", "Jacob", "Grant", "Carter"]


# Names and the SmolLM2 tokenizer


def test_names_that_are_not_single_tokens_are_dropped_with_a_warning(tok):
    expected = rf"^3 of {len(ioi_words.NAMES)} IOI names are not single tokens .*: Brandon, Connor, Kyle\.$"
    with pytest.warns(UserWarning, match=expected):
        ds = IOIDataset("mixed", N=300, tokenizer=tok, seed=0)
    assert ds.names == [name for name in ioi_words.NAMES if name not in SMOLLM2_MULTI_TOKEN]
    used = {name for p in ds.prompts for name in (p.io, p.s)}
    assert not used & SMOLLM2_MULTI_TOKEN
    assert len(used) > 50


def test_no_warning_when_every_name_is_one_token():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = IOIDataset("mixed", N=10, tokenizer=WordTokenizer(), seed=0)
    assert ds.names == list(ioi_words.NAMES)


def test_too_few_single_token_names_is_an_error():
    with (
        pytest.warns(UserWarning, match="not single tokens"),
        raises(r"Only 0 IOI names are single tokens.*at least 3"),
    ):
        IOIDataset("mixed", N=5, tokenizer=CharTokenizer(), seed=0)


@pytest.mark.parametrize("prompt_type", ["mixed", "ABBA", "BABA", "ABC", "BAC", "ABC mixed"])
def test_every_name_is_one_token(smol, tok, prompt_type):
    for p in smol(prompt_type).prompts:
        for name in (p.io, p.s, p.c) if p.c is not None else (p.io, p.s):
            assert len(tok.encode(" " + name, add_special_tokens=False)) == 1, name


def pad_id(tokenizer) -> int:
    """The id prompts are padded with: the pad token, or EOS where the tokenizer has no pad token
    (the SmolLM2 tokenizer has one on the TransformerLens 4 environment's transformers only)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def decoded(tok, tokens: list[int], position: int) -> str:
    return tok.decode([tokens[position]])


@pytest.mark.parametrize("prompt_type", ["mixed", "ABBA", "BABA", "ABC", "BAC"])
@pytest.mark.parametrize("prepend_bos", [False, True])
def test_word_positions_point_at_the_words(smol, tok, prompt_type, prepend_bos):
    ds = smol(prompt_type, prepend_bos=prepend_bos)
    idx = {key: value.tolist() for key, value in ds.word_idx.items()}
    assert all(len(values) == ds.N for values in idx.values())
    marks = {tok.encode(mark, add_special_tokens=False)[0] for mark in (",", ".")}
    for i, p in enumerate(ds.prompts):
        length = int(ds.lengths[i])
        tokens = ds.toks[i, :length].tolist()
        expected_tokens = tok.encode(p.text, add_special_tokens=False)
        assert tokens == ([tok.bos_token_id] if prepend_bos else []) + expected_tokens
        io_id, s_id = (
            tok.encode(" " + p.io, add_special_tokens=False)[0],
            tok.encode(" " + p.s, add_special_tokens=False)[0],
        )
        body = tokens[:-1]

        assert decoded(tok, tokens, idx["IO"][i]) == " " + p.io
        assert idx["IO"][i] == body.index(io_id)
        assert decoded(tok, tokens, idx["S1"][i]) == " " + p.s
        assert idx["S1"][i] == body.index(s_id)
        assert decoded(tok, tokens, idx["S2"][i]) == " " + p.s
        assert idx["S2"][i] == max(j for j, token in enumerate(body) if token == s_id)
        assert idx["S1"][i] < idx["S2"][i] and idx["IO"][i] < idx["S2"][i]

        assert idx["end"][i] == length - 2
        assert decoded(tok, tokens, idx["end"][i] + 1) == " " + p.io
        assert idx["end"][i] + 1 == length - 1

        punct = idx["punct"][i]
        assert decoded(tok, tokens, punct) in (",", ".")
        assert punct < idx["S2"][i]
        assert not any(token in marks for token in tokens[punct + 1 : idx["S2"][i]])

        for name in ("IO", "S1"):
            assert idx[f"{name}-1"][i] == idx[name][i] - 1
            assert idx[f"{name}+1"][i] == idx[name][i] + 1
        assert idx["starts"][i] == 0


def test_prompts_are_right_padded(smol, tok):
    ds = smol()
    lengths = ds.lengths.tolist()
    assert len(set(lengths)) > 1
    assert ds.toks.shape == (ds.N, max(lengths)) and ds.max_len == max(lengths)
    for i, length in enumerate(lengths):
        assert length == len(tok.encode(ds.sentences[i], add_special_tokens=False))
        assert (ds.toks[i, length:] == pad_id(tok)).all()
        assert pad_id(tok) not in ds.toks[i, :length].tolist()
    assert (ds.toks[:, -1] == pad_id(tok)).any()


def test_padding_is_the_pad_token_not_eos():
    tokenizer = WordTokenizer()
    ds = IOIDataset("mixed", N=30, tokenizer=tokenizer, seed=2)
    lengths = [len(tokenizer.encode(text, add_special_tokens=False)) for text in ds.sentences]
    assert ds.lengths.tolist() == lengths and len(set(lengths)) > 1
    for i, length in enumerate(lengths):
        assert ds.toks[i, length:].tolist() == [tokenizer.pad_token_id] * (max(lengths) - length)


def test_eos_pads_when_there_is_no_pad_token():
    tokenizer = WordTokenizer()
    tokenizer.pad_token_id = None
    ds = IOIDataset("mixed", N=30, tokenizer=tokenizer, seed=2)
    short = int(ds.lengths.argmin())
    assert int(ds.lengths[short]) < ds.toks.shape[1]
    assert (ds.toks[short, int(ds.lengths[short]) :] == tokenizer.eos_token_id).all()


def test_prepend_bos_shifts_every_position_by_one(smol, tok):
    plain, with_bos = smol(), smol(prepend_bos=True)
    assert with_bos.sentences == plain.sentences
    assert (with_bos.toks[:, 0] == tok.bos_token_id).all()
    assert torch.equal(with_bos.lengths, plain.lengths + 1)
    assert with_bos.toks.shape == (plain.N, plain.toks.shape[1] + 1)
    for i, length in enumerate(plain.lengths.tolist()):
        assert torch.equal(with_bos.toks[i, 1 : length + 1], plain.toks[i, :length])
        assert (with_bos.toks[i, length + 1 :] == pad_id(tok)).all()
    for key, positions in plain.word_idx.items():
        if key == "starts":
            assert (with_bos.word_idx[key] == 0).all() and (positions == 0).all()
        else:
            assert torch.equal(with_bos.word_idx[key], positions + 1), key
    assert torch.equal(with_bos.answers, plain.answers)


def test_str_tokens_spell_the_sentence(smol):
    ds = smol()
    for i in range(5):
        pieces = ds.str_tokens(i)
        assert len(pieces) == int(ds.lengths[i])
        assert "".join(pieces) == ds.sentences[i]


# Prompt types


@pytest.mark.parametrize("prompt_type", ["mixed", "ABBA", "BABA", "ABC", "BAC", "ABC mixed"])
def test_sentences_fill_their_template(smol, prompt_type):
    ds = smol(prompt_type)
    for p in ds.prompts:
        assert p.place in ioi_words.PLACES and p.object in ioi_words.OBJECTS
        assert p.text == fill(p.template, p.io, p.s, p.c, p.place, p.object)
        assert p.text.endswith(" " + p.io)
        assert p.io in ds.names and p.s in ds.names and p.io != p.s


def first_clause_order(ds: IOIDataset) -> list[str]:
    return [
        "IO first" if io < s1 else "S first" for io, s1 in zip(ds.word_idx["IO"].tolist(), ds.word_idx["S1"].tolist())
    ]


@pytest.mark.parametrize(
    "prompt_type, templates, order",
    [
        ("ABBA", ioi_words.ABBA_TEMPLATES, "IO first"),
        ("BABA", ioi_words.BABA_TEMPLATES, "S first"),
    ],
)
def test_abba_and_baba_use_all_15_templates_in_one_order(smol, prompt_type, templates, order):
    ds = smol(prompt_type, N=300)
    assert len(templates) == 15
    assert {p.template for p in ds.prompts} == set(templates)
    assert set(first_clause_order(ds)) == {order}
    assert set(ds.templates_by_prompt) == {prompt_type}


def test_mixed_uses_7_baba_and_7_abba_templates(smol):
    ds = smol(N=300)
    expected = set(ioi_words.BABA_TEMPLATES[:7]) | set(ioi_words.ABBA_TEMPLATES[:7])
    assert len(expected) == 14
    assert {p.template for p in ds.prompts} == expected
    orders = first_clause_order(ds)
    assert set(orders) == {"IO first", "S first"}
    assert ds.templates_by_prompt == ["ABBA" if order == "IO first" else "BABA" for order in orders]


def test_nb_templates_keeps_the_first_templates(smol):
    ds = smol("BABA", N=60, nb_templates=3)
    assert {p.template for p in ds.prompts} == set(ioi_words.BABA_TEMPLATES[:3])


@pytest.mark.parametrize("prompt_type, order", [("ABC", "IO first"), ("BAC", "S first")])
def test_three_name_prompts(smol, tok, prompt_type, order):
    ds = smol(prompt_type)
    templates = ioi_words.ABC_TEMPLATES if prompt_type == "ABC" else ioi_words.BAC_TEMPLATES
    assert {p.template for p in ds.prompts} == set(templates)
    assert set(first_clause_order(ds)) == {order}
    for i, p in enumerate(ds.prompts):
        assert p.c is not None and len({p.io, p.s, p.c}) == 3
        c_id = tok.encode(" " + p.c, add_special_tokens=False)[0]
        assert c_id in ds.toks[i, : int(ds.lengths[i])].tolist()


def test_a_list_of_templates(tok):
    templates = ["Then, [B] and [A] went home. [B] waved to [A]", "When [A] and [B] met, [B] smiled at [A]"]
    ds = quiet_dataset(templates, N=40, tokenizer=tok, seed=3)
    assert {p.template for p in ds.prompts} == set(templates)
    for i, p in enumerate(ds.prompts):
        assert p.text == fill(p.template, p.io, p.s)
        assert p.template_index == templates.index(p.template)
        io_first = p.template.startswith("When")
        assert (ds.word_idx["IO"][i] < ds.word_idx["S1"][i]) == io_first
        assert ds.templates_by_prompt[i] == ("ABBA" if io_first else "BABA")


def test_a_model_with_a_tokenizer_can_stand_in_for_the_tokenizer():
    direct = IOIDataset("mixed", N=8, tokenizer=WordTokenizer(), seed=4)
    via_model = IOIDataset("mixed", N=8, tokenizer=SimpleNamespace(tokenizer=WordTokenizer()), seed=4)
    assert via_model.sentences == direct.sentences


@pytest.mark.parametrize("N", [10, 9])
def test_symmetric_prompts_come_in_mirrored_pairs(tok, N):
    ds = quiet_dataset("mixed", N=N, tokenizer=tok, seed=5, symmetric=True)
    assert len(ds) == N == len(ds.sentences) == ds.toks.shape[0]
    for first, second in zip(ds.prompts[0 : N - 1 : 2], ds.prompts[1:N:2]):
        assert (second.io, second.s) == (first.s, first.io)
        assert (second.template, second.place, second.object) == (first.template, first.place, first.object)
        assert second.text == fill(first.template, first.s, first.io, None, first.place, first.object)
    plain = quiet_dataset("mixed", N=N, tokenizer=tok, seed=5)
    assert not any((b.io, b.s) == (a.s, a.io) for a, b in zip(plain.prompts[0 : N - 1 : 2], plain.prompts[1:N:2]))


# Slicing, groups, answers


@pytest.mark.parametrize("key", [slice(2, 5), slice(None, None, 3), slice(-4, None)])
def test_slicing_gives_the_dataset_of_those_prompts(smol, tok, key):
    ds = smol()
    part = ds[key]
    rows = list(range(ds.N))[key]
    assert part.sentences == [ds.sentences[i] for i in rows]
    width = int(ds.lengths[rows].max())
    assert torch.equal(part.toks, ds.toks[rows, :width])
    assert (ds.toks[rows, width:] == pad_id(tok)).all()
    for key_name, positions in ds.word_idx.items():
        assert torch.equal(part.word_idx[key_name], positions[rows]), key_name
    assert torch.equal(part.answers, ds.answers[rows])
    direct = IOIDataset(prompts=ds.prompts[key], tokenizer=tok)
    assert direct.sentences == part.sentences and torch.equal(direct.toks, part.toks)


def test_slicing_keeps_prepend_bos(smol, tok):
    part = smol(prepend_bos=True)[2:5]
    assert (part.toks[:, 0] == tok.bos_token_id).all()
    assert torch.equal(part.word_idx["IO"], smol(prepend_bos=True).word_idx["IO"][2:5])


def test_slicing_a_flipped_dataset(smol):
    flipped = smol().flipped("ABB->XYZ, BAB->XYZ")
    part = flipped[2:5]
    assert part.sentences == flipped.sentences[2:5]
    for key, positions in flipped.word_idx.items():
        assert torch.equal(part.word_idx[key], positions[2:5]), key


def test_indexing_with_an_int_is_an_error(smol):
    with raises(r"Index an IOIDataset with a slice"):
        smol()[0]


def test_groups_partition_the_prompts_by_template(smol):
    ds = smol()
    groups = [group.tolist() for group in ds.groups]
    assert sorted(i for group in groups for i in group) == list(range(ds.N))
    templates = [{ds.prompts[i].template for i in group} for group in groups]
    assert all(len(t) == 1 for t in templates)
    assert len({t.pop() for t in templates}) == len(groups) == len({p.template for p in ds.prompts})


@pytest.mark.parametrize("prompt_type", ["mixed", "ABC"])
def test_answers_are_the_io_and_s_token_ids(smol, tok, prompt_type):
    ds = smol(prompt_type)
    expected = [
        [tok.encode(" " + p.io, add_special_tokens=False)[0], tok.encode(" " + p.s, add_special_tokens=False)[0]]
        for p in ds.prompts
    ]
    assert ds.answers.tolist() == expected
    assert torch.equal(ds.answers, torch.stack([ds.io_token_ids, ds.s_token_ids], dim=1))
    assert not ds.answers.dtype.is_floating_point
    assert torch.equal(ds.answers[:, 0], ds.toks[torch.arange(ds.N), ds.lengths - 1])


# flipped()


def test_the_flips_are_the_spec_flips():
    assert set(FLIPS) == SPEC_FLIPS and len(FLIPS) == len(SPEC_FLIPS)


@pytest.mark.parametrize("flip", sorted(SPEC_FLIPS))
def test_flipped_names_follow_the_new_order(smol, tok, flip):
    clean = smol()
    flipped = clean.flipped(flip)
    rules = parse_flip(flip)
    assert flipped.toks.shape == clean.toks.shape
    assert torch.equal(flipped.lengths, clean.lengths)
    for key, positions in clean.word_idx.items():
        assert torch.equal(flipped.word_idx[key], positions), key
    io_ids, s_ids = [], []
    for i, (p, q) in enumerate(zip(clean.prompts, flipped.prompts)):
        io, s1, s2 = (int(clean.word_idx[key][i]) for key in ("IO", "S1", "S2"))
        new = rules["ABB" if io < s1 else "BAB"]
        slots = [min(io, s1), max(io, s1), s2]
        names = {"A": p.io, "B": p.s}
        text_names = slot_names(p, q.text)
        assert text_names[3] == p.io and q.template == p.template
        for slot, letter, text_name in zip(slots, new, text_names):
            token_name = tok.decode([int(flipped.toks[i, slot])])
            assert token_name == " " + text_name
            if letter in names:
                assert text_name == names[letter], (flip, p.text, q.text)
            else:
                assert text_name not in (p.io, p.s) and text_name in clean.names, (flip, p.text, q.text)
                names[letter] = text_name
        others = [j for j in range(clean.toks.shape[1]) if j not in slots]
        assert torch.equal(flipped.toks[i, others], clean.toks[i, others])
        io_letter, s_letter = ANSWER_LETTERS[new]
        assert (q.io, q.s) == (names[io_letter], names[s_letter])
        io_ids.append(tok.encode(" " + q.io, add_special_tokens=False)[0])
        s_ids.append(tok.encode(" " + q.s, add_special_tokens=False)[0])
    assert flipped.answers.tolist() == [list(pair) for pair in zip(io_ids, s_ids)]


def test_xyz_flip_draws_new_names_for_every_prompt(smol):
    clean = smol()
    flipped = clean.flipped("ABB->XYZ, BAB->XYZ")
    new_names = [slot_names(p, q.text)[:3] for p, q in zip(clean.prompts, flipped.prompts)]
    assert all(not set(names) & {p.io, p.s} for names, p in zip(new_names, clean.prompts))
    assert len({name for names in new_names for name in names}) > 30
    assert flipped.sentences == clean.flipped("ABB->XYZ, BAB->XYZ").sentences


def test_flipping_keeps_prepend_bos(smol, tok):
    clean = smol(prepend_bos=True)
    flipped = clean.flipped("ABB->CDD, BAB->DCD")
    assert (flipped.toks[:, 0] == tok.bos_token_id).all()
    assert torch.equal(flipped.word_idx["S2"], clean.word_idx["S2"])
    s2 = clean.word_idx["S2"]
    assert (flipped.toks[torch.arange(clean.N), s2] != clean.toks[torch.arange(clean.N), s2]).all()


@pytest.mark.parametrize("prompt_type", ["ABC", "BAC"])
def test_three_name_datasets_cannot_be_flipped(smol, prompt_type):
    with raises(r"Only two-name \(ABBA/BABA\) prompts can be flipped"):
        smol(prompt_type).flipped("ABB->XYZ, BAB->XYZ")


@pytest.mark.parametrize(
    "flip, match",
    [
        ("ABB->XY, BAB->XYZ", r"Cannot read the flip 'ABB->XY, BAB->XYZ'"),
        ("ABB->xyz, BAB->XYZ", r"Cannot read the flip"),
        ("ABB=>XYZ, BAB->XYZ", r"Cannot read the flip"),
        ("AAB->XYZ, BAB->XYZ", r"Cannot read the flip"),
        ("ABB->X1Z, BAB->XYZ", r"Cannot read the flip"),
        ("", r"Cannot read the flip ''"),
        ("ABB->XYZ", r"needs a rule for ABB and one for BAB"),
        ("ABB->XYZ, ABB->CDD", r"needs a rule for ABB and one for BAB"),
    ],
)
def test_malformed_flips_are_errors(smol, flip, match):
    with raises(match):
        smol().flipped(flip)


# Errors


def test_unknown_prompt_type():
    with raises(r"Unknown prompt_type 'ABAB'.*'mixed'"):
        IOIDataset("ABAB", N=5, tokenizer=WordTokenizer())


def test_empty_template_list():
    with raises(r"non-empty list of template strings"):
        IOIDataset([], N=5, tokenizer=WordTokenizer())


def test_empty_template_list_message_names_the_prompt_types():
    with raises(r"'mixed'"):
        IOIDataset([], N=5, tokenizer=WordTokenizer())


@pytest.mark.parametrize("N", [0, -3, 2.5, True])
def test_n_must_be_a_positive_int(N):
    with raises(rf"N must be a positive number of prompts, got {re.escape(repr(N))}"):
        IOIDataset("mixed", N=N, tokenizer=WordTokenizer())


@pytest.mark.parametrize("tokenizer", [None, object()])
def test_a_tokenizer_is_needed(tokenizer):
    with raises(r"IOIDataset needs a tokenizer"):
        IOIDataset("mixed", N=5, tokenizer=tokenizer)


def test_prepend_bos_needs_a_bos_token():
    with raises(r"prepend_bos=True, but this tokenizer has no BOS token"):
        IOIDataset("mixed", N=5, tokenizer=WordTokenizer(bos=False), prepend_bos=True)
    assert IOIDataset("mixed", N=5, tokenizer=WordTokenizer(bos=False)).toks.shape[0] == 5


# The prior art's call forms


def test_tokenizer_may_be_the_third_argument_as_in_the_prior_art(tok):
    positional = quiet_dataset("mixed", 6, tok, seed=3)
    assert positional.sentences == quiet_dataset("mixed", N=6, tokenizer=tok, seed=3).sentences
    assert positional.io_tokenIDs == positional.io_token_ids.tolist() and isinstance(positional.s_tokenIDs, list)
    assert (
        positional.copy().sentences == positional.sentences and positional.copy().toks.device == positional.toks.device
    )


def test_prior_art_prompt_dicts_and_tuple_flips_get_clear_errors(tok):
    ds = quiet_dataset("mixed", N=4, tokenizer=tok, seed=0)
    with raises(r"prompts must be IOIPrompt objects .*got a dict.*prompt dicts are not accepted"):
        IOIDataset("mixed", N=4, tokenizer=tok, prompts=ds.ioi_prompts)
    with raises(r"A flip is a string like 'ABB->XYZ, BAB->XYZ', got \('IO', 'RAND'\)"):
        ds.gen_flipped_prompts(("IO", "RAND"))
    assert ds.ioi_prompts[0]["IO"] == ds.prompts[0].io and ds.ioi_prompts[0]["text"] == ds.sentences[0]
