"""Where the tests find ../shared (reference outputs of official implementations, real annotation
excerpts). The folder sits beside the checkout; tests that need it skip cleanly when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


def shared_file(*parts: str) -> Path:
    """The path of a file under ../shared, or a pytest skip naming it when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared reference folder is not beside this checkout)")
    return path
