"""medmap-fast quickstart end to end on tiny volumes: data written once and reused, a new run folder
per run, the 15-subset table printed, clear errors for bad options."""

import json

import pytest

from medmap_fast.quickstart import main

TINY = ["--cases", "3", "--val-cases", "1", "--shape", "32", "32", "32", "--patch-size", "16", "16", "16", "--epochs", "1",
        "--steps-per-epoch", "2", "--num-workers", "0", "--anatomy", "geometric"]


@pytest.mark.slow
def test_quickstart_trains_evaluates_and_reuses_its_data(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--quiet", *TINY]) == 0
    out = capsys.readouterr().out
    assert "held-out cases, all modalities: Dice WT" in out and "mean over the 15 subsets" in out
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert str(run) in out
    for name in ("config.json", "metrics.csv", "last.pt", "eval"):
        assert (run / name).exists(), name
    table = json.loads((run / "eval" / "config.json").read_text())
    assert table["cases"] == 1
    stamp = (tmp_path / "data" / "quickstart.json").read_text()
    data_mtime = (tmp_path / "data" / "dataset.json").stat().st_mtime_ns

    assert main(["--out", str(tmp_path), *TINY]) == 0  # not quiet: the progress lines are printed
    out = capsys.readouterr().out
    assert "reusing 3 synthetic cases" in out
    assert (tmp_path / "data" / "dataset.json").stat().st_mtime_ns == data_mtime
    assert (tmp_path / "data" / "quickstart.json").read_text() == stamp
    assert len(list((tmp_path / "runs").iterdir())) == 2


@pytest.mark.parametrize("bad, named", [
    (["--cases", "5"], "--cases"),
    (["--val-cases", "0"], "--val-cases"),
    (["--epochs", "0"], "--epochs"),
    (["--shape", "30", "32", "32"], "--shape"),
    (["--patch-size", "16", "16", "4"], "--patch-size"),
])
def test_quickstart_refuses_bad_options_naming_them(tmp_path, capsys, bad, named):
    assert main(["--out", str(tmp_path), *bad]) == 1
    err = capsys.readouterr().err
    assert named in err and "expected" in err
    assert not (tmp_path / "runs").exists()
