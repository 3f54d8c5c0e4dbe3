"""The modality subsets (order, names, parsing) and the table built from per-case scores."""

import csv
import math

import pytest

from medmap_fast.evaluation import SUBSETS, parse_subset
from medmap_fast.evaluation.report import build_table, format_table, write_heatmap, write_table_csv
from medmap_fast.evaluation.subsets import make_subset


def test_the_15_subsets_in_the_order_of_the_papers():
    assert len(SUBSETS) == 15 and len({s.modalities for s in SUBSETS}) == 15
    assert [len(s.modalities) for s in SUBSETS] == [1] * 4 + [2] * 6 + [3] * 4 + [4]
    assert [s.name for s in SUBSETS] == [
        "T2",
        "T1ce",
        "T1",
        "FLAIR",
        "T1ce+T2",
        "T1+T1ce",
        "T1+FLAIR",
        "T1+T2",
        "T2+FLAIR",
        "T1ce+FLAIR",
        "T1+T1ce+FLAIR",
        "T1+T2+FLAIR",
        "T1ce+T2+FLAIR",
        "T1+T1ce+T2",
        "T1+T1ce+T2+FLAIR",
    ]
    assert SUBSETS[6].presence == "●○○●" and SUBSETS[6].mask.tolist() == [True, False, False, True]


@pytest.mark.parametrize("text", ["T1+FLAIR", "flair,t1", "FLAIR_T1", "flairt1", " t1 + flair "])
def test_parse_subset_reads_names_in_any_order_and_spelling(text):
    assert parse_subset(text).name == "T1+FLAIR"


def test_parse_subset_aliases_and_errors():
    assert parse_subset("flairt1cet1t2").name == "T1+T1ce+T2+FLAIR"
    assert parse_subset("t1c-t2").name == "T1ce+T2"
    assert parse_subset("all") == SUBSETS[-1]
    for bad, msg in (("T1+T5", "cannot read 'T1\\+T5'"), ("", "cannot read ''"), ("t1,t1", "listed twice")):
        with pytest.raises(ValueError, match=msg):
            parse_subset(bad)
    with pytest.raises(ValueError, match="at least one"):
        make_subset([])


def _record(subset, case, dice, scored=True):
    d = dict(zip(("dice_WT", "dice_TC", "dice_ET"), dice if scored else (math.nan,) * 3))
    return {
        "case": case,
        "subset": subset,
        "status": "scored" if scored else "skipped: no t2 file",
        "scored": scored,
        **d,
    }


def test_table_means_and_an_all_skipped_subset(tmp_path):
    subsets = [parse_subset("FLAIR"), parse_subset("T2"), parse_subset("all")]
    records = [
        _record("FLAIR", "a", (0.9, 0.6, 0.3)),
        _record("FLAIR", "b", (0.7, 0.4, 0.1)),
        _record("T2", "a", (0.5, 0.5, 0.5)),
        _record("T2", "b", None, scored=False),
        _record("T1+T1ce+T2+FLAIR", "b", None, scored=False),
    ]
    rows = build_table(records, subsets)
    assert [r["subset"] for r in rows] == ["FLAIR", "T2", "T1+T1ce+T2+FLAIR", "mean"]
    flair, t2, all4, mean = rows
    assert (flair["n"], flair["skipped"]) == (2, 0)
    assert flair["dice_WT"] == pytest.approx(0.8) and flair["dice_mean"] == pytest.approx(0.5)
    assert (t2["n"], t2["skipped"], t2["dice_mean"]) == (1, 1, pytest.approx(0.5))
    assert all4["n"] == 0 and math.isnan(all4["dice_WT"]) and math.isnan(all4["dice_mean"])
    # the mean row averages the subsets that scored a case, each subset counting once
    assert mean["dice_WT"] == pytest.approx((0.8 + 0.5) / 2) and mean["dice_mean"] == pytest.approx(0.5)
    assert (mean["n"], mean["skipped"]) == (3, 2)

    text = format_table(rows)
    line = next(ln for ln in text.splitlines() if ln.startswith("T1+T1ce+T2+FLAIR"))
    assert line.split()[-4:] == ["-", "-", "-", "-"]
    assert next(ln for ln in text.splitlines() if ln.startswith("FLAIR")).split()[-4:] == [
        "80.00",
        "50.00",
        "20.00",
        "50.00",
    ]
    write_table_csv(tmp_path / "t.csv", rows)
    with open(tmp_path / "t.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert got[2]["dice_WT"] == "" and got[0]["flair"] == "1" and got[0]["t2"] == "0" and got[3]["t1"] == ""
    write_heatmap(tmp_path / "t.png", rows)
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.png"]  # no temporary files left
