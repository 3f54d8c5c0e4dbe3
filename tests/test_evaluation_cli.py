"""``medmap-fast predict`` and ``medmap-fast evaluate`` end to end, through medmap_fast.cli.main.

The hand-made cases have a tumour whose regions light up one modality each (WT on FLAIR, TC on T2,
ET on T1ce) on a constant healthy brain, and the model is a 1x1x1 convolution that thresholds those
three z-scores. So which regions a subset can see is known, and every Dice of the 15-subset table is
computed here from the labels alone.
"""

import csv
import json
import shutil
import textwrap

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
