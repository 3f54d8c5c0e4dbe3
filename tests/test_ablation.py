"""medmap-fast ablation: end to end on tiny volumes, the CSV schema, resume after a real kill, arms spread over
processes, and the statistics."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from medmap_fast.ablation import Plan, paired_interval, run_ablation, summarise
from medmap_fast.ablation.cli import main as ablation_main
from medmap_fast.ablation.cli import build_parser, plan_from_args
from medmap_fast.ablation.stats import COLUMNS, ROWS, ArmScores

from training_helpers import tiny_config, tiny_data  # noqa: F401 (fixture)

TINY = ["--patch-size", "16", "16", "16", "--base-channels", "4", "--depth", "3", "--max-channels", "16",
        "--epochs", "1", "--iterations-per-epoch", "2", "--num-workers", "0", "--cache", "false", "--val-cases", "2",
        "--val-window", "32", "32", "32", "--foreground-prob", "0.9", "--lr", "3e-3", "-q"]  # one window per case


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_end_to_end_two_arms_and_the_csv_schema(tiny_data, tmp_path, capsys):
    out = tmp_path / "ab"
    assert ablation_main([str(tiny_data), "--out", str(out), "--anchors", "none,learned", "--seeds", "1", *TINY]) == 0
    for name in ("ablation.csv", "ablation.md", "ablation.png", "features.png", "ablation.json"):
        assert (out / name).is_file(), name
    with open(out / "ablation.csv", newline="") as f:
        assert next(csv.reader(f)) == list(COLUMNS)
    rows = _rows(out / "ablation.csv")
    assert [(r["anchor"], r["subset"]) for r in rows] == [(a, s) for a in ("none", "learned") for s in ROWS]
    for r in rows:
        assert r["seeds"] == "1" and r["cases"] == "2"
        assert 0.0 <= float(r["dice_mean"]) <= 1.0
        if r["anchor"] == "none":
            assert r["diff_mean"] == "" and r["pairs"] == "0"
        else:
            assert r["pairs"] == "2" and math.isfinite(float(r["diff_mean"]))
        assert (r["gap"] != "") == (r["subset"] == "mean")
    # the difference is the paired one, recomputed here from the runs' own per-case tables
    per_arm = {}
    for arm in ("none-seed0", "learned-seed0"):
        cases = [r for r in _rows(out / "runs" / arm / "heldout" / "cases.csv") if r["subset"] == "T1+T1ce+T2+FLAIR"]
        per_arm[arm] = {r["case"]: np.mean([float(r[f"dice_{g}"]) for g in ("WT", "TC", "ET")]) for r in cases}
    d = [per_arm["learned-seed0"][c] - per_arm["none-seed0"][c] for c in per_arm["none-seed0"]]
    full = next(r for r in rows if r["anchor"] == "learned" and r["subset"] == "T1+T1ce+T2+FLAIR")
    assert float(full["diff_mean"]) == pytest.approx(np.mean(d), abs=1e-6)
    # every arm was trained with only its anchor and seed changed
    cfgs = {a: json.loads((out / "runs" / a / "config.json").read_text())["train"] for a in per_arm}
    changed = {k for k in cfgs["none-seed0"] if cfgs["none-seed0"][k] != cfgs["learned-seed0"][k]}
    assert changed == {"anchor"}
    text = (out / "ablation.md").read_text()
    assert "| learned |" in text and "95%" in text
    # a second invocation finds every arm finished and only writes the report again
    capsys.readouterr()
    assert ablation_main([str(tiny_data), "--out", str(out), "--anchors", "none,learned", "--seeds", "1", *TINY]) == 0
    assert "2 already finished" in capsys.readouterr().out


def test_other_shared_settings_in_the_same_folder_are_refused(tiny_data, tmp_path, capsys):
    out = tmp_path / "ab"
    args = [str(tiny_data), "--out", str(out), "--anchors", "none", "--seeds", "1", *TINY]
    assert ablation_main(args) == 0
    capsys.readouterr()
    assert ablation_main(args[:-1] + ["--align-weight", "0.5", "-q"]) == 1
    err = capsys.readouterr().err
    assert "align_weight" in err and "other shared settings" in err


@pytest.mark.parametrize("bad, message", [(["--anchors", "none,bogus"], "unknown"),
                                          (["--anchors", "none,none"], "each anchor once"),
                                          (["--seeds", "0"], "--seeds"),
                                          (["--anchors", "fixed", "--align-loss", "mixture_kl"], "align_loss")])
def test_bad_plans_fail_before_training(tiny_data, tmp_path, capsys, bad, message):
    assert ablation_main([str(tiny_data), "--out", str(tmp_path / "ab"), *TINY, *bad]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ab" / "runs").exists()


def _cli(out, data):
    return [sys.executable, "-m", "medmap_fast.cli", "ablation", str(data), "--out", str(out), "--anchors",
            "none,learned", "--seeds", "1", *TINY[:-1], "--epochs", "3", "--checkpoint-every", "1", "-q"]


def _step(path):
    try:
        return torch.load(path, weights_only=True)["progress"]["step"]
    except Exception:  # not written yet
        return -1


def test_an_interrupted_ablation_resumes_where_it_stopped(tiny_data, tmp_path):
    whole = subprocess.run(_cli(tmp_path / "whole", tiny_data), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(out, tiny_data), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    second = out / "runs" / "learned-seed0" / "last.pt"
    deadline = time.time() + 300
    try:
        while _step(second) < 2:  # the first arm finished, the second is part-way
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (out / "runs" / "none-seed0" / "ablation" / "arm.json").exists()
    assert not (out / "runs" / "learned-seed0" / "ablation" / "arm.json").exists()
    assert not (out / "ablation.csv").exists()
    first_done = (out / "runs" / "none-seed0" / "ablation" / "arm.json").stat().st_mtime_ns

    again = subprocess.run(_cli(out, tiny_data)[:-1], capture_output=True, text=True)  # without -q: the log
    assert again.returncode == 0, again.stderr
    assert "1 already finished" in again.stdout and "resuming the interrupted run" in again.stdout
    assert (out / "runs" / "none-seed0" / "ablation" / "arm.json").stat().st_mtime_ns == first_done
    for arm in ("none-seed0", "learned-seed0"):
        a = torch.load(tmp_path / "whole" / "runs" / arm / "last.pt", weights_only=True)["framework_state"]
        b = torch.load(out / "runs" / arm / "last.pt", weights_only=True)["framework_state"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), arm
    assert (out / "ablation.csv").read_text() == (tmp_path / "whole" / "ablation.csv").read_text()


def test_arms_are_spread_over_processes(tiny_data, tmp_path, monkeypatch):
    """What torchrun's processes do: each trains its share alone; the one finishing last writes the report."""
    args = build_parser().parse_args([str(tiny_data), "--out", str(tmp_path / "ab"), "--anchors", "none,learned",
                                      "--seeds", "1", *TINY])
    plan = plan_from_args(args)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert run_ablation(plan, tmp_path / "ab", quiet=True, log=lambda s: None) is None  # rank 1's arm is missing
    runs = sorted(p.name for p in (tmp_path / "ab" / "runs").iterdir())
    assert runs == ["none-seed0"]
    monkeypatch.setenv("RANK", "1")
    report = run_ablation(plan, tmp_path / "ab", quiet=True, log=lambda s: None)
    assert report is not None and (tmp_path / "ab" / "ablation.csv").exists()
    assert [a["arm"] for a in report["arms"]] == ["none-seed0", "learned-seed0"]


def test_paired_interval_is_the_t_interval():
    rng = np.random.default_rng(0)
    d = rng.normal(0.02, 0.05, size=24)
    got = paired_interval(np.r_[d, np.nan])  # NaN pairs (subsets a case lacks) are left out
    half = scipy_stats.t.ppf(0.975, 23) * d.std(ddof=1) / np.sqrt(24)
    assert got.n == 24
    assert got.mean == pytest.approx(d.mean()) and got.low == pytest.approx(d.mean() - half)
    assert got.high == pytest.approx(d.mean() + half)
    one = paired_interval(np.array([0.1]))
    assert one.mean == pytest.approx(0.1) and math.isnan(one.low) and one.n == 1
    assert paired_interval(np.array([])).n == 0


def test_summarise_means_over_cases_then_seeds():
    rng = np.random.default_rng(1)
    seeds, cases = 3, 5
    base = rng.uniform(0.3, 0.9, size=(seeds, cases, len(ROWS), 4))
    shifted = np.clip(base + 0.1, 0, 1)
    base[0, 2, 0, :] = np.nan  # a subset one case could not be scored on
    gaps = rng.uniform(0.1, 1.0, size=(seeds, cases))
    rows = summarise({"none": ArmScores(base, gaps), "learned": ArmScores(shifted, gaps * 0.5)}, ["none", "learned"])
    assert len(rows) == 2 * len(ROWS)
    r = next(r for r in rows if r["anchor"] == "learned" and r["subset"] == ROWS[0])
    per_seed = shifted[:, :, 0, 3].mean(axis=1)
    assert r["dice_mean"] == pytest.approx(per_seed.mean()) and r["dice_mean_sd"] == pytest.approx(per_seed.std(ddof=1))
    assert r["pairs"] == seeds * cases - 1
    assert r["diff_mean_low"] > 0  # a +0.1 shift on every pair is significant
    mean_row = next(r for r in rows if r["anchor"] == "learned" and r["subset"] == "mean")
    assert mean_row["diff_gap"] < 0 and mean_row["diff_gap_high"] < 0
    none_mean = next(r for r in rows if r["anchor"] == "none" and r["subset"] == "mean")
    assert math.isnan(none_mean["diff_mean"]) and math.isfinite(none_mean["gap"])


def test_plan_arms_go_seed_by_seed(tiny_data):
    plan = Plan(tiny_config(data=str(tiny_data)), ["none", "learned"], [0, 1])
    assert [a.name for a in plan.arms] == ["none-seed0", "learned-seed0", "none-seed1", "learned-seed1"]
    assert plan.arm_config(plan.arms[3]).anchor == "learned" and plan.arm_config(plan.arms[3]).seed == 1
