"""The 15 non-empty subsets of the four MRI modalities, in the order the field's tables print them.

The order is that of the RFNet and mmFormer tables (which later papers, MedMAP's included, keep):
the four single modalities, then the six pairs, the four triples and all four::

    T2, T1ce, T1, FLAIR,
    T1ce+T2, T1+T1ce, T1+FLAIR, T1+T2, T2+FLAIR, T1ce+FLAIR,
    T1+T1ce+FLAIR, T1+T2+FLAIR, T1ce+T2+FLAIR, T1+T1ce+T2,
    T1+T1ce+T2+FLAIR

A subset's name lists its modalities in the library's order (t1, t1ce, t2, flair) joined by "+".
:func:`parse_subset` reads names in any order and case, joined by "+", ",", "-", "_" or nothing
("flairt1cet2" too), with "t1c" accepted for t1ce and "all" for the four.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Tuple

import numpy as np

from ..data.labels import MODALITIES

DISPLAY = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}
_ALIASES = {"t1c": "t1ce", "t1gd": "t1ce"}


class Subset(NamedTuple):
    name: str  # e.g. "T1+FLAIR"
    modalities: Tuple[str, ...]  # in MODALITIES order

    @property
    def mask(self) -> np.ndarray:
        """bool (4,) in MODALITIES order."""
        return np.array([m in self.modalities for m in MODALITIES], dtype=bool)

    @property
    def presence(self) -> str:
        """One mark per modality in MODALITIES order: ● present, ○ absent."""
        return "".join("●" if m in self.modalities else "○" for m in MODALITIES)


def make_subset(modalities) -> Subset:
    """The Subset of an iterable of modality names (any order, no repeats)."""
    mods = [m.lower() for m in modalities]
    mods = [_ALIASES.get(m, m) for m in mods]
    bad = [m for m in mods if m not in MODALITIES]
    if bad:
        raise ValueError(f"unknown modality {bad[0]!r}: expected some of {', '.join(MODALITIES)}")
    if len(set(mods)) != len(mods):
        raise ValueError(f"modality listed twice in {list(modalities)}")
    if not mods:
        raise ValueError(f"a modality subset needs at least one of {', '.join(MODALITIES)}, got none")
    ordered = tuple(m for m in MODALITIES if m in mods)
    return Subset("+".join(DISPLAY[m] for m in ordered), ordered)


# fmt: off
_PAPER_ORDER = (
    ("t2",), ("t1ce",), ("t1",), ("flair",),
    ("t1ce", "t2"), ("t1", "t1ce"), ("t1", "flair"), ("t1", "t2"), ("t2", "flair"), ("t1ce", "flair"),
    ("t1", "t1ce", "flair"), ("t1", "t2", "flair"), ("t1ce", "t2", "flair"), ("t1", "t1ce", "t2"),
    ("t1", "t1ce", "t2", "flair"),
)
# fmt: on
SUBSETS: Tuple[Subset, ...] = tuple(make_subset(s) for s in _PAPER_ORDER)

_TOKEN = re.compile(r"flair|t1ce|t1gd|t1c|t1|t2")


def parse_subset(text: str) -> Subset:
    """A Subset from a name such as "T1+FLAIR", "flair,t1", "t1ce_t2", "flairt1cet2" or "all"."""
    if not isinstance(text, str):
        raise TypeError(f"a modality subset must be given as a string such as 'T1+FLAIR', got {type(text).__name__}")
    s = text.strip().lower()
    if s == "all":
        return SUBSETS[-1]
    compact = re.sub(r"[+,\-_\s]", "", s)
    tokens = _TOKEN.findall(compact)
    if not compact or "".join(tokens) != compact:
        raise ValueError(
            f"cannot read {text!r} as a set of modalities: expected names from {', '.join(MODALITIES)} "
            "joined by '+' or ',' (e.g. 'T1+FLAIR', 't1ce,t2') or 'all'"
        )
    return make_subset(tokens)
