"""Interleaved benchmark rounds: the order of the variants in each round, and paired ratios.

A benchmark that times several variants in one process runs them round by round, so that the
machine's speed changing over minutes hits them alike. :func:`round_order` rotates the order so that
no variant always runs first (or last); :func:`paired_ratio` compares two variants round by round.
"""

from __future__ import annotations

import statistics


def paired_ratio(rates: list[float], base: list[float]) -> float:
    """The median over rounds of ``rates[i] / base[i]``: each round's ratio, taken between variants
    run back to back, so that the machine's speed changing from round to round cancels."""
    return statistics.median(r / b for r, b in zip(rates, base, strict=True))


def round_order(names: list[str], round_index: int) -> list[str]:
    """The order of the variants in round ``round_index``: the list rotated by one per round, so that
    over ``len(names)`` rounds each variant runs once in each position."""
    shift = round_index % len(names)
    return names[shift:] + names[:shift]
