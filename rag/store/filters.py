"""User filters: validated once into a neutral form (:data:`FilterCondition`), translated by each backend.

A user filter comes from an HTTP request, so every size and value is bounded here, before any
backend sees it; a backend only maps the neutral conditions onto its own condition types.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rag.errors import BadRequest

__all__ = [
    "FILTER_FIELDS",
    "MAX_FILTER_FIELDS",
    "MAX_FILTER_STRING",
    "MAX_FILTER_VALUES",
    "METADATA_PREFIX",
    "FieldMatch",
    "FieldMatchAny",
    "FieldRange",
    "FilterCondition",
    "parse_filter",
]

# Bounds for user filters: they come from HTTP requests, so every size is capped.
MAX_FILTER_FIELDS = 16
MAX_FILTER_VALUES = 256
FILTER_FIELDS = {"document_id": str, "title": str, "source": str, "chunk_index": int}
METADATA_PREFIX = "metadata."
# A metadata key becomes part of a Qdrant JSON path: dots, brackets or quotes would change its meaning.
_METADATA_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_RANGE_KEYS = frozenset({"gt", "gte", "lt", "lte"})


@dataclass(frozen=True, slots=True)
class FieldMatch:
    """``key`` equals ``value`` exactly."""

    key: str
    value: str | int | bool


@dataclass(frozen=True, slots=True)
class FieldMatchAny:
    """``key`` equals one of ``values`` (each a str, int or bool)."""

    key: str
    values: tuple[str | int | bool, ...]


@dataclass(frozen=True, slots=True)
class FieldRange:
    """``key`` is a number within the given bounds (None: unbounded)."""

    key: str
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None


FilterCondition = FieldMatch | FieldMatchAny | FieldRange


def parse_filter(user_filter: Mapping[str, Any] | None) -> tuple[FilterCondition, ...]:
    """Validate a user filter into conditions every backend understands; :class:`BadRequest` if invalid.

    Fields: ``document_id``, ``title``, ``source``, ``chunk_index`` and ``metadata.<key>``. A value is
    a scalar (exact match; a float matches numerically), a non-empty list of scalars (match any), or a
    dict of ``gt``/``gte``/``lt``/``lte`` bounds. Conditions on different fields all must hold.
    """
    if user_filter is None:
        return ()
    if not isinstance(user_filter, Mapping):
        raise BadRequest(f"filter must be an object mapping fields to values, not {type(user_filter).__name__}")
    if len(user_filter) > MAX_FILTER_FIELDS:
        raise BadRequest(f"filter has {len(user_filter)} fields; at most {MAX_FILTER_FIELDS} are allowed")
    return tuple(_parse_condition(field, value) for field, value in user_filter.items())


def _parse_condition(field: object, value: object) -> FilterCondition:
    if not isinstance(field, str):
        raise BadRequest(f"filter field {field!r} must be a string")
    if field.startswith(METADATA_PREFIX):
        if not _METADATA_KEY.match(field[len(METADATA_PREFIX):]):
            raise BadRequest(
                f"filter field {field!r}: a metadata key must be 1-64 letters, digits, '_' or '-'"
            )
        expected: type | None = None  # metadata values may be of any scalar type
    elif field in FILTER_FIELDS:
        expected = FILTER_FIELDS[field]
    else:
        raise BadRequest(
            f"filter field {field!r} is not filterable; use one of "
            f"{', '.join(sorted(FILTER_FIELDS))} or metadata.<key>"
        )

    if isinstance(value, Mapping):
        return _parse_range(field, value, expected)
    if isinstance(value, (list, tuple)):
        if not value:
            raise BadRequest(f"filter field {field!r}: an empty list matches nothing")
        if len(value) > MAX_FILTER_VALUES:
            raise BadRequest(f"filter field {field!r}: at most {MAX_FILTER_VALUES} values are allowed")
        values = []
        for item in value:
            if isinstance(item, float) or not _is_scalar(item):
                raise BadRequest(
                    f"filter field {field!r}: list items must be strings, integers or booleans, not {item!r}"
                )
            _check_type(field, item, expected)
            if item not in values:
                values.append(item)
        return FieldMatch(field, values[0]) if len(values) == 1 else FieldMatchAny(field, tuple(values))
    if isinstance(value, float):
        # Qdrant matches floats only through ranges; a point range is the exact numeric match.
        if expected is str:
            raise BadRequest(f"filter field {field!r} expects a string, not {value!r}")
        if not math.isfinite(value):
            raise BadRequest(f"filter field {field!r}: {value!r} is not a finite number")
        return FieldRange(field, gte=value, lte=value)
    if _is_scalar(value):
        _check_type(field, value, expected)
        return FieldMatch(field, value)  # type: ignore[arg-type]
    raise BadRequest(
        f"filter field {field!r}: expected a string, number, boolean, list of those, "
        f"or an object of gt/gte/lt/lte; got {value!r}"
    )


def _parse_range(field: str, value: Mapping[Any, Any], expected: type | None) -> FieldRange:
    if expected is str:
        raise BadRequest(f"filter field {field!r} holds text; a range (gt/gte/lt/lte) does not apply")
    keys = set(value)
    if not keys or not keys <= _RANGE_KEYS:
        raise BadRequest(
            f"filter field {field!r}: a range takes one or more of gt, gte, lt, lte; got {sorted(map(str, keys))}"
        )
    bounds: dict[str, float] = {}
    for key, bound in value.items():
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not _finite(bound):
            raise BadRequest(f"filter field {field!r}: range bound {key} must be a finite number, not {bound!r}",
                             code="invalid_filter")
        bounds[key] = float(bound) if isinstance(bound, int) and not _INT64[0] <= bound <= _INT64[1] else bound
    return FieldRange(field, **bounds)


def _finite(number: int | float) -> bool:
    """A bound a float64 comparison can use: ints of any size are fine up to float64's range."""
    if isinstance(number, int):
        return -_MAX_BOUND <= number <= _MAX_BOUND
    return math.isfinite(number)


def _is_scalar(value: object) -> bool:
    return isinstance(value, (str, int, bool))


# Qdrant stores integers as int64; a larger one fails deep inside the engine instead of as a 400.
_INT64 = (-(2**63), 2**63 - 1)
# Qdrant ranges are float64 comparisons; a bound beyond this has no meaning a stored value could meet.
_MAX_BOUND = 1.7976931348623157e308
MAX_FILTER_STRING = 1024


def _check_value(field: str, value: object) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
        raise BadRequest(f"filter field {field!r}: {value} is outside the 64-bit integer range", code="invalid_filter")
    if isinstance(value, str) and len(value) > MAX_FILTER_STRING:
        raise BadRequest(f"filter field {field!r}: a value is longer than {MAX_FILTER_STRING} characters",
                         code="invalid_filter")


def _check_type(field: str, value: object, expected: type | None) -> None:
    _check_value(field, value)
    if expected is None:
        return
    # bool is an int in Python; chunk_index = true must not silently mean chunk 1.
    ok = isinstance(value, str) if expected is str else isinstance(value, int) and not isinstance(value, bool)
    if not ok:
        kind = "a string" if expected is str else "an integer"
        raise BadRequest(f"filter field {field!r} expects {kind}, not {value!r}")
