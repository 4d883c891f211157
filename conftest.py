"""The root conftest: brings tests/conftest.py's `doctest_examples` to the doctests of the package
(a conftest's fixtures reach only the tests in and below its own folder)."""

from tests.conftest import doctest_examples  # noqa: F401
