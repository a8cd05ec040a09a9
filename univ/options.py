"""Parsing of the option values shared by several subcommands."""

import re

from .errors import UnivError

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_count(text: str, what: str = "count") -> int:
    """'1M' -> 1_000_000, '250k' -> 250_000, '10000' -> 10_000, '1.5M' -> 1_500_000."""
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*([kKmMbBgG]?)\s*", text.replace("_", ""))
    if not m:
        raise UnivError(f"{what} must be a number like 10000, 250k or 1M, not {text!r}")
    value = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if value != int(value):
        raise UnivError(f"{what} must be a whole number, not {text!r}")
    if value <= 0:
        raise UnivError(f"{what} must be positive, not {text!r}")
    return int(value)


def parse_layers(text: str, n_layers: int) -> list[int]:
    """'all' -> every layer; '0,3,5-7' -> [0, 3, 5, 6, 7]; '-1' -> the last layer; checked against n_layers."""
    text = text.strip().lower()
    if text == "all":
        return list(range(n_layers))
    layers: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(-?\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UnivError(f"layers must look like 'all' or '0,3,5-7', not {text!r}")
        lo = int(m.group(1))
        if lo < 0 and m.group(2) is None:  # counted from the end, as Python does
            lo += n_layers
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo > hi:
            raise UnivError(f"layer range {part.strip()!r} is empty")
        for layer in (lo, hi):
            if not 0 <= layer < n_layers:
                raise UnivError(f"layer {layer} is out of range: the model has layers 0-{n_layers - 1}")
        layers.update(range(lo, hi + 1))
    return sorted(layers)
