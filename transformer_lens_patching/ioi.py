"""Indirect-object-identification (IOI) prompts.

`example_prompts` gives the 8 hand-written prompts of TransformerLens' exploratory
analysis demo ("When John and Mary went to the shops, John gave the bag to" -> " Mary"),
with their corrupted versions (the other name repeated) and answer tokens.
"""

import torch

FORMATS = (
    "When John and Mary went to the shops,{} gave the bag to",
    "When Tom and James went to the park,{} gave the ball to",
    "When Dan and Sid went to the shops,{} gave an apple to",
    "After Martin and Amy went to the park,{} gave a drink to",
)
"""Prompt formats; `{}` is the subject of the second clause."""
NAMES = ((" John", " Mary"), (" Tom", " James"), (" Dan", " Sid"), (" Martin", " Amy"))
"""The two names of each format."""


def example_prompts(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean tokens, corrupted tokens and (IO, S) answer ids for the 8 example prompts.

    Each format gives two prompts, one with each name as the subject. A corrupted prompt
    is its neighbour: the same words with the other subject, so its answers are swapped.
    Tokens start with BOS; all prompts have the same length for GPT-2's and SmolLM2's
    tokenizers.

    >>> clean, corrupted, answers = example_prompts(model)  # doctest: +SKIP
    >>> answers.shape  # doctest: +SKIP
    torch.Size([8, 2])
    """
    prompts, answers = [], []
    for fmt, (first, second) in zip(FORMATS, NAMES):
        for subject, indirect in ((first, second), (second, first)):
            prompts.append(fmt.format(subject))
            answers.append((model.to_single_token(indirect), model.to_single_token(subject)))
    clean = model.to_tokens(prompts, prepend_bos=True)
    corrupted = clean[[index ^ 1 for index in range(len(prompts))]]
    return clean, corrupted, torch.tensor(answers, device=clean.device)
