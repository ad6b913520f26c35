"""Field checks shared by the run-config validation and `config.model` resolution.

Each check takes a value and the dotted field name it came from, returns the
value when it is valid and otherwise raises `ConfigError(field, value, valid)`.
Booleans are never accepted as numbers: `True` for a batch size is a mistake,
not 1.
"""

import numbers

from maejax.errors import ConfigError


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(value, field: str, minimum: int = 1, optional: bool = False):
    """An integer >= minimum (or None when optional)."""
    if value is None and optional:
        return None
    if not _is_number(value) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(
            field, value, f"must be an integer >= {minimum}" + (", or None" if optional else "")
        )
    return int(value)


def _interval(low, high, low_open: bool, high_open: bool) -> str:
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"


def number(value, field: str, low=None, high=None, low_open=False, high_open=False, optional=False):
    """A real number in the interval given by low/high (open ends where asked), or None when optional."""
    if value is None and optional:
        return None
    ok = _is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        interval = _interval(low, high, low_open, high_open)
        raise ConfigError(field, value, f"must be a number in {interval}" + (", or None" if optional else ""))
    return float(value)


def choice(value, field: str, choices):
    """One of `choices`."""
    if value not in choices:
        raise ConfigError(field, value, f"must be one of {list(choices)}")
    return value


def boolean(value, field: str) -> bool:
    """True or False (not 0/1 or a string, which would read as a silent truthiness test)."""
    if not isinstance(value, bool):
        raise ConfigError(field, value, "must be True or False")
    return value


def string(value, field: str, optional: bool = False):
    """A non-empty string (or None when optional)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(field, value, "must be a non-empty string" + (", or None" if optional else ""))
    return value


def area_range(value, field: str) -> tuple:
    """A (low, high) crop-area fraction pair with 0 < low <= high <= 1."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else value
    if not (
        isinstance(pair, tuple)
        and len(pair) == 2
        and all(map(_is_number, pair))
        and 0 < pair[0] <= pair[1] <= 1
    ):
        raise ConfigError(field, pair, "two numbers (low, high) with 0 < low <= high <= 1")
    return pair
