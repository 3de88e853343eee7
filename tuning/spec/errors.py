"""The one error of a search-space file: which file, which key, what it got, what was expected."""
from __future__ import annotations

from typing import Any


class SpaceError(ValueError):
    """A search-space file is wrong: ``file: key: got value, expected ...``."""

    def __init__(self, file: str, key: str, value: Any, expected: str):
        self.file, self.key, self.value, self.expected = file, key, value, expected
        super().__init__(f"{file}: {key}: got {value!r}, expected {expected}")
