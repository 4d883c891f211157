"""The library's one exception type."""


class PatchingError(ValueError):
    """Raised for every invalid Node, IterNode, input, cache or model given to the library.

    Messages say what was wrong, what was expected and, where it helps, the closest
    valid name.
    """
