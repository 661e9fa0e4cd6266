"""What a request field accepts, and the row that declares it: the value types of seedvr.serving.schema.

Each accepts type describes itself for the error message ("<field> must be ...") and reads a JSON value into
what the request stores, raising Rejected (its text, if any, suggests a fix) for a value it does not take.
"""

import dataclasses
import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MIN_SIDE, MAX_SIDE = 16, 8192  # bounds of res_h and res_w, in pixels

class Rejected(Exception):
    """A value the field does not take; its text, if any, suggests a fix."""


# What a field accepts: `describe()` ends "<field> must be ...", `read()` returns the value to store or raises Rejected.
@dataclass(frozen=True)
class Integer:
    minimum: int
    maximum: int

    def describe(self) -> str:
        return f"an integer between {self.minimum} and {self.maximum}"

    def read(self, value: Any) -> int:
        if isinstance(value, float) and value.is_integer():  # False for NaN and infinities
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not self.minimum <= value <= self.maximum:
            raise Rejected()
        return value


@dataclass(frozen=True)
class Number:
    minimum: float
    maximum: float

    def describe(self) -> str:
        return f"a number between {self.minimum} and {self.maximum}"

    def read(self, value: Any) -> float:
        # Comparing before converting: NaN fails every comparison, and a huge integer cannot overflow.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.minimum <= value <= self.maximum:
            raise Rejected()
        return float(value)


@dataclass(frozen=True)
class Choice:
    options: tuple[str, ...]

    def describe(self) -> str:
        return "one of " + ", ".join(repr(option) for option in self.options)

    def read(self, value: Any) -> str:
        if isinstance(value, str) and value in self.options:
            return value
        raise Rejected(did_you_mean(value, self.options))


@dataclass(frozen=True)
class NonEmptyString:
    def describe(self) -> str:
        return "a non-empty string"

    def read(self, value: Any) -> str:
        if not isinstance(value, str) or not value or value.isspace():
            raise Rejected()
        return value


@dataclass(frozen=True)
class Boolean:
    def describe(self) -> str:
        return "true or false"

    def read(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise Rejected()
        return value


@dataclass(frozen=True)
class Strings:
    """One non-empty string, or a list of 1..max_items of them; read as a tuple."""

    max_items: int

    def describe(self) -> str:
        return f"a non-empty string or a list of 1 to {self.max_items} of them"

    def read(self, value: Any) -> tuple[str, ...]:
        items = value if isinstance(value, list) else [value]
        if not 1 <= len(items) <= self.max_items:
            raise Rejected()
        return tuple(NonEmptyString().read(item) for item in items)


@dataclass(frozen=True)
class Resolution:
    """"WIDTHxHEIGHT", read as (width, height)."""

    def describe(self) -> str:
        return f'"WIDTHxHEIGHT" with sides between {MIN_SIDE} and {MAX_SIDE}, e.g. "3840x2160"'

    def read(self, value: Any) -> tuple[int, int]:
        parts = value.lower().split("x") if isinstance(value, str) else []
        if len(parts) != 2 or not all(part.isascii() and part.isdigit() for part in parts):
            raise Rejected()
        width, height = int(parts[0]), int(parts[1])
        if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
            raise Rejected()
        return width, height


@dataclass(frozen=True)
class Record:
    """A JSON object of exactly these members, each read by its own Accepts; read as a dict."""

    name: str
    members: tuple[tuple[str, "Accepts"], ...]

    def describe(self) -> str:
        return f"{self.name}: an object of " + ", ".join(f"`{name}`" for name, _ in self.members)

    def read(self, value: Any) -> dict:
        if not isinstance(value, dict) or sorted(value) != sorted(name for name, _ in self.members):
            raise Rejected()
        return {name: accepts.read(value[name]) for name, accepts in self.members}


Accepts = Integer | Number | Choice | NonEmptyString | Boolean | Strings | Resolution | Record


def option(default: Any, accepts: Accepts, doc: str, *, in_repr: bool = True) -> Any:
    """Declare a request field: its default, what it accepts and a one-line doc."""
    return dataclasses.field(default=default, repr=in_repr, metadata={"accepts": accepts, "doc": doc})


@dataclass(frozen=True)
class Field:
    """One row of the table."""

    name: str
    accepts: Accepts
    default: Any  # REQUIRED when the client must send it
    doc: str


def did_you_mean(value: Any, candidates: Iterable[str]) -> str:
    if not isinstance(value, str) or len(value) > 64:
        return ""
    close = difflib.get_close_matches(value, candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
