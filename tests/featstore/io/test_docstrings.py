"""A builder's documented arguments: the help of the options registries make from them."""
from __future__ import annotations

from featstore.io.docstrings import documented_args


def _builder(dim: int, gating: bool = True, pool: str = "mean") -> None:
    """Build something.

    Args:
        dim: the feature width,
            read from the store.
        gating (bool): gate the rows.

        pool: how windows are pooled.
    Returns:
        Nothing.
    """


def test_each_argument_gets_its_text_with_continuations_joined() -> None:
    assert documented_args(_builder) == {"dim": "the feature width, read from the store.",
                                         "gating": "gate the rows.", "pool": "how windows are pooled."}


def test_a_function_without_an_args_section_documents_nothing() -> None:
    assert documented_args(lambda: None) == {}
