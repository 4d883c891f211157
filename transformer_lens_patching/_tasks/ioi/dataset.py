"""Indirect-object-identification (IOI) prompts: a seeded dataset, its corrupted versions,
and the 8 hand-written example prompts.

"When Mary and John went to the store, John gave a drink to" -> " Mary": the model must
name the indirect object (IO), not the repeated subject (S).
"""

import random
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy
import torch

from ...errors import PatchingError
from . import words as ioi_words

PROMPT_TYPES = ("mixed", "ABBA", "BABA", "ABC", "BAC", "ABC mixed")
POSITION_KEYS = ("IO", "IO-1", "IO+1", "S1", "S1-1", "S1+1", "S2", "end", "starts", "punct")
FLIPS = (
    "ABB->XYZ, BAB->XYZ",
    "ABB->CDD, BAB->DCD",
    "ABB->BAA, BAB->ABA",
    "ABB->BAB, BAB->ABB",
    "ABB->DCD, BAB->CDD",
    "ABB->ABA, BAB->BAA",
)
"""The flips of the IOI paper and ARENA's IOI chapter (see `IOIDataset.flipped`)."""


@dataclass(frozen=True)
class IOIPrompt:
    """One prompt: its text (ending with the answer, the IO name) and the words in it.

    `pattern` is the order of the three name slots: "ABB" when IO comes first, "BAB" when
    S does (for three-name prompts, "ABC" or "BAC").
    """

    text: str
    io: str
    s: str
    template: str
    template_index: int
    place: str
    object: str
    pattern: str
    c: str | None = None


def _templates(prompt_type, nb_templates: int | None, rng: random.Random) -> tuple[list[str], bool]:
    """The templates to draw from, and whether they have three names."""
    if not isinstance(prompt_type, str):
        templates = list(prompt_type)
        if not templates or not all(isinstance(t, str) for t in templates):
            raise PatchingError(f"prompt_type must be one of {PROMPT_TYPES} or a non-empty list of template strings.")
        return templates, any("[C]" in t for t in templates)
    if prompt_type not in PROMPT_TYPES:
        raise PatchingError(
            f"Unknown prompt_type {prompt_type!r}: expected one of {PROMPT_TYPES} or a list of templates."
        )
    count = nb_templates or len(ioi_words.BABA_TEMPLATES)
    half = count // 2
    chosen = {
        "ABBA": list(ioi_words.ABBA_TEMPLATES[:count]),
        "BABA": list(ioi_words.BABA_TEMPLATES[:count]),
        "mixed": list(ioi_words.BABA_TEMPLATES[:half] + ioi_words.ABBA_TEMPLATES[:half]),
        "ABC": list(ioi_words.ABC_TEMPLATES[:count]),
        "BAC": list(ioi_words.BAC_TEMPLATES[:count]),
        "ABC mixed": list(ioi_words.ABC_TEMPLATES[:half] + ioi_words.BAC_TEMPLATES[:half]),
    }[prompt_type]
    if prompt_type.endswith("mixed"):
        rng.shuffle(chosen)
    return chosen, prompt_type.startswith(("ABC", "BAC"))


def _pattern(template: str, three_names: bool) -> str:
    """The order of the first three name slots, with the repeated subject written as B."""
    slots = re.findall(r"\[([ABC])\]", template)[:3]
    if three_names:
        return "".join(slots)
    return "ABB" if slots[0] == "A" else "BAB"


def _draw_prompts(templates, names, n, symmetric, three_names, rng) -> list[IOIPrompt]:
    prompts: list[IOIPrompt] = []
    while len(prompts) < n:
        template = rng.choice(templates)
        drawn: tuple[str, ...] = ()
        while len(set(drawn)) < 3:
            drawn = (rng.choice(names), rng.choice(names), rng.choice(names))
        io, s, c = drawn
        place, obj = rng.choice(ioi_words.PLACES), rng.choice(ioi_words.OBJECTS)
        filled = template.replace("[PLACE]", place).replace("[OBJECT]", obj)
        pairs = [(io, s)] + ([(s, io)] if symmetric and len(prompts) + 1 < n else [])
        for first, second in pairs:
            text = filled.replace("[A]", first).replace("[B]", second)
            if three_names:
                text = text.replace("[C]", c)
            index = templates.index(template)
            prompts.append(
                IOIPrompt(
                    text,
                    first,
                    second,
                    template,
                    index,
                    place,
                    obj,
                    _pattern(template, three_names),
                    c if three_names else None,
                )
            )
    return prompts


def _tokenizer_of(tokenizer_or_model):
    tokenizer = getattr(tokenizer_or_model, "tokenizer", tokenizer_or_model)
    if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
        raise PatchingError(
            "IOIDataset needs a tokenizer: pass tokenizer=model.tokenizer (or the model itself); "
            f"got {type(tokenizer_or_model).__name__}."
        )
    return tokenizer


def _single_token_names(tokenizer, names: Sequence[str], warn: bool) -> list[str]:
    kept = [name for name in names if len(tokenizer.encode(" " + name, add_special_tokens=False)) == 1]
    dropped = sorted(set(names) - set(kept))
    if dropped and warn:
        warnings.warn(
            f"{len(dropped)} of {len(names)} IOI names are not single tokens for this tokenizer and are not used: "
            f"{', '.join(dropped)}.",
            stacklevel=3,
        )
    if len(kept) < 3:
        raise PatchingError(f"Only {len(kept)} IOI names are single tokens for this tokenizer; at least 3 are needed.")
    return kept


class IOIDataset:
    """Seeded IOI prompts, tokenized, with the position of each word in each prompt.

    The same `(prompt_type, N, seed)` gives the same prompts in every process (a private
    `random.Random(seed)`, no global seeding, no set iteration). The prompts are the ones
    the IOI paper's dataset code draws for that seed whenever every name is a single token
    (GPT-2's tokenizer); names that are not single tokens for `tokenizer` are dropped,
    with a warning, before drawing.

    Each text ends with the answer (the IO name); the model is read at `word_idx["end"]`,
    the token before it. Prompts of different lengths are right-padded: `toks` holds
    `pad_token_id` after `lengths[i]` tokens, and every position in `word_idx` is counted
    in that prompt's own tokens (BOS included when `prepend_bos`).

    Args:
        prompt_type: "mixed" (7 BABA and 7 ABBA templates, shuffled), "ABBA", "BABA" (all
            15), "ABC", "BAC", "ABC mixed", or a list of templates (see `ioi_words`).
        N: Number of prompts.
        tokenizer: A Hugging Face tokenizer, or a model with a `.tokenizer` (required; the
            third argument, as in the prior art's `IOIDataset`).
        seed: Seed of the draw.
        prepend_bos: Start every prompt with the tokenizer's BOS token.
        symmetric: Follow each prompt by its mirror image (IO and S exchanged).
        nb_templates: Use only the first templates of the list (a "mixed" set takes half
            from each of BABA and ABBA).
        prompts: Use these `IOIPrompt`s instead of drawing (N and seed are then ignored).
        word_idx: Word positions to use instead of finding the names in the tokens (as
            `flipped` does: its prompts keep the clean prompts' positions).
        device: Device of `toks` and of the tensors in `word_idx`.

    >>> from transformers import AutoTokenizer  # doctest: +SKIP
    >>> ds = IOIDataset("mixed", N=25, tokenizer=AutoTokenizer.from_pretrained("gpt2"), seed=1)  # doctest: +SKIP
    >>> ds.sentences[0]  # doctest: +SKIP
    'When Victoria and Jane got a snack at the store, Jane decided to give it to Victoria'
    >>> ds.toks.shape, ds.word_idx["end"][:3], ds.answers[0]  # doctest: +SKIP
    """

    def __init__(
        self,
        prompt_type: str | Sequence[str] = "mixed",
        N: int = 500,
        tokenizer=None,
        *,
        seed: int = 0,
        prepend_bos: bool = False,
        symmetric: bool = False,
        nb_templates: int | None = None,
        prompts: Sequence[IOIPrompt] | None = None,
        word_idx: dict[str, torch.Tensor] | None = None,
        device: str | torch.device = "cpu",
    ):
        self.tokenizer = _tokenizer_of(tokenizer)
        self.prompt_type = prompt_type
        self.seed = seed
        self.prepend_bos = prepend_bos
        self.names = _single_token_names(self.tokenizer, ioi_words.NAMES, warn=prompts is None)
        if prompts is None:
            if isinstance(N, bool) or not isinstance(N, int) or N < 1:
                raise PatchingError(f"N must be a positive number of prompts, got {N!r}.")
            rng = random.Random(seed)
            templates, three_names = _templates(prompt_type, nb_templates, rng)
            prompts = _draw_prompts(templates, self.names, N, symmetric, three_names, rng)
        self.prompts: list[IOIPrompt] = _checked_prompts(prompts)
        self.N = len(self.prompts)
        self.sentences = [prompt.text for prompt in self.prompts]
        self.templates_by_prompt = ["ABBA" if p.pattern.startswith("AB") else "BABA" for p in self.prompts]
        self.io_token_ids = torch.tensor([self._name_token(p.io) for p in self.prompts])
        self.s_token_ids = torch.tensor([self._name_token(p.s) for p in self.prompts])
        token_lists = [self._tokens(p.text) for p in self.prompts]
        self.lengths = torch.tensor([len(tokens) for tokens in token_lists])
        self.max_len = int(self.lengths.max())
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.toks = torch.tensor([tokens + [pad] * (self.max_len - len(tokens)) for tokens in token_lists])
        self.word_idx = dict(word_idx) if word_idx is not None else self._word_positions(token_lists)
        self.to(device)

    def _name_token(self, name: str) -> int:
        ids = self.tokenizer.encode(" " + name, add_special_tokens=False)
        if len(ids) != 1:
            raise PatchingError(
                f"The name {name!r} is {len(ids)} tokens for this tokenizer; IOI names must be one token."
            )
        return ids[0]

    def _tokens(self, text: str) -> list[int]:
        tokens = self.tokenizer.encode(text, add_special_tokens=False)
        if not self.prepend_bos:
            return tokens
        if self.tokenizer.bos_token_id is None:
            raise PatchingError("prepend_bos=True, but this tokenizer has no BOS token.")
        return [self.tokenizer.bos_token_id] + tokens

    def _word_positions(self, token_lists: list[list[int]]) -> dict[str, torch.Tensor]:
        keys = {key: [] for key in ("IO", "S1", "S2", "end", "punct")}
        punctuation = {
            token for mark in (",", ".") for token in self.tokenizer.encode(mark, add_special_tokens=False)[:1]
        }
        for prompt, tokens, io, s in zip(
            self.prompts, token_lists, self.io_token_ids.tolist(), self.s_token_ids.tolist()
        ):
            body = tokens[:-1]
            if tokens[-1] != io or io not in body or s not in body:
                raise PatchingError(
                    f"Cannot find the names of {prompt.text!r} among its tokens: the tokenizer merges a name with "
                    "its neighbours, so word positions cannot be given for it."
                )
            s_positions = [i for i, token in enumerate(body) if token == s]
            keys["IO"].append(body.index(io))
            keys["S1"].append(s_positions[0])
            keys["S2"].append(s_positions[-1])
            keys["end"].append(len(tokens) - 2)
            marks = [i for i in range(s_positions[-1]) if body[i] in punctuation]
            keys["punct"].append(marks[-1] if marks else 0)
        idx = {key: torch.tensor(values) for key, values in keys.items()}
        for name in ("IO", "S1"):
            idx[f"{name}-1"], idx[f"{name}+1"] = idx[name] - 1, idx[name] + 1
        idx["starts"] = torch.zeros_like(idx["end"])
        return {key: idx[key] for key in POSITION_KEYS}

    @property
    def io_tokenIDs(self) -> list[int]:  # noqa: N802 (the prior art's name)
        """The IO token id of each prompt, as a list (the prior art's `io_tokenIDs`)."""
        return self.io_token_ids.tolist()

    @property
    def s_tokenIDs(self) -> list[int]:  # noqa: N802 (the prior art's name)
        """The S token id of each prompt, as a list (the prior art's `s_tokenIDs`)."""
        return self.s_token_ids.tolist()

    @property
    def ioi_prompts(self) -> list[dict]:
        """Each prompt as the prior art's dict: text, IO, S, TEMPLATE_IDX, [PLACE], [OBJECT] (and C)."""
        return [
            {
                "text": p.text,
                "IO": p.io,
                "S": p.s,
                "TEMPLATE_IDX": p.template_index,
                "[PLACE]": p.place,
                "[OBJECT]": p.object,
                **({"C": p.c} if p.c is not None else {}),
            }
            for p in self.prompts
        ]

    def copy(self) -> "IOIDataset":
        """A copy with the same prompts, word positions and device."""
        return self._with_prompts(self.prompts, self.word_idx)

    @property
    def answers(self) -> torch.Tensor:
        """(N, 2) token ids: the right answer (IO), then the wrong one (S)."""
        return torch.stack([self.io_token_ids, self.s_token_ids], dim=1)

    @property
    def groups(self) -> list[torch.Tensor]:
        """Indices of the prompts of each template (for mean ablation per template)."""
        indices = torch.tensor([p.template_index for p in self.prompts])
        return [(indices == value).nonzero().flatten() for value in indices.unique()]

    def to(self, device: str | torch.device) -> "IOIDataset":
        """Move `toks`, `answers` and `word_idx` to `device` (in place); returns self."""
        self.toks = self.toks.to(device)
        self.io_token_ids = self.io_token_ids.to(device)
        self.s_token_ids = self.s_token_ids.to(device)
        self.lengths = self.lengths.to(device)
        self.word_idx = {key: value.to(device) for key, value in self.word_idx.items()}
        return self

    def __len__(self) -> int:
        return self.N

    def __getitem__(self, key: slice) -> "IOIDataset":
        """The prompts `key` selects, as a new dataset."""
        if not isinstance(key, slice):
            raise PatchingError(f"Index an IOIDataset with a slice (e.g. ds[:10]), got {type(key).__name__}.")
        return self._with_prompts(self.prompts[key], {name: idx[key] for name, idx in self.word_idx.items()})

    def _with_prompts(self, prompts: Sequence[IOIPrompt], word_idx=None) -> "IOIDataset":
        return IOIDataset(
            self.prompt_type,
            len(prompts),
            tokenizer=self.tokenizer,
            seed=self.seed,
            prepend_bos=self.prepend_bos,
            prompts=prompts,
            word_idx=word_idx,
            device=self.toks.device,
        )

    def flipped(self, flip: str) -> "IOIDataset":
        """A corrupted copy: the names of each prompt rewritten by `flip`, e.g. "ABB->XYZ, BAB->XYZ".

        `flip` maps the name order of ABBA prompts ("ABB": IO, S, S) and of BABA prompts
        ("BAB") to a new one. Letters of the old order keep their names; each other letter
        gets a name drawn (deterministically, from `seed` and `flip`) from the names not in
        the prompt, one draw per letter, so X, Y and Z may coincide. The final word (the
        clean answer) is left as it is, so the clean `answers` still score the flipped run;
        the flipped dataset's own `answers` follow its new IO and S. Word positions are
        those of the clean prompts (the names are single tokens in the same places).

        >>> ds.flipped("ABB->XYZ, BAB->XYZ").sentences[0]  # doctest: +SKIP
        'When Alan and Sullivan got a snack at the store, Adam decided to give it to Victoria'
        """
        rules = _parse_flip(flip)
        rng = numpy.random.RandomState(self.seed + sum(map(ord, flip)))
        flipped = []
        for prompt in self.prompts:
            if prompt.c is not None:
                raise PatchingError("Only two-name (ABBA/BABA) prompts can be flipped; this dataset has three names.")
            old, new = rules[prompt.pattern]
            flipped.append(_flip_prompt(prompt, old, new, self.names, rng))
        return self._with_prompts(flipped, self.word_idx)

    gen_flipped_prompts = flipped

    def str_tokens(self, index: int) -> list[str]:
        """The tokens of prompt `index` as strings (padding excluded), e.g. for plot labels."""
        tokens = self.toks[index, : int(self.lengths[index])].tolist()
        return [self.tokenizer.decode([token]) for token in tokens]


def _checked_prompts(prompts) -> list[IOIPrompt]:
    prompts = list(prompts)
    wrong = next((p for p in prompts if not isinstance(p, IOIPrompt)), None)
    if wrong is not None:
        raise PatchingError(
            f"prompts must be IOIPrompt objects (e.g. another dataset's .prompts), got a {type(wrong).__name__}. "
            "The prior art's prompt dicts are not accepted: draw prompts with prompt_type, N and seed, "
            "or build IOIPrompt(text, io, s, template, template_index, place, object, pattern)."
        )
    return prompts


def _parse_flip(flip: str) -> dict[str, tuple[str, str]]:
    if not isinstance(flip, str):
        raise PatchingError(
            f"A flip is a string like 'ABB->XYZ, BAB->XYZ', got {flip!r}; known flips: {', '.join(FLIPS)}. "
            "(The older IOI code's tuple flips, such as ('IO', 'RAND'), are not supported.)"
        )
    rules = {}
    for part in flip.split(","):
        old, arrow, new = part.strip().partition("->")
        old, new = old.strip(), new.strip()
        if not arrow or old not in ("ABB", "BAB") or len(new) != 3 or not new.isalpha() or not new.isupper():
            raise PatchingError(
                f"Cannot read the flip {flip!r}: expected two rules like 'ABB->XYZ, BAB->XYZ' "
                f"(old name order ABB or BAB, new order three capital letters); known flips: {', '.join(FLIPS)}."
            )
        rules[old] = (old, new)
    if set(rules) != {"ABB", "BAB"}:
        raise PatchingError(f"The flip {flip!r} needs a rule for ABB and one for BAB, e.g. 'ABB->XYZ, BAB->XYZ'.")
    return rules


def _flip_prompt(
    prompt: IOIPrompt, old: str, new: str, names: Sequence[str], rng: numpy.random.RandomState
) -> IOIPrompt:
    """`prompt` with its three name slots rewritten from order `old` to order `new`."""
    letter_names = {"A": prompt.io, "B": prompt.s}
    others = [name for name in names if name not in (prompt.io, prompt.s)]
    for letter in dict.fromkeys(new):
        if letter not in letter_names:
            letter_names[letter] = str(rng.choice(others))
    slots = re.findall(r"\[([AB])\]", prompt.template)[:3]
    template = prompt.template.replace("[PLACE]", prompt.place).replace("[OBJECT]", prompt.object)
    for slot, letter in zip(slots, new):
        template = template.replace(f"[{slot}]", "{" + letter + "}", 1)
    text = template.replace("[A]", prompt.io)
    for letter, name in letter_names.items():
        text = text.replace("{" + letter + "}", name)
    s = letter_names[new[-1]]
    unique = [letter for letter in new[:2] if new.count(letter) == 1]
    io = letter_names[unique[0]] if len(unique) == 1 else letter_names[new[1]]
    return replace(prompt, text=text, io=io, s=s)


EXAMPLE_FORMATS = (
    "When John and Mary went to the shops,{} gave the bag to",
    "When Tom and James went to the park,{} gave the ball to",
    "When Dan and Sid went to the shops,{} gave an apple to",
    "After Martin and Amy went to the park,{} gave a drink to",
)
"""Formats of the 8 example prompts; `{}` is the subject of the second clause."""
EXAMPLE_NAMES = ((" John", " Mary"), (" Tom", " James"), (" Dan", " Sid"), (" Martin", " Amy"))
"""The two names of each example format."""


def example_prompts(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean tokens, corrupted tokens and (IO, S) answer ids for the 8 example prompts of
    TransformerLens' exploratory analysis demo.

    Each format gives two prompts, one with each name as the subject. A corrupted prompt
    is its neighbour: the same words with the other subject, so its answers are swapped.
    Tokens start with BOS; all prompts have the same length for GPT-2's and SmolLM2's
    tokenizers.

    >>> clean, corrupted, answers = example_prompts(model)  # doctest: +SKIP
    >>> answers.shape  # doctest: +SKIP
    torch.Size([8, 2])
    """
    prompts, answers = [], []
    for fmt, (first, second) in zip(EXAMPLE_FORMATS, EXAMPLE_NAMES):
        for subject, indirect in ((first, second), (second, first)):
            prompts.append(fmt.format(subject))
            answers.append((model.to_single_token(indirect), model.to_single_token(subject)))
    clean = model.to_tokens(prompts, prepend_bos=True)
    corrupted = clean[[index ^ 1 for index in range(len(prompts))]]
    return clean, corrupted, torch.tensor(answers, device=clean.device)
