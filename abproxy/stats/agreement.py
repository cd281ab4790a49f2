"""How far a judge can be trusted: the rank correlation between its scores and the users' own
feedback on the same requests (Spearman's ρ, ties given their mean rank, as scipy computes it).
Pure: the counts of each pair of scores come in, kept by Redis as they arrive."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import stats

MIN_PAIRS = 3
"""Fewer requests scored by both say nothing about agreement."""


def parse_pairs(raw: Mapping[str, str]) -> dict[tuple[float, float], int]:
    """``{"<judge's score>|<user's score>": "<count>"}`` as Redis keeps it; anything else (a hand
    edit) is left out."""
    pairs: dict[tuple[float, float], int] = {}
    for cell, count in raw.items():
        judge, _, user = cell.partition("|")
        try:
            key, number = (float(judge), float(user)), int(count)
        except ValueError:
            continue
        if number > 0:
            pairs[key] = pairs.get(key, 0) + number
    return pairs


def rank_agreement(pairs: Mapping[tuple[float, float], int]) -> tuple[int, float | None, float | None]:
    """(requests scored by both, Spearman's ρ, its two-sided p-value); ρ and p are None with
    fewer than :data:`MIN_PAIRS` requests, or when either side gave one score to all of them."""
    n = sum(pairs.values())
    if n < MIN_PAIRS:
        return n, None, None
    cells = list(pairs)
    counts = np.fromiter((pairs[cell] for cell in cells), dtype=np.int64, count=len(cells))
    judge = np.repeat(np.fromiter((cell[0] for cell in cells), dtype=float, count=len(cells)), counts)
    user = np.repeat(np.fromiter((cell[1] for cell in cells), dtype=float, count=len(cells)), counts)
    if np.all(judge == judge[0]) or np.all(user == user[0]):
        return n, None, None
    rho, p_value = stats.spearmanr(judge, user)
    return n, float(rho), float(p_value)
