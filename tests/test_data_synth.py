"""Synthetic data: labels, tissue and tumour contrasts, the files on disk, the ``medmap-fast synth`` command."""

import importlib.util
import json

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as nio
from scipy import ndimage

from medmap_fast import cli
from medmap_fast.data import MODALITIES, find_cases, load_case
from medmap_fast.data import synth

SHAPE = (32, 32, 32)


def _means(case):
    """Mean intensity per modality over healthy CSF/GM/WM voxels and each tumour compartment."""
    healthy = case.label == 0
    regions = {"csf": healthy & (case.tissue == 1), "gm": healthy & (case.tissue == 2),
               "wm": healthy & (case.tissue == 3), "ncr": case.label == 1, "ed": case.label == 2,
               "et": case.label == 4}
    for name, mask in regions.items():
        assert mask.sum() >= 4, f"too few {name} voxels to compare"
    return {m: {r: float(case.images[m][mask].mean()) for r, mask in regions.items()} for m in MODALITIES}


@pytest.mark.parametrize("anatomy", ["template", "geometric"])
def test_contrasts(anatomy):
    if anatomy == "template" and synth.template_dir() is None:
        pytest.skip("nilearn (which ships the ICBM152 template) is not installed")
    shape = (40, 40, 40)
    anat = synth.resolve_anatomy(anatomy, synth.FIELD_OF_VIEW_MM / 40)
    assert ("ICBM152" in anat.source) == (anatomy == "template")
    for seed in range(3):
        case = synth.synth_case(np.random.default_rng(seed), anat, shape)
        assert set(np.unique(case.label).tolist()) == {0, 1, 2, 4}
        m = _means(case)
        assert m["t1"]["wm"] > m["t1"]["gm"] > m["t1"]["csf"]
        assert m["t1ce"]["wm"] > m["t1ce"]["gm"] > m["t1ce"]["csf"]
        assert m["t2"]["csf"] > m["t2"]["gm"] > m["t2"]["wm"]
        assert m["flair"]["gm"] > m["flair"]["wm"] > m["flair"]["csf"]
        # tumour: enhancing rim bright on T1ce, necrosis dark on T1/T1ce and bright-ish on T2,
        # oedema bright on T2 and FLAIR
        assert m["t1ce"]["et"] > 1.2 * m["t1ce"]["ncr"] and m["t1ce"]["et"] > m["t1ce"]["wm"]
        assert m["t1"]["ncr"] < m["t1"]["wm"] and m["t1ce"]["ncr"] < m["t1ce"]["wm"]
        assert m["t2"]["ncr"] > m["t2"]["wm"]
        assert m["t2"]["ed"] > 1.3 * m["t2"]["wm"] and m["flair"]["ed"] > m["flair"]["gm"] > m["flair"]["wm"]
        for img in case.images.values():
            brain = case.tissue > 0
            assert (img[brain] >= 1).all() and not img[~brain].any()  # skull-stripped, brain never 0


def test_tumour_inside_brain_with_all_labels_for_many_seeds():
    anat = synth.resolve_anatomy("auto", synth.FIELD_OF_VIEW_MM / 24)
    for seed in range(12):
        case = synth.synth_case(np.random.default_rng(seed), anat, (24, 24, 24))
        assert set(np.unique(case.label).tolist()) == {0, 1, 2, 4}
        assert (case.tissue[case.label > 0] > 0).all()
        # the necrotic core is enclosed by the enhancing rim
        grown = ndimage.binary_dilation(case.label == 1)
        assert set(np.unique(case.label[grown]).tolist()) == {1, 4}


def test_written_files_read_back_as_generated(tmp_path):
    """Files in random orientations, read back in canonical order, match the generator's arrays."""
    paths = synth.write_synthetic_dataset(tmp_path / "d", 5, seed=7, shape=SHAPE, orientation="mixed")
    meta = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert meta["synthetic"] is True and meta["seed"] == 7 and meta["generator_version"] == synth.GENERATOR_VERSION
    assert [r["name"] for r in meta["cases"]] == [p.name for p in paths] == [f"SynthBraTS_{i:05d}" for i in range(1, 6)]
    assert find_cases(tmp_path / "d") == paths
    anat = synth.resolve_anatomy("auto", synth.FIELD_OF_VIEW_MM / max(SHAPE))
    assert meta["anatomy"] == anat.source
    codes = set()
    for i, (path, record) in enumerate(zip(paths, meta["cases"])):
        t1 = nib.load(str(path / f"{path.name}_t1.nii.gz"))
        to_disk = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(tuple(record["orientation"])))
        assert t1.get_data_dtype() == np.int16
        assert t1.shape == tuple(SHAPE[int(a)] for a in to_disk[:, 0].argsort())
        assert "".join(nio.aff2axcodes(t1.affine)) == record["orientation"]
        assert nib.load(str(path / f"{path.name}_seg.nii.gz")).get_data_dtype() == np.uint8
        codes.add(record["orientation"])
        case = load_case(path)
        expect = synth.synth_case(np.random.default_rng([7, i + 1]), anat, SHAPE)
        np.testing.assert_array_equal(case.label, expect.label)
        for k, m in enumerate(MODALITIES):
            np.testing.assert_array_equal(case.image[k], np.round(expect.images[m]))
        np.testing.assert_allclose(case.geometry.canonical_affine, expect.affine, atol=1e-4)
        np.testing.assert_allclose(case.spacing, record["spacing_mm"], atol=1e-3)
    assert len(codes) >= 2  # mixed orientations do mix
    assert not [p for p in (tmp_path / "d").iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_same_seed_same_data_and_missing_stream(tmp_path):
    a = synth.write_synthetic_dataset(tmp_path / "a", 3, seed=1, shape=(24, 24, 24))
    b = synth.write_synthetic_dataset(tmp_path / "b", 3, seed=1, shape=(24, 24, 24), missing_prob=1.0)
    c = synth.write_synthetic_dataset(tmp_path / "c", 1, seed=2, shape=(24, 24, 24))
    meta = json.loads((tmp_path / "b" / "dataset.json").read_text())
    for pa, pb, record in zip(a, b, meta["cases"]):
        ca, cb = load_case(pa), load_case(pb, allow_missing=True)
        assert len(record["missing"]) == 1 and cb.missing == record["missing"]
        with pytest.raises(ValueError, match=record["missing"][0]):
            load_case(pb)
        # missing_prob only removes files: what is there is the same as without it
        np.testing.assert_array_equal(ca.label, cb.label)
        np.testing.assert_array_equal(ca.image[cb.present], cb.image[cb.present])
    assert not np.array_equal(load_case(a[0]).image, load_case(c[0]).image)


def test_fallback_without_nilearn(monkeypatch, tmp_path, capsys):
    """As on a machine without nilearn: the module finder does not find it, and 'auto' takes the phantom."""
    find_spec = importlib.util.find_spec

    def without_nilearn(name, *args, **kwargs):
        return None if name.split(".")[0] == "nilearn" else find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", without_nilearn)
    assert synth.template_dir() is None
    assert synth.resolve_anatomy("auto", 5.0).source == "geometric phantom"
    with pytest.raises(RuntimeError, match="nilearn"):
        synth.resolve_anatomy("template")
    with pytest.raises(ValueError, match="anatomy"):
        synth.resolve_anatomy("mni")
    assert cli.main(["synth", str(tmp_path / "d"), "--cases", "2", "--shape", "24", "24", "24", "-q"]) == 0
    assert json.loads((tmp_path / "d" / "dataset.json").read_text())["anatomy"] == "geometric phantom"
    for case in map(load_case, find_cases(tmp_path / "d")):
        assert set(np.unique(case.label).tolist()) == {0, 1, 2, 4} and case.image.min() == 0
    assert cli.main(["synth", str(tmp_path / "t"), "--cases", "1", "--anatomy", "template"]) == 1
    assert "pip install nilearn" in capsys.readouterr().err


def test_geometric_dataset(tmp_path):
    synth.write_synthetic_dataset(tmp_path, 2, shape=(24, 28, 24), anatomy="geometric", orientation="LPS")
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["anatomy"] == "geometric phantom"
    for case in map(load_case, find_cases(tmp_path)):
        assert case.geometry.axcodes == ("L", "P", "S")
        assert case.image.shape == (4, 24, 28, 24)
        assert set(np.unique(case.label).tolist()) == {0, 1, 2, 4}


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="cases"):
        synth.write_synthetic_dataset(tmp_path, 0)
    with pytest.raises(ValueError, match="shape"):
        synth.write_synthetic_dataset(tmp_path, 1, shape=(8, 32, 32))
    with pytest.raises(ValueError, match="missing_prob"):
        synth.write_synthetic_dataset(tmp_path, 1, missing_prob=1.5)
    with pytest.raises(ValueError, match="orientation"):
        synth.write_synthetic_dataset(tmp_path, 1, orientation="LRS")
    assert not any(tmp_path.iterdir())


def test_cli(tmp_path, capsys):
    out = tmp_path / "synth"
    args = ["synth", str(out), "--cases", "3", "--shape", "24", "24", "28", "--seed", "5", "--anatomy", "auto"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "SynthBraTS_00003" in printed and "3 cases" in printed
    assert len(find_cases(out)) == 3
    # a second run does not silently replace the data set
    assert cli.main(args) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["synth", str(out), "--cases", "2", "--shape", "24", "24", "24", "--overwrite", "-q",
                     "--missing-prob", "1", "--orientation", "RAS"]) == 0
    assert capsys.readouterr().out == ""
    cases = find_cases(out)
    assert [c.name for c in cases] == ["SynthBraTS_00001", "SynthBraTS_00002"]  # the third is gone
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["missing_prob"] == 1.0 and meta["shape"] == [24, 24, 24]
    assert all(len(list(c.glob("*.nii.gz"))) == 4 for c in cases)
    assert cli.main(["synth", str(tmp_path / "x"), "--cases", "1", "--orientation", "up"]) == 1


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["synth", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for word in ("medmap-fast synth", "--cases", "--seed", "--shape", "--anatomy", "--missing-prob", "--overwrite",
                 "SYNTHETIC", "ICBM152"):
        assert word in text


# -- the data set on disk is the old one or the new one ----------------------------------------------------

SMALL = ["--cases", "2", "--shape", "24", "24", "24", "--anatomy", "geometric", "-q"]


def _synth_killed_after_the_first_case(out, tmp_path, *options):
    from test_outputs_atomic import kill_when_paused

    return kill_when_paused(f"""
        from medmap_fast.data import synth
        write_case = synth._write_case
        def write_then_pause(*args):
            write_case(*args)
            pause()
        synth._write_case = write_then_pause
        synth.main({[str(out), *SMALL, *options]!r})
        """, tmp_path / "child")


def test_overwrite_killed_midway_leaves_the_old_data_set(tmp_path, capsys):
    from test_outputs_atomic import snapshot

    out = tmp_path / "synth"
    assert cli.main(["synth", str(out), *SMALL, "--seed", "1"]) == 0
    before = snapshot(out)
    pid = _synth_killed_after_the_first_case(out, tmp_path, "--seed", "2", "--overwrite")
    assert snapshot(out) == before  # every old file as it was, and nothing new among them
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers and all(f".synth.{pid}." in name for name in leftovers)
    assert cli.main(["synth", str(out), *SMALL, "--seed", "1"]) == 1  # still there, still protected
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["synth", str(out), *SMALL, "--seed", "2", "--overwrite"]) == 0
    assert not [p for p in tmp_path.rglob(".*")]  # the killed run's leftovers are gone
    assert json.loads((out / "dataset.json").read_text())["seed"] == 2 and snapshot(out) != before
    assert len(find_cases(out)) == 2


def test_a_first_run_killed_midway_leaves_nothing(tmp_path):
    out = tmp_path / "synth"
    _synth_killed_after_the_first_case(out, tmp_path)
    assert not out.exists()  # no half data set for a reader to find
    assert cli.main(["synth", str(out), *SMALL]) == 0  # not mistaken for an earlier data set
    assert len(find_cases(out)) == 2 and not [p for p in tmp_path.rglob(".*")]


def test_output_folder_is_checked_before_any_case_is_made(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli.main(["synth", str(tmp_path / "file"), *SMALL]) == 1
    assert f"OUT '{tmp_path / 'file'}': is a file, not a folder" in capsys.readouterr().err
    assert cli.main(["synth", str(tmp_path / "file" / "d"), *SMALL]) == 1
    assert f"cannot be created: {tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    for overwrite in ([], ["--overwrite"]):
        assert cli.main(["synth", str(mine), *SMALL, *overwrite]) == 1
        err = capsys.readouterr().err
        assert f"OUT '{mine}': holds notes.txt, not written by synth" in err and "new or empty folder" in err
    assert (mine / "notes.txt").read_text() == "a user's file" and len(list(mine.iterdir())) == 1
    with pytest.raises(synth.OutputPathError, match=r"^out '.*file': is a file"):
        synth.write_synthetic_dataset(tmp_path / "file", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine"]


def test_an_empty_folder_and_a_link_to_a_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["synth", str(empty), *SMALL]) == 0 and len(find_cases(empty)) == 2
    (tmp_path / "link").symlink_to(empty)
    assert cli.main(["synth", str(tmp_path / "link"), *SMALL, "--overwrite", "--seed", "3"]) == 0
    # the data set behind the link is replaced; the link stays a link
    assert (tmp_path / "link").is_symlink() and json.loads((empty / "dataset.json").read_text())["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "link"]


def test_write_errors_name_the_files_place_in_out(tmp_path, monkeypatch):
    import errno

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(synth.nib, "save", full)
    with pytest.raises(OSError) as e:
        synth.write_synthetic_dataset(tmp_path / "d", 1, shape=(24, 24, 24), anatomy="geometric")
    where = tmp_path / "d" / "SynthBraTS_00001" / "SynthBraTS_00001_t1.nii.gz"
    assert str(e.value) == f"cannot write {where}: No space left on device" and e.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
