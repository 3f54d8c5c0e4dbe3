"""``medmap-fast predict`` and ``medmap-fast evaluate`` end to end, through medmap_fast.cli.main.

The hand-made cases have a tumour whose regions light up one modality each (WT on FLAIR, TC on T2,
ET on T1ce) on a constant healthy brain, and the model is a 1x1x1 convolution that thresholds those
three z-scores. So which regions a subset can see is known, and every Dice of the 15-subset table is
computed here from the labels alone.
"""

import csv
import errno
import json
import os
import shutil
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medmap_fast import cli
from medmap_fast.data import MODALITIES, load_case
from medmap_fast.evaluation import SUBSETS, hd95, region_scores, volume_diagonal

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")

SHAPE = (24, 28, 20)  # on disk
# LPS on disk (x and y flipped), anisotropic: the canonical grid is the same shape, spacing (1.0, 1.2, 1.5)
AFFINE = np.array([[-1.0, 0, 0, 30.0], [0, -1.2, 0, 40.0], [0, 0, 1.5, -10.0], [0, 0, 0, 1]])
SPACING = (1.0, 1.2, 1.5)
CASES = {  # name: (tumour centre (voxel), has enhancing tumour, missing modality files)
    "case_a": ((12, 14, 10), True, ()),
    "case_b": ((11, 13, 10), False, ()),
    "case_c": ((13, 15, 9), True, ("t2",)),
}


def _case_arrays(centre, has_et):
    idx = np.indices(SHAPE).astype(float)
    brain = sum(((idx[i] - c) / r) ** 2 for i, (c, r) in enumerate(zip((11.5, 13.5, 9.5), (10.5, 12.5, 8.5)))) <= 1
    r = np.sqrt(sum((idx[i] - centre[i]) ** 2 for i in range(3)))
    label = np.zeros(SHAPE, np.uint8)
    label[r < 5.5] = 2
    label[r < 3.8] = 4 if has_et else 1
    if has_et:
        label[r < 2.2] = 1
    images = {}
    for m, region in (("t1", None), ("t1ce", (4,)), ("t2", (1, 4)), ("flair", (1, 2, 4))):
        img = np.where(brain, 100.0, 0.0)
        if region is not None:
            img[np.isin(label, region)] += 100.0
        images[m] = img.astype(np.int16)
    return images, label


def write_cases(root, cases=CASES):
    for name, (centre, has_et, missing) in cases.items():
        d = root / name
        d.mkdir(parents=True)
        images, label = _case_arrays(centre, has_et)
        for m in MODALITIES:
            if m not in missing:
                nib.save(nib.Nifti1Image(images[m], AFFINE), str(d / f"{name}_{m}.nii.gz"))
        nib.save(nib.Nifti1Image(label, AFFINE), str(d / f"{name}_seg.nii.gz"))
    return root


class RegionModel(nn.Module):
    """Region logits 10 * (z - 0.5): WT from FLAIR, TC from T2, ET from T1ce; a masked modality gives 'off'."""

    def __init__(self, zero=False):
        super().__init__()
        self.conv = nn.Conv3d(4, 3, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            if not zero:
                for region, modality in enumerate(("flair", "t2", "t1ce")):
                    self.conv.weight[region, MODALITIES.index(modality)] = 10.0
                self.conv.bias.fill_(-5.0)

    def forward(self, x, mask):
        return self.conv(x * mask[:, :, None, None, None].to(x.dtype))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cases(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "regions.pt"
    torch.jit.save(torch.jit.script(RegionModel()), str(path))
    return path


def expected_regions(name, subset):
    """Canonical label map the region model predicts for a case when it sees only ``subset``."""
    centre, has_et, _ = CASES[name]
    _, label = _case_arrays(centre, has_et)
    label = label[::-1, ::-1, :]  # LPS on disk -> RAS
    wt = np.isin(label, (1, 2, 4)) & ("flair" in subset)
    tc = np.isin(label, (1, 4)) & ("t2" in subset)
    et = (label == 4) & ("t1ce" in subset)
    pred = np.zeros_like(label)
    pred[wt] = 2
    pred[tc] = 1
    pred[et] = 4
    return pred, label


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def predict_case_a(data, model, out, capsys, *options):
    """``predict`` case_a with a region model seeing every modality: it must find the labels exactly."""
    rc, _, err = run(["predict", str(data / "case_a"), "--model", str(model), "--out", str(out), "--output",
                      "regions", *options], capsys)
    assert rc == 0, err
    _, label = expected_regions("case_a", MODALITIES)
    np.testing.assert_array_equal(np.asarray(nib.load(str(out / "case_a.nii.gz")).dataobj), label[::-1, ::-1, :])


def test_evaluate_with_a_model_gives_the_known_15_subset_table(data, model_file, tmp_path, capsys):
    out = tmp_path / "eval"
    rc, stdout, err = run(
        ["evaluate", str(data), "--model", str(model_file), "--out", str(out), "--window", "16",
         "--overlap", "0.5", "--batch-size", "6", "--output", "regions", "--hd95", "--save-predictions",
         "--device", "cpu"],
        capsys,
    )
    assert rc == 0, err
    assert "T1+T1ce+T2+FLAIR" in stdout and "mean" in stdout

    rows = read_csv(out / "table.csv")
    assert [r["subset"] for r in rows] == [s.name for s in SUBSETS] + ["mean"]
    means = []
    for row, s in zip(rows, SUBSETS):
        evaluated = [n for n, (_, _, missing) in CASES.items() if not set(missing) & set(s.modalities)]
        assert int(row["n"]) == len(evaluated)
        assert int(row["skipped"]) == len(CASES) - len(evaluated)
        assert [int(row[m]) for m in MODALITIES] == [int(m in s.modalities) for m in MODALITIES]
        want = [region_scores(*expected_regions(n, s.modalities)) for n in evaluated]
        for region in ("WT", "TC", "ET"):
            assert float(row[f"dice_{region}"]) == pytest.approx(np.mean([w[f"dice_{region}"] for w in want]), abs=1e-9)
        assert float(row["dice_mean"]) == pytest.approx(np.mean([float(row[f"dice_{g}"]) for g in ("WT", "TC", "ET")]))
        means.append(float(row["dice_mean"]))
    assert float(rows[-1]["dice_mean"]) == pytest.approx(np.mean(means))
    all4 = rows[len(SUBSETS) - 1]
    assert all4["dice_WT"] == all4["dice_TC"] == all4["dice_ET"] == "1.0" and all4["hd95_WT"] == "0.0"
    t1_only = rows[2]  # T1 shows no tumour: every WT prediction is empty, the HD95 penalty applies
    assert t1_only["subset"] == "T1" and float(t1_only["hd95_WT"]) == pytest.approx(volume_diagonal(SHAPE, SPACING))
    assert float(t1_only["dice_ET"]) == pytest.approx(1 / 3)  # case_b has no ET: both empty -> 1

    cases = read_csv(out / "cases.csv")
    assert len(cases) == len(CASES) * len(SUBSETS)
    skipped = [c for c in cases if c["status"] != "scored"]
    assert len(skipped) == 8 and all(c["case"] == "case_c" and "no t2 file" in c["status"] for c in skipped)
    assert all(c["dice_WT"] == "" for c in skipped)
    # the saved prediction of one subset, read back, gives the same HD95 as the table's row for it
    c = next(c for c in cases if c["case"] == "case_a" and c["subset"] == "T1ce+FLAIR")
    saved = nib.load(str(out / "predictions" / "T1ce+FLAIR" / "case_a.nii.gz"))
    assert np.allclose(saved.affine, AFFINE) and saved.get_data_dtype() == np.uint8
    pred = np.asarray(saved.dataobj)[::-1, ::-1, :]
    want, label = expected_regions("case_a", ("t1ce", "flair"))
    np.testing.assert_array_equal(pred, want)
    assert float(c["hd95_TC"]) == pytest.approx(hd95(np.isin(pred, (1, 4)), np.isin(label, (1, 4)), SPACING))

    text = (out / "table.txt").read_text()
    assert len(text.splitlines()) >= 19 and "Dice in %" in text
    assert (out / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == str(model_file) and cfg["inference"]["window"] == [16, 16, 16]
    assert cfg["inference"]["overlap"] == 0.5 and cfg["inference"]["output"] == "regions"
    assert cfg["versions"]["torch"] == torch.__version__ and cfg["date"] and cfg["cases"] == 3
    assert not [p for p in out.rglob(".*")], "temporary files left behind"

    # the saved per-subset predictions, scored as a folder of subset folders, give the same table
    again = tmp_path / "again"
    rc, _, err = run(
        ["evaluate", str(data), "--predictions", str(out / "predictions"), "--out", str(again), "--hd95"], capsys
    )
    assert rc == 0, err
    assert read_csv(again / "table.csv") == rows


def test_predict_writes_labels_on_the_input_grid(data, model_file, tmp_path, capsys):
    out = tmp_path / "pred"
    rc, stdout, err = run(
        ["predict", str(data), "--model", str(model_file), "--out", str(out), "--window", "12,16,8",
         "--output", "regions", "--modalities", "t1ce,T2,flair", "--batch-size", "3"],
        capsys,
    )
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["case_a.nii.gz", "case_b.nii.gz", "case_c.nii.gz"]
    assert "case_c: modalities t1ce,flair (no file for t2)" in stdout
    for name in CASES:
        img = nib.load(str(out / f"{name}.nii.gz"))
        src = nib.load(str(data / name / f"{name}_seg.nii.gz"))
        assert img.shape == SHAPE and np.allclose(img.affine, src.affine) and img.get_data_dtype() == np.uint8
        want, _ = expected_regions(name, ("t1ce", "flair") if name == "case_c" else ("t1ce", "t2", "flair"))
        np.testing.assert_array_equal(np.asarray(img.dataobj), want[::-1, ::-1, :])

    one = tmp_path / "one"  # a single case folder as input
    rc, _, err = run(
        ["predict", str(data / "case_b"), "--model", str(model_file), "--out", str(one), "--window", "32",
         "--output", "regions", "--modalities", "FLAIR"],
        capsys,
    )
    assert rc == 0, err
    want, _ = expected_regions("case_b", ("flair",))
    np.testing.assert_array_equal(np.asarray(nib.load(str(one / "case_b.nii.gz")).dataobj), want[::-1, ::-1, :])

    rc, _, err = run(
        ["predict", str(data), "--model", str(model_file), "--out", str(tmp_path / "t2"), "--modalities",
         "t2", "--output", "regions"],
        capsys,
    )
    assert rc == 1 and "case_c" in err and "none of the requested modalities (t2)" in err
    assert not (tmp_path / "t2").exists()  # found before any inference


def test_module_spec_and_checkpoint(data, tmp_path, capsys, monkeypatch):
    (tmp_path / "my_eval_models.py").write_text(
        textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv3d(4, 3, 1)
                nn.init.zeros_(self.conv.weight)

            def forward(self, x, mask):
                return self.conv(x * mask[:, :, None, None, None].to(x.dtype))

        def build():
            return Net()
    """)
    )
    torch.save(RegionModel().state_dict(), tmp_path / "weights.pt")
    torch.save({"state_dict": {"conv.weight": torch.zeros(3, 4, 1, 1, 1)}}, tmp_path / "partial.pt")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "pred"
    predict_case_a(data, "my_eval_models:build", out, capsys, "--checkpoint", "weights.pt", "--window", "16")
    rc, _, err = run(["predict", str(data / "case_a"), "--model", "my_eval_models:build", "--checkpoint",
                      "partial.pt", "--out", str(out)], capsys)
    assert rc == 1 and "--checkpoint 'partial.pt' does not fit --model 'my_eval_models:build'" in err
    assert "conv.bias" in err
    rc, _, err = run(["predict", str(data), "--model", "my_eval_models:nothing", "--out", str(out)], capsys)
    assert rc == 1 and "has no attribute 'nothing'" in err
    rc, _, err = run(["predict", str(data), "--model", "missing_model.pt", "--out", str(out)], capsys)
    assert rc == 1 and "--model 'missing_model.pt'" in err and "no such file" in err


def test_exported_program_with_a_dynamic_batch(data, tmp_path, capsys):
    batch = torch.export.Dim("batch", min=1, max=64)
    example = (torch.randn(2, 4, 16, 16, 16), torch.ones(2, 4, dtype=torch.bool))
    program = torch.export.export(RegionModel().eval(), example, dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(program, str(tmp_path / "regions.pt2"))
    # 12 windows of 16^3 over (24, 28, 20) at overlap 0.5, in calls of 5: the last call gets 2
    predict_case_a(data, tmp_path / "regions.pt2", tmp_path / "pred", capsys, "--window", "16", "--batch-size", "5")
    rc, _, err = run(["predict", str(data / "case_a"), "--model", str(tmp_path / "regions.pt2"), "--out",
                      str(tmp_path / "pred"), "--checkpoint", str(tmp_path / "regions.pt2")], capsys)
    assert rc == 1 and "--checkpoint does not apply to the exported program" in err


def _labels_as_predictions(data, pred):
    """case_a as <case>.nii.gz, case_b as <case>_seg.nii.gz, case_c inside a <case>/ folder."""
    pred.mkdir()
    shutil.copy(data / "case_a" / "case_a_seg.nii.gz", pred / "case_a.nii.gz")
    shutil.copy(data / "case_b" / "case_b_seg.nii.gz", pred / "case_b_seg.nii.gz")
    (pred / "case_c").mkdir()
    shutil.copy(data / "case_c" / "case_c_seg.nii.gz", pred / "case_c" / "anything.nii.gz")


def test_evaluate_a_folder_of_predictions(data, tmp_path, capsys):
    pred = tmp_path / "pred"
    _labels_as_predictions(data, pred)
    out = tmp_path / "eval"
    rc, _, err = run(["evaluate", str(data), "--predictions", str(pred), "--out", str(out), "--hd95"], capsys)
    assert rc == 0, err
    rows = read_csv(out / "table.csv")
    assert [r["subset"] for r in rows] == ["predictions", "mean"]
    assert rows[0]["n"] == "3" and rows[0]["dice_mean"] == "1.0" and rows[0]["hd95_mean"] == "0.0"

    (pred / "case_b_seg.nii.gz").unlink()
    rc, _, err = run(["evaluate", str(data), "--predictions", str(pred), "--out", str(out)], capsys)
    assert rc == 1 and "no prediction for case case_b" in err and "--missing-as-empty" in err
    rc, _, err = run(
        ["evaluate", str(data), "--predictions", str(pred), "--out", str(out), "--missing-as-empty"], capsys
    )
    assert rc == 0, err
    b = next(c for c in read_csv(out / "cases.csv") if c["case"] == "case_b")
    assert b["status"] == "scored: no prediction, taken as empty"
    assert (b["dice_WT"], b["dice_TC"], b["dice_ET"]) == ("0.0", "0.0", "1.0")  # case_b has no ET
    assert read_csv(out / "table.csv")[0]["n"] == "3"

    shutil.copy(data / "case_a" / "case_a_seg.nii.gz", pred / "case_a_seg.nii.gz")
    rc, _, err = run(
        ["evaluate", str(data), "--predictions", str(pred), "--out", str(out), "--missing-as-empty"], capsys
    )
    assert rc == 1 and "several candidate files" in err and "case_a" in err


def test_prediction_on_another_grid_is_an_error_naming_the_file(data, tmp_path, capsys):
    pred = tmp_path / "pred"
    _labels_as_predictions(data, pred)
    nib.save(nib.Nifti1Image(np.zeros((24, 28, 21), np.uint8), AFFINE), str(pred / "case_a.nii.gz"))
    rc, _, err = run(["evaluate", str(data), "--predictions", str(pred), "--out", str(tmp_path / "e")], capsys)
    assert rc == 1 and "1 of 3 cases could not be scored" in err and "case_a.nii.gz" in err and "(24, 28, 21)" in err
    # the other cases are scored all the same
    assert [c["case"] for c in read_csv(tmp_path / "e" / "cases.csv")] == ["case_b", "case_c"]
    assert read_csv(tmp_path / "e" / "table.csv")[0]["n"] == "2"
    assert list(json.loads((tmp_path / "e" / "config.json").read_text())["left_out"]) == ["case_a"]


def test_a_case_that_cannot_be_read_does_not_stop_the_others(data, model_file, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    (root / "case_b" / "case_b_t1ce.nii.gz").write_bytes(b"not a NIfTI file")
    rc, stdout, err = run(
        ["predict", str(root), "--model", str(model_file), "--out", str(tmp_path / "p"), "--window", "32",
         "--output", "regions"],
        capsys,
    )
    assert rc == 1 and "1 of 3 cases could not be segmented" in err and "case_b_t1ce.nii.gz" in err
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["case_a.nii.gz", "case_c.nii.gz"]
    rc, stdout, err = run(
        ["evaluate", str(root), "--model", str(model_file), "--out", str(tmp_path / "e"), "--window", "32",
         "--output", "regions", "--subsets", "FLAIR"],
        capsys,
    )
    assert rc == 1 and "case_b_t1ce.nii.gz" in err
    assert "left out, files that cannot be read: case_b" in (tmp_path / "e" / "table.txt").read_text()
    assert [c["case"] for c in read_csv(tmp_path / "e" / "cases.csv")] == ["case_a", "case_c"]


def test_subset_folders_missing_a_case_that_lacks_the_modality_are_skipped(data, tmp_path, capsys):
    pred = tmp_path / "pred"
    for folder in ("flair", "t1ce,t2"):
        (pred / folder).mkdir(parents=True)
        for name in ("case_a", "case_b", "case_c"):
            if name == "case_c" and folder == "t1ce,t2":
                continue  # case_c has no T2 file: nothing to predict from, and no error
            shutil.copy(data / name / f"{name}_seg.nii.gz", pred / folder / f"{name}.nii.gz")
    out = tmp_path / "eval"
    rc, _, err = run(["evaluate", str(data), "--predictions", str(pred), "--out", str(out)], capsys)
    assert rc == 0, err
    rows = read_csv(out / "table.csv")
    assert [(r["subset"], r["n"], r["skipped"]) for r in rows] == [
        ("FLAIR", "3", "0"),
        ("T1ce+T2", "2", "1"),
        ("mean", "5", "1"),
    ]


def test_command_line_errors(data, model_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate", str(data), "--model", str(model_file), "--predictions", str(tmp_path), "--out", "x"])
    assert e.value.code == 2 and "exactly one of --model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate", str(data), "--predictions", str(tmp_path), "--out", "x", "--checkpoint", "w.pt",
                  "--subsets", "T1"])
    assert e.value.code == 2 and "--checkpoint, --subsets: only with --model" in capsys.readouterr().err
    for command, words in (("predict", ("--modalities", "--window", "--amp", "example")),
                           ("evaluate", ("--predictions", "--hd95", "--subsets", "table.csv", "examples"))):
        with pytest.raises(SystemExit) as e:
            cli.main([command, "--help"])
        text = capsys.readouterr().out
        assert e.value.code == 0 and f"medmap-fast {command}" in text and "exit status 1" in text
        assert all(w in text for w in words) and "``" not in text  # no reST markup in the help
    with pytest.raises(SystemExit) as e:
        cli.main(["predict", str(data), "--model", str(model_file), "--out", "x", "--overlap", "1"])
    assert e.value.code == 2 and "--overlap '1': expected a number in [0, 1)" in capsys.readouterr().err
    rc, _, err = run(
        ["evaluate", str(data), "--model", str(model_file), "--out", str(tmp_path / "e"), "--subsets", "T1+T5"], capsys
    )
    assert rc == 1 and "cannot read 'T1+T5' as a set of modalities" in err
    rc, _, err = run(
        ["evaluate", str(tmp_path / "nowhere"), "--model", str(model_file), "--out", str(tmp_path / "e")], capsys
    )
    assert rc == 1 and "nowhere" in err and "does not exist" in err
    rc, _, err = run(
        ["evaluate", str(data), "--model", str(model_file), "--out", str(tmp_path / "e"), "--output",
         "classes", "--window", "16"],
        capsys,
    )
    assert rc == 1 and "output='classes' needs K = 4" in err


def test_synthetic_data_in_mixed_orientations_end_to_end(tmp_path, capsys):
    from medmap_fast.data.synth import write_synthetic_dataset

    data = tmp_path / "synth"
    # seed 4: one case lacks its T1ce file, one its FLAIR file
    write_synthetic_dataset(data, 3, seed=4, shape=(24, 20, 18), anatomy="geometric", missing_prob=0.5)
    torch.manual_seed(0)
    model = torch.jit.script(nn.Sequential(nn.Conv3d(4, 4, 1)))
    # a classes model over (x, mask): a scripted wrapper that ignores the mask
    path = tmp_path / "classes.pt"
    torch.jit.save(torch.jit.script(_Classes(model)), str(path))
    out = tmp_path / "pred"
    rc, _, err = run(
        ["predict", str(data), "--model", str(path), "--out", str(out), "--window", "16", "--amp", "bf16"], capsys
    )
    assert rc == 0, err
    for case_dir in sorted(p for p in data.iterdir() if p.is_dir()):
        seg = nib.load(str(out / f"{case_dir.name}.nii.gz"))
        src = nib.load(str(case_dir / f"{case_dir.name}_seg.nii.gz"))
        assert seg.shape == src.shape and np.allclose(seg.affine, src.affine)
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2, 4}
    rc, _, err = run(
        ["evaluate", str(data), "--model", str(path), "--out", str(tmp_path / "e"), "--window", "16",
         "--subsets", "FLAIR; t1,t1ce,t2,flair"],
        capsys,
    )
    assert rc == 0, err
    rows = read_csv(tmp_path / "e" / "table.csv")
    assert [r["subset"] for r in rows] == ["FLAIR", "T1+T1ce+T2+FLAIR", "mean"]
    present = [load_case(c, allow_missing=True).present for c in sorted(data.iterdir()) if c.is_dir()]
    assert int(rows[0]["skipped"]) == sum(not p[MODALITIES.index("flair")] for p in present) == 1
    assert int(rows[1]["skipped"]) == sum(not p.all() for p in present) == 2
    assert all(0 <= float(r["dice_WT"]) <= 1 for r in rows)


class _Classes(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, mask):
        return self.net(x)


# -- output locations are checked first; the output set is replaced whole -----------------------------------


def _no_progress(stdout):
    return "[1/" not in stdout  # no case was read, let alone segmented


def test_output_locations_are_checked_before_any_work(data, model_file, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    model = ["--model", str(model_file), "--window", "32", "--output", "regions"]
    for command, extra in (("evaluate", model), ("evaluate", ["--predictions", str(tmp_path)]), ("predict", model)):
        rc, stdout, err = run([command, str(data), "--out", str(tmp_path / "file"), *extra], capsys)
        assert rc == 1 and f"--out '{tmp_path / 'file'}': is a file, not a folder" in err and _no_progress(stdout)
        rc, stdout, err = run([command, str(data), "--out", str(tmp_path / "file" / "sub"), *extra], capsys)
        assert rc == 1 and f"cannot be created: {tmp_path / 'file'} is a file, not a folder" in err
        assert _no_progress(stdout)
    out = tmp_path / "e"
    (out / "predictions").mkdir(parents=True)
    (out / "predictions" / "case_a.nii.gz").mkdir()
    rc, stdout, err = run(["predict", str(data), "--out", str(out / "predictions"), *model], capsys)
    assert rc == 1 and "case_a.nii.gz is a folder, but the segmentation of case case_a is written" in err
    assert _no_progress(stdout)
    shutil.rmtree(out / "predictions")
    (out / "predictions").write_text("not a folder")
    rc, stdout, err = run(["evaluate", str(data), "--out", str(out), "--save-predictions", *model], capsys)
    assert rc == 1 and f"--save-predictions: {out / 'predictions'} is a file" in err and _no_progress(stdout)
    (out / "table.png").mkdir()
    rc, stdout, err = run(["evaluate", str(data), "--out", str(out), *model], capsys)
    assert rc == 1 and f"--out '{out}': {out / 'table.png'} is a folder" in err and _no_progress(stdout)
    assert sorted(p.name for p in out.iterdir()) == ["predictions", "table.png"]


def test_library_functions_check_their_output_folder_first(data, tmp_path):
    from medmap_fast.data.atomic import OutputPathError
    from medmap_fast.evaluation.evaluate import evaluate_model, evaluate_predictions
    from medmap_fast.evaluation.pipeline import InferenceSettings
    from medmap_fast.evaluation.predict import predict_cases

    def model(x, mask):
        raise AssertionError("inference ran before the output folder was checked")

    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="^out_dir '.*file': is a file"):
        evaluate_model(model, data, tmp_path / "file", InferenceSettings(window=(32, 32, 32)))
    with pytest.raises(OutputPathError, match="^out_dir '.*file': is a file"):
        predict_cases(model, [data / "case_a"], tmp_path / "file", InferenceSettings(window=(32, 32, 32)))
    with pytest.raises(OutputPathError, match="^out_dir '.*sub': cannot be created"):
        evaluate_predictions(data, tmp_path, tmp_path / "file" / "sub")


def test_read_only_output_folder(data, model_file, tmp_path, capsys, monkeypatch):
    statvfs = os.statvfs

    class ReadOnly:
        def __init__(self, path):
            self.f_flag = statvfs(path).f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", lambda path: ReadOnly(path) if Path(path) == tmp_path else statvfs(path))
    rc, stdout, err = run(["evaluate", str(data), "--model", str(model_file), "--out", str(tmp_path / "e")], capsys)
    assert rc == 1 and f"--out '{tmp_path / 'e'}': cannot be created: {tmp_path} is not writable" in err
    assert "read-only file system" in err and _no_progress(stdout)


@pytest.mark.skipif(os.geteuid() == 0, reason="file permissions do not stop root")
def test_output_folder_without_write_permission(data, model_file, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        rc, stdout, err = run(["predict", str(data), "--model", str(model_file), "--out", str(locked)], capsys)
        assert rc == 1 and f"--out '{locked}': is not writable (permission denied)" in err and _no_progress(stdout)
    finally:
        locked.chmod(0o755)


def _evaluate_killed(data, out, tmp_path, hook, *options):
    """``evaluate --predictions`` in a new process, paused and killed where ``hook`` (Python code run in the
    child before the command) makes it pause."""
    from test_outputs_atomic import kill_when_paused

    argv = ["evaluate", str(data), "--out", str(out), *options]
    return kill_when_paused(hook + f"\nfrom medmap_fast import cli\ncli.main({argv!r})\n", tmp_path / "child")


# pauses once the first file of the new set (table.csv) is written
_AFTER_FIRST_FILE = """
from medmap_fast.evaluation import evaluate
write_table_csv = evaluate.write_table_csv
def write_then_pause(*args, **kwargs):
    write_table_csv(*args, **kwargs)
    pause()
evaluate.write_table_csv = write_then_pause
"""


def _visible(folder):
    from test_outputs_atomic import snapshot

    return {k: v for k, v in snapshot(folder).items() if not any(part.startswith(".") for part in Path(k).parts)}


def test_evaluate_killed_while_writing_leaves_the_old_set(data, tmp_path, capsys):
    pred = tmp_path / "pred"
    _labels_as_predictions(data, pred)
    out = tmp_path / "eval"
    rc, _, err = run(["evaluate", str(data), "--predictions", str(pred), "--out", str(out)], capsys)
    assert rc == 0, err
    (out / "notes.txt").write_text("a user's notes")
    before = _visible(out)
    assert json.loads(before["config.json"])["outputs"] == ["table.txt", "table.csv", "table.png", "cases.csv",
                                                            "config.json"]
    pid = _evaluate_killed(data, out, tmp_path, _AFTER_FIRST_FILE, "--predictions", str(pred), "--hd95")
    assert _visible(out) == before  # the whole old set, untouched
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers and all(f".{pid}." in name for name in leftovers)
    rc, _, err = run(["evaluate", str(data), "--predictions", str(pred), "--out", str(out), "--hd95"], capsys)
    assert rc == 0, err
    assert not [p for p in tmp_path.rglob(".*")]  # the killed run's leftovers are gone
    assert "hd95_WT" in read_csv(out / "table.csv")[0] and json.loads((out / "config.json").read_text())["hd95"]
    assert (out / "notes.txt").read_text() == "a user's notes"


def test_evaluate_killed_before_its_first_set_leaves_no_folder(data, tmp_path, capsys):
    pred = tmp_path / "pred"
    _labels_as_predictions(data, pred)
    out = tmp_path / "eval"
    _evaluate_killed(data, out, tmp_path, _AFTER_FIRST_FILE, "--predictions", str(pred))
    assert not out.exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".eval.")]
    rc, _, err = run(["evaluate", str(data), "--predictions", str(pred), "--out", str(out)], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["cases.csv", "config.json", "table.csv", "table.png", "table.txt"]
    assert not [p for p in tmp_path.rglob(".*")]


def test_evaluate_killed_while_moving_the_set_in_leaves_it_marked_incomplete(data, tmp_path, capsys):
    pred = tmp_path / "pred"
    _labels_as_predictions(data, pred)
    out = tmp_path / "eval"
    rc, _, err = run(["evaluate", str(data), "--predictions", str(pred), "--out", str(out)], capsys)
    assert rc == 0, err
    hook = f"""
import os
replace = os.replace
def replace_then_pause(src, dst):
    replace(src, dst)
    if Path(dst).parent == Path({str(out)!r}):
        pause()
os.replace = replace_then_pause
"""
    _evaluate_killed(data, out, tmp_path, hook, "--predictions", str(pred), "--hd95")
    # config.json goes first and comes back last: without it, a reader knows the set is incomplete
    assert not (out / "config.json").exists() and (out / "table.csv").exists()
    rc, _, err = run(["evaluate", str(data), "--predictions", str(pred), "--out", str(out), "--hd95"], capsys)
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text())["hd95"] and not [p for p in tmp_path.rglob(".*")]


def test_saved_predictions_are_part_of_the_set(data, model_file, tmp_path, capsys):
    out = tmp_path / "eval"
    options = ["--model", str(model_file), "--window", "32", "--output", "regions", "--device", "cpu"]
    rc, _, err = run(["evaluate", str(data), "--out", str(out), "--subsets", "FLAIR", "--save-predictions",
                      *options], capsys)
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text())["outputs"][-1] == "predictions/"
    before = _visible(out)
    hook = """
from medmap_fast.evaluation import evaluate
save_segmentation = evaluate.save_segmentation
def save_then_pause(*args):
    save_segmentation(*args)
    pause()
evaluate.save_segmentation = save_then_pause
"""
    _evaluate_killed(data, out, tmp_path, hook, "--subsets", "T1ce", "--save-predictions", *options)
    assert _visible(out) == before  # the old predictions and table, and none of the new predictions
    rc, _, err = run(["evaluate", str(data), "--out", str(out), "--subsets", "T1ce", "--save-predictions",
                      *options], capsys)
    assert rc == 0, err
    # the predictions folder is replaced as a whole: no FLAIR predictions beside the T1ce table
    assert [p.name for p in (out / "predictions").iterdir()] == ["T1ce"]
    assert not [p for p in tmp_path.rglob(".*")]
    # a run that does not save predictions leaves the saved ones alone, and its config.json says they are not its own
    rc, _, err = run(["evaluate", str(data), "--out", str(out), "--subsets", "T2", *options], capsys)
    assert rc == 0, err
    assert (out / "predictions" / "T1ce").is_dir() and read_csv(out / "table.csv")[0]["subset"] == "T2"
    assert "predictions/" not in json.loads((out / "config.json").read_text())["outputs"]


def test_write_failures_name_the_files_place_in_out(data, model_file, tmp_path, capsys, monkeypatch):
    def full(img, filename):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(nib, "save", full)
    options = ["--model", str(model_file), "--window", "32", "--output", "regions"]
    rc, _, err = run(["predict", str(data / "case_a"), "--out", str(tmp_path / "p"), *options], capsys)
    assert rc == 1 and f"cannot write {tmp_path / 'p' / 'case_a.nii.gz'}: No space left on device" in err
    out = tmp_path / "e"
    rc, _, err = run(["evaluate", str(data), "--out", str(out), "--subsets", "FLAIR", "--save-predictions",
                      *options], capsys)
    where = out / "predictions" / "FLAIR" / "case_a.nii.gz"
    assert rc == 1 and f"cannot write {where}: No space left on device" in err and ".tmp" not in err
    assert not out.exists() and not [p for p in tmp_path.rglob(".*")]


def test_predict_killed_while_writing_a_file(data, model_file, tmp_path, capsys):
    from test_outputs_atomic import kill_when_paused

    out = tmp_path / "pred"
    argv = ["predict", str(data / "case_a"), "--out", str(out), "--model", str(model_file), "--window", "32",
            "--output", "regions"]
    pid = kill_when_paused(f"""
        import nibabel
        save = nibabel.save
        def save_then_pause(img, filename):
            save(img, filename)
            pause()
        nibabel.save = save_then_pause
        from medmap_fast import cli
        cli.main({argv!r})
        """, tmp_path / "child")
    assert [p.name for p in out.iterdir() if not p.name.startswith(f".case_a.nii.gz.{pid}.")] == []
    assert list(out.iterdir())  # the killed run's hidden temporary
    predict_case_a(data, model_file, out, capsys, "--window", "32")
    assert [p.name for p in out.iterdir()] == ["case_a.nii.gz"]
