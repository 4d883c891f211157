"""Griffe extension for the API reference: doctest examples in docstrings become code blocks.

The package's docstrings end with `>>>` examples outside any "Examples:" section, which
Markdown would render as nested block quotes. Each run of lines from a `>>>` line to the
next blank line becomes a fenced `pycon` block, without its `# doctest:` directives.
"""

import re

import griffe

DIRECTIVE = re.compile(r"\s*#\s*doctest:.*$")


def fence_examples(text: str) -> str:
    """`text` with every doctest example fenced as a `pycon` code block."""
    out, indent, in_example, in_fence = [], "", False, False
    for line in text.splitlines():
        stripped = line.lstrip()
        if stripped.startswith("```"):
            in_fence = not in_fence
        if in_example and not stripped:
            out.append(indent + "```")
            in_example = False
        if not in_fence and not in_example and stripped.startswith(">>>"):
            indent = line[: len(line) - len(stripped)]
            out.append(indent + "```pycon")
            in_example = True
        out.append(DIRECTIVE.sub("", line) if in_example else line)
    if in_example:
        out.append(indent + "```")
    return "\n".join(out)


class DoctestExamples(griffe.Extension):
    """Fence the doctest examples of every docstring."""

    def on_object(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_examples(obj.docstring.value)
