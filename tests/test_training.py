"""Training: configuration, losses, masks and sampling, the three frameworks, AMP, non-finite handling,
checkpoints and the run folder, the command line. Exact resume after a kill and DDP are in
test_training_resume.py."""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from medmap_fast.training import (NonFiniteError, TrainConfig, build_framework, draw_mask, losses,
                                  model_from_checkpoint, split_cases, train)
from medmap_fast.training.frameworks import gradient_reversal
from medmap_fast.training.sampling import SUBSET_MASKS, StepSampler

from training_helpers import tiny_config, tiny_data  # noqa: F401 (fixture)


# -- configuration ------------------------------------------------------------------------------------------


def test_config_json_round_trip():
    cfg = TrainConfig.small(data="x", framework="kd", align_levels=(2,), val_window=(32, 32, 32))
    again = TrainConfig.from_json(json.loads(json.dumps(cfg.to_json())))
    assert again == cfg


@pytest.mark.parametrize("bad, word", [
    (dict(framework="nope"), "framework"),
    (dict(anchor="fixed", align_loss="mixture_kl"), "align_loss"),
    (dict(patch_size=(48, 48, 40), depth=5), "patch_size"),
    (dict(batch_size=0), "batch_size"),
    (dict(full_modality_prob=1.5), "full_modality_prob"),
    (dict(align_levels=(7,)), "align_levels"),
    (dict(framework="kd", align_levels=(1, 2)), "align_levels"),
    (dict(val_cases=2.5), "val_cases"),
])
def test_config_errors_name_the_setting(bad, word):
    with pytest.raises(ValueError, match=word):
        TrainConfig(**bad)


def test_unknown_setting_in_json_is_named():
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_json({"learning_rate": 1})


# -- losses -------------------------------------------------------------------------------------------------


def test_seg_loss_is_small_for_a_confident_right_answer_and_per_sample():
    label = torch.zeros(2, 8, 8, 8, dtype=torch.uint8)
    label[:, 2:5, 2:5, 2:5] = 2
    label[:, 3, 3, 3] = 4
    target = losses.region_targets(label)
    good = (target * 2 - 1) * 20
    bad = -good
    lg, lb = losses.seg_loss(good, label, "regions"), losses.seg_loss(bad, label, "regions")
    assert lg.shape == (2,) and (lg < 0.01).all() and (lb > 1.5).all()
    cls = losses.class_targets(label)
    onehot = torch.nn.functional.one_hot(cls, 4).movedim(-1, 1).float()
    assert (losses.seg_loss(onehot * 40 - 20, label, "classes") < 0.01).all()


def test_deep_supervision_weights_halve_and_sum_to_one():
    w = losses.supervision_weights(4)
    assert math.isclose(sum(w), 1.0) and all(math.isclose(a / b, 2.0) for a, b in zip(w, w[1:]))


def test_distillation_is_zero_for_equal_outputs_and_positive_otherwise():
    z = torch.randn(2, 3, 4, 4, 4)
    for output in ("regions", "classes"):
        assert losses.distillation_loss(z, z, 3.0, output).abs().max() < 1e-6
        assert (losses.distillation_loss(z, z + torch.randn_like(z), 3.0, output) > 0).all()


def test_gradient_reversal():
    x = torch.randn(3, requires_grad=True)
    gradient_reversal(x, 0.5).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), -0.5))


# -- masks and sampling ---------------------------------------------------------------------------------------


def test_masks_are_uniform_over_the_15_subsets_and_within_the_case():
    rng = np.random.default_rng(0)
    present = np.ones(4, bool)
    draws = np.stack([draw_mask(rng, present, 0.0) for _ in range(15000)])
    codes = draws @ (1 << np.arange(4))
    counts = np.bincount(codes, minlength=16)
    assert counts[0] == 0 and (abs(counts[1:] - 1000) < 150).all()
    assert draw_mask(rng, present, 1.0).all()
    lacking = np.array([True, False, True, True])
    for _ in range(200):
        m = draw_mask(rng, lacking, 0.0)
        assert m.any() and not m[1]
    assert SUBSET_MASKS.shape == (15, 4)


def test_sampler_ranks_cover_the_global_batch_and_resume_continues_it():
    one = list(StepSampler(7, 3, steps_per_epoch=5, epochs=2, global_batch=4))
    two = [list(StepSampler(7, 3, 5, 2, 4, rank=r, world_size=2)) for r in range(2)]
    for step in range(10):
        glob = one[step * 4:(step + 1) * 4]
        assert sorted(glob) == sorted(two[0][step * 2:(step + 1) * 2] + two[1][step * 2:(step + 1) * 2])
    assert list(StepSampler(7, 3, 5, 2, 4, start_step=6)) == one[24:]
    with pytest.raises(ValueError, match="batch_size"):
        StepSampler(7, 3, 5, 2, 3, world_size=2)


def test_split_is_disjoint_and_seeded(tmp_path):
    cases = [tmp_path / f"c{i}" for i in range(10)]
    tr, va = split_cases(cases, 0.2, 0)
    assert len(va) == 2 and not set(tr) & set(va) and split_cases(cases, 0.2, 0) == (tr, va)
    with pytest.raises(ValueError, match="val_cases"):
        split_cases(cases, 10, 0)


# -- frameworks ---------------------------------------------------------------------------------------------


def _batch(B=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, 4, size, size, size, generator=g)
    label = torch.zeros(B, size, size, size, dtype=torch.uint8)
    label[:, 4:11, 4:11, 4:11] = 2
    label[:, 6:9, 6:9, 6:9] = 1
    label[:, 7, 7, 7] = 4
    image[:, 2:4, 4:11, 4:11, 4:11] += 2.0  # the "tumour" shows on T2 and FLAIR
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 1]][:B], dtype=torch.bool)
    present = torch.ones(B, 4, dtype=torch.bool)
    return image, mask, present, label


@pytest.mark.parametrize("framework, anchor", [("sls", "learned"), ("sls", "none"), ("sls", "mixture"),
                                               ("kd", "fixed"), ("da", "normal")])
def test_a_few_steps_decrease_the_loss(framework, anchor):
    cfg = tiny_config(framework=framework, anchor=anchor, teacher_epochs=1)
    torch.manual_seed(0)
    fw = build_framework(cfg)
    batch = _batch()
    opt = torch.optim.AdamW([p for p in fw.parameters() if p.requires_grad], lr=3e-3)
    for phase in fw.phases:
        fw.phase = phase
        first = None
        for _ in range(12):
            opt.zero_grad()
            res = fw(*batch)
            assert torch.isfinite(res.loss)
            res.loss.backward()
            opt.step()
            first = float(res.loss) if first is None else first
        assert float(res.loss) < first, (framework, anchor, phase)
        if anchor != "none" and phase != "student":
            assert "align" in res.parts and res.aligned is not None


# -- whole runs ---------------------------------------------------------------------------------------------


def test_sls_run_writes_the_run_folder_and_predict_evaluate_take_it(tiny_data, tmp_path):
    run = tmp_path / "run"
    result = train(tiny_config(data=str(tiny_data), epochs=2, val_every=1), run, quiet=True)
    for name in ("config.json", "metrics.csv", "validation.csv", "curves.png", "last.pt", "best.pt",
                 "eval/table.csv", "eval/table.txt", "eval/config.json"):
        assert (run / name).is_file(), name
    assert result.steps == 4 and result.table is not None and len(result.table) == 16
    cfg = json.loads((run / "config.json").read_text())
    assert TrainConfig.from_json(cfg["train"]) == tiny_config(data=str(tiny_data), epochs=2, val_every=1)
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == result.steps + 1 and "gap" in rows[0]
    # the checkpoint rebuilds the model, fused or not, with the same outputs
    a = model_from_checkpoint(run / "best.pt")
    b = model_from_checkpoint(run / "best.pt", fused=False)
    x, m = torch.randn(1, 4, 16, 16, 16), torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(a(x, m), b(x, m), atol=1e-4, rtol=1e-4)
    out = subprocess.run([sys.executable, "-m", "medmap_fast.cli", "evaluate", str(tiny_data), "--model",
                          str(run), "--window", "16", "--out", str(tmp_path / "ev"), "--subsets", "FLAIR;T1+T2"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "regions" in (tmp_path / "ev" / "config.json").read_text()
    out = subprocess.run([sys.executable, "-m", "medmap_fast.cli", "predict", str(tiny_data), "--model",
                          str(run / "last.pt"), "--window", "16", "--out", str(tmp_path / "pred")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == 5  # every case of the data root


@pytest.mark.parametrize("framework", ["kd", "da"])
def test_kd_and_da_runs_and_their_checkpoints_round_trip(tiny_data, tmp_path, framework):
    cfg = tiny_config(data=str(tiny_data), framework=framework, epochs=1, teacher_epochs=1, anchor="learned",
                      final_eval=False)
    result = train(cfg, tmp_path / "run", quiet=True)
    assert result.steps == (4 if framework == "kd" else 2)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["model"]["name"] == "unet3d"
    phases = [line.split(",")[2] for line in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]]
    if framework == "kd":
        assert phases[0] == "teacher" and phases[-1] == "student"
    fw = build_framework(cfg)
    fw.load_state_dict(state["framework_state"])
    net = model_from_checkpoint(tmp_path / "run" / "last.pt")
    x, m = torch.randn(1, 4, 16, 16, 16), torch.tensor([[1, 0, 0, 1]], dtype=torch.bool)
    fw.eval()
    with torch.no_grad():
        assert torch.equal(net(x, m), fw.inference_model(x, m))


def test_bf16_autocast_step_runs_on_cpu_and_fp16_is_refused(tiny_data, tmp_path):
    result = train(tiny_config(data=str(tiny_data), amp="bf16", final_eval=False, val_every=0), tmp_path / "a",
                   quiet=True)
    assert result.steps > 0
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["resolved"]["amp"] == "bfloat16"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16"):
            train(tiny_config(data=str(tiny_data), amp="fp16"), tmp_path / "b", quiet=True)


def test_a_run_folder_is_not_overwritten_without_resume(tiny_data, tmp_path):
    cfg = tiny_config(data=str(tiny_data), final_eval=False, val_every=0)
    train(cfg, tmp_path / "run", quiet=True)
    with pytest.raises(ValueError, match="--resume"):
        train(cfg, tmp_path / "run", quiet=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="--out"):
        train(cfg, tmp_path / "file", quiet=True)


def _poison(monkeypatch, at_call: int):
    real = losses.deep_supervision_loss
    calls = {"n": 0}

    def poisoned(logits, label, output):
        calls["n"] += 1
        out = real(logits, label, output)
        return out * float("nan") if calls["n"] == at_call else out

    monkeypatch.setattr("medmap_fast.training.frameworks.losses.deep_supervision_loss", poisoned)


def test_nonfinite_loss_stops_naming_step_and_cases_and_keeps_the_checkpoint(tiny_data, tmp_path, monkeypatch):
    cfg = tiny_config(data=str(tiny_data), epochs=3, checkpoint_every=1, final_eval=False, val_every=0)
    _poison(monkeypatch, at_call=3)
    with pytest.raises(NonFiniteError, match=r"step 3 .*SynthBraTS_000"):
        train(cfg, tmp_path / "run", quiet=True)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["progress"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"]["state_dict"].values() if v.is_floating_point())


def test_nonfinite_skip_counts_the_batch(tiny_data, tmp_path, monkeypatch):
    cfg = tiny_config(data=str(tiny_data), epochs=2, on_nonfinite="skip", final_eval=False, val_every=0)
    _poison(monkeypatch, at_call=2)
    result = train(cfg, tmp_path / "run", quiet=True)
    assert result.skipped == 1
    last = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[-1].split(",")
    assert last[-1] == "1"


def test_cli_train_then_resume_rules(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "medmap_fast.cli", "train", str(tiny_data), "--out", str(run), "--quiet",
            "--patch-size", "16", "16", "16", "--base-channels", "4", "--depth", "3", "--max-channels", "16",
            "--epochs", "1", "--num-workers", "0", "--val-window", "16", "16", "16", "--val-subsets", "false",
            "--cache", "false", "--val-cases", "1"]
    out = subprocess.run(args, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "run folder" in out.stdout
    cfg = json.loads((run / "config.json").read_text())["train"]
    assert cfg["base_channels"] == 4 and cfg["val_subsets"] is False
    again = subprocess.run([sys.executable, "-m", "medmap_fast.cli", "train", "--resume", str(run), "--epochs", "2"],
                           capture_output=True, text=True)
    assert again.returncode == 1 and "--resume" in again.stderr
    bad = subprocess.run([sys.executable, "-m", "medmap_fast.cli", "train", str(tiny_data), "--out", str(tmp_path / "x"),
                          "--amp", "fp17"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--amp" in bad.stderr
    cfg_run = subprocess.run([sys.executable, "-m", "medmap_fast.cli", "train", "--config", str(run / "config.json"),
                              "--out", str(tmp_path / "again"), "--quiet", "--final-eval", "false"],
                             capture_output=True, text=True)
    assert cfg_run.returncode == 0, cfg_run.stderr


def test_a_run_stopped_by_a_nonfinite_batch_resumes_past_it_with_skip(tiny_data, tmp_path, monkeypatch):
    cfg = tiny_config(data=str(tiny_data), epochs=3, checkpoint_every=1, final_eval=False, val_every=0)
    _poison(monkeypatch, at_call=3)
    with pytest.raises(NonFiniteError):
        train(cfg, tmp_path / "run", quiet=True)
    from medmap_fast.training.cli import main as train_cli

    # the poison fires again on the replayed batch: the resumed run must skip it, not stop again
    _poison(monkeypatch, at_call=1)
    assert train_cli(["--resume", str(tmp_path / "run"), "--on-nonfinite", "skip", "--num-workers", "0",
                      "--quiet"]) == 0
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["progress"]["skipped"] == 1 and state["progress"]["step"] == state["progress"]["total_steps"]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert saved["on_nonfinite"] == "skip"


def test_a_new_run_replaces_the_logs_of_one_killed_before_its_first_checkpoint(tiny_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step,loss\n99,1.0\n")
    train(tiny_config(data=str(tiny_data), final_eval=False, val_every=0), run, quiet=True)
    steps = [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [str(i) for i in range(1, len(steps) + 1)]


def test_the_logged_learning_rate_is_that_of_the_step(tiny_data, tmp_path):
    cfg = tiny_config(data=str(tiny_data), epochs=2, warmup_steps=2, lr=1e-2, final_eval=False, val_every=0)
    train(cfg, tmp_path / "run", quiet=True)
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    assert lrs[0] == pytest.approx(1e-2 * 1 / 2)  # linear warm-up: step 1 of 2


def test_kd_validates_the_teacher_in_its_phase(tiny_data, tmp_path, monkeypatch):
    from medmap_fast.training.trainer import Trainer

    cfg = tiny_config(data=str(tiny_data), framework="kd", epochs=1, teacher_epochs=1, final_eval=False, val_every=1)
    seen = []
    real = Trainer.validate

    def spy(self):
        seen.append((self.framework.phase, self.framework.validated_model is self.framework.teacher))
        return real(self)

    monkeypatch.setattr(Trainer, "validate", spy)
    train(cfg, tmp_path / "run", quiet=True)
    assert seen == [("teacher", True), ("student", False)]
