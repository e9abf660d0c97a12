"""The training driver: synthesis pieces, KD loss, CLI and presets, a tiny end-to-end digits run,
the run-folder contract, and resuming after SIGKILL."""
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stars_fast import loop, models, train
from stars_fast.data import DATASETS
from stars_fast.distill import kd_loss
from stars_fast.synthesis import (BNStatsHooks, DeepInversionSynthesizer, StarsRegularizer, SyntheticMemory,
                                  jitter_and_flip)
from stars_fast.synthesis import objective as objective_module
from stars_fast.synthesis.memory import open_synthetic
from stars_fast.synthesis.base import pixel_bounds
from stars_fast.synthesis.objective import InversionObjective

DIGITS = DATASETS["digits"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = ["--g-steps", "10", "--kd-steps", "50", "--ep-steps", "50", "--batch-size", "64",
            "--synthesis-batch-size", "64", "--no-progress"]
SHORT_EPOCHS = TINY_RUN + ["--g-steps", "5", "--kd-steps", "10", "--ep-steps", "10"]  # resuming need not learn


# ------------------------------------------------------------------------------ synthesis

def test_bn_hooks_compute_fast_datafree_r_feature():
    bn = torch.nn.BatchNorm2d(3).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, 5, 5)
    with BNStatsHooks(torch.nn.Sequential(bn)) as hooks:
        bn(x)
        got = hooks.loss()
    mean = x.mean((0, 2, 3))
    var = x.permute(1, 0, 2, 3).reshape(3, -1).var(1, unbiased=False)
    assert torch.allclose(got, (bn.running_var - var).norm() + (bn.running_mean - mean).norm())
    assert not bn._forward_hooks  # removed on exit


def test_jitter_and_flip_moves_whole_pixels_per_sample():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8).requires_grad_()
    y = jitter_and_flip(x, flip=True)
    assert torch.equal(y.detach().flatten(1).sort(1)[0], x.detach().flatten(1).sort(1)[0])
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("stars", [False, True])
def test_synthesis_optimizes_images_only(pair, stars):
    teacher, student = pair
    regularizer = StarsRegularizer(backend="reference") if stars else None
    synthesizer = DeepInversionSynthesizer(teacher, student, DIGITS, batch_size=8, iterations=3, lr_g=0.1,
                                           bn=10, oh=1, adv=1, tv=1e-4, l2=1e-4, stars=regularizer)
    student.train()
    result = synthesizer.synthesize()
    assert result.images.shape == (8, 1, 8, 8) and not result.images.requires_grad
    low, high = pixel_bounds(DIGITS, "cpu")
    assert (result.images >= low - 1e-6).all() and (result.images <= high + 1e-6).all()
    assert all(p.grad is None for p in list(student.parameters()) + list(teacher.parameters()))
    assert all(p.requires_grad for p in student.parameters()) and student.training  # restored
    assert (result.losses["loss_rca"] > 0) == stars and (result.losses["loss_tar"] > 0) == stars
    assert result.losses["loss_bn"] > 0 and result.losses["loss_tv"] > 0 and result.losses["loss_l2"] > 0


def test_synthesis_round_runs_both_nets_channels_last_on_cpu_with_the_same_loss(pair, monkeypatch):
    teacher, student = pair
    torch.manual_seed(0)
    images, targets = torch.randn(8, 1, 8, 8), torch.arange(8)
    regularizer = StarsRegularizer(backend="reference")

    def loss_terms(net_teacher, net_student):
        objective = InversionObjective(net_teacher, net_student, bn=10, oh=1, adv=1, stars=regularizer)
        with objective.round() as loss:
            return loss(images, targets).terms

    def is_channels_last(model):  # convs with one input channel are both layouts at once: left out
        return [m.weight.is_contiguous(memory_format=torch.channels_last)
                for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]

    assert not any(is_channels_last(teacher))
    fast = loss_terms(teacher, student)
    assert all(is_channels_last(teacher))
    with monkeypatch.context() as patch:  # the NCHW path: the same teacher turned back to NCHW in place
        patch.setattr(objective_module, "channels_last_on_cpu", lambda model: model)
        plain = loss_terms(teacher.to(memory_format=torch.contiguous_format), student)
    assert not any(is_channels_last(teacher))
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-4, atol=1e-6)
    assert fast["loss_rca"] > 0 and fast["loss_adv"] != 0


def _pixel(value: float) -> int:
    """The uint8 pixel the memory stores for a normalized digits value."""
    return round(min(1.0, max(0.0, value * DIGITS.std[0] + DIGITS.mean[0])) * 255)


def test_memory_appends_to_its_files_and_samples_the_newest(tmp_path):
    memory = SyntheticMemory(DIGITS, max_size=6, run_dir=str(tmp_path))
    for i in range(3):  # normalized values 0, 1, 2; labels 10 * i + position
        memory.add(torch.full((4, 1, 8, 8), float(i)), torch.arange(4) + 10 * i)
    assert memory.count == 12 and len(memory) == 6
    images, labels = open_synthetic(str(tmp_path))
    assert images.dtype == torch.uint8 and images.shape == (12, 1, 8, 8)
    assert [int(images[k].float().mean()) for k in (0, 4, 8)] == [_pixel(0.0), _pixel(1.0), _pixel(2.0)]
    assert labels.tolist() == [10 * i + j for i in range(3) for j in range(4)]
    with open(tmp_path / "synthetic" / "meta.json") as f:
        assert json.load(f)["count"] == 12
    assert os.path.getsize(tmp_path / "synthetic" / "images.u8") == 12 * 64  # appended, never rewritten
    torch.manual_seed(1)
    drawn = memory.sample(200, augment=False)
    pixels = sorted({round(float(v) * 255) for v in drawn.mean((1, 2, 3)) * DIGITS.std[0] + DIGITS.mean[0]})
    assert pixels == [_pixel(1.0), _pixel(2.0)]  # the newest 6 only: half of batch 1, all of batch 2


def test_memory_resumes_at_the_checkpoint_count(tmp_path):
    memory = SyntheticMemory(DIGITS, max_size=100, run_dir=str(tmp_path))
    memory.add(torch.zeros(3, 1, 8, 8), torch.zeros(3, dtype=torch.long))
    state = torch.load(_saved(memory.state_dict(), tmp_path), weights_only=True)
    memory.add(torch.ones(5, 1, 8, 8), torch.ones(5, dtype=torch.long))  # an epoch the checkpoint lost
    resumed = SyntheticMemory(DIGITS, max_size=100, run_dir=str(tmp_path))
    resumed.load_state_dict(state)
    images, labels = open_synthetic(str(tmp_path))
    assert images.shape[0] == 3 and labels.tolist() == [0, 0, 0]
    assert os.path.getsize(tmp_path / "synthetic" / "images.u8") == 3 * 64
    os.truncate(tmp_path / "synthetic" / "images.u8", 64)  # the files lost images the checkpoint counts
    with pytest.raises(ValueError, match="incomplete"):
        SyntheticMemory(DIGITS, max_size=100, run_dir=str(tmp_path)).load_state_dict(state)
    with pytest.raises(ValueError, match="expected"):
        resumed.add(torch.zeros(2, 3, 8, 8))


def test_memory_checksums_start_where_the_checkpoint_first_recorded_them(tmp_path):
    """A checkpoint written before the blocks were recorded has none for its first images: the blocks
    appended after resuming it are checked where they lie, not as if they started at image 0."""
    memory = SyntheticMemory(DIGITS, max_size=100, run_dir=str(tmp_path))
    memory.add(torch.zeros(3, 1, 8, 8), torch.zeros(3, dtype=torch.long))
    resumed = SyntheticMemory(DIGITS, max_size=100, run_dir=str(tmp_path))
    resumed.load_state_dict({"count": 3, "labels": True})  # no "blocks": an older checkpoint
    resumed.add(torch.ones(2, 1, 8, 8), torch.ones(2, dtype=torch.long))
    state = torch.load(_saved(resumed.state_dict(), tmp_path), weights_only=True)
    SyntheticMemory(DIGITS, max_size=100, run_dir=str(tmp_path)).load_state_dict(state)  # checks and passes
    with open(tmp_path / "synthetic" / "images.u8", "r+b") as f:
        f.seek(3 * 64 + 10)
        f.write(b"\x07")
    with pytest.raises(ValueError, match=r"block 0 \(images 3-4\) fails its checksum"):
        SyntheticMemory(DIGITS, max_size=100, run_dir=str(tmp_path)).load_state_dict(state)


def _saved(obj, folder):
    path = folder / "state.pt"
    torch.save(obj, path)
    return path


def test_kd_loss_is_temperature_scaled_kl():
    s, t = torch.randn(5, 10), torch.randn(5, 10)
    p_t = F.softmax(t / 4, 1)
    expected = (p_t * (p_t.log() - F.log_softmax(s / 4, 1))).sum(1).mean() * 16
    assert torch.allclose(kd_loss(s, t, 4.0), expected, atol=1e-6)
    assert float(kd_loss(t, t, 4.0)) == pytest.approx(0.0, abs=1e-6)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            kd_loss(s, t, bad)


# ------------------------------------------------------------------------------------ CLI

def test_help_documents_every_flag():
    text = train.build_parser().format_help()
    for flag in ("--method", "--stars", "--no-stars", "--lambda-rca", "--lambda-tar", "--quantiles", "--delta",
                 "--tar-normalize", "--teacher", "--teacher-ckpt", "--student", "--T", "--neuron", "--dataset",
                 "--data-root", "--epochs", "--batch-size", "--synthesis-batch-size", "--lr", "--lr-g",
                 "--g-steps", "--kd-steps", "--ep-steps", "--adv", "--bn", "--oh", "--kd-T", "--warmup", "--seed",
                 "--device", "--backend", "--amp", "--out", "--resume", "--preset"):
        assert flag in text, flag
    assert "deepinv-cifar10-resnet34" in text


def test_explicit_flags_override_the_preset():
    config = train.make_config(train.parse_args(
        ["--preset", "deepinv-cifar100-resnet34", "--teacher-ckpt", "t.pth", "--g-steps", "7", "--no-stars",
         "--quantiles", "0.5", "0.9", "--lambda-tar", "0"]))
    assert (config["teacher"], config["student"], config["dataset"]) == ("resnet34", "s_resnet18", "cifar100")
    assert (config["epochs"], config["kd_steps"], config["ep_steps"], config["batch_size"]) == (200, 400, 400, 256)
    assert (config["lr"], config["lr_g"], config["adv"], config["bn"], config["oh"], config["kd_T"]) == \
        (0.1, 0.1, 1.0, 10.0, 1.0, 20.0)
    assert (config["g_steps"], config["stars"], config["quantiles"], config["lambda_tar"]) == \
        (7, False, [0.5, 0.9], 0.0)
    assert config["preset"] == "deepinv-cifar100-resnet34"


def test_defaults_are_the_digits_run_and_bad_configs_fail():
    config = train.make_config(train.parse_args([]))
    assert (config["dataset"], config["teacher"], config["student"], config["method"]) == \
        ("digits", "digits_cnn", "digits_snn", "deepinv")
    assert config["stars"] and config["quantiles"] == [0.6, 0.7, 0.8, 0.9, 0.95]
    with pytest.raises(SystemExit, match="teacher-ckpt"):
        train.make_config(train.parse_args(["--dataset", "cifar10"]))
    with pytest.raises(SystemExit, match="ep-steps"):
        train.make_config(train.parse_args(["--kd-steps", "10", "--ep-steps", "5"]))
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "no-such-preset"])


# ---------------------------------------------------------------------------- end to end

def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_tiny_run_learns_and_fills_the_run_folder(teacher_cache, tmp_path):
    out = str(tmp_path / "run")
    summary = train.main(["--epochs", "3", "--out", out] + TINY_RUN)
    assert summary["teacher_acc"] > 0.9
    assert summary["student_acc"] > 0.5, summary  # chance is 0.1; this run reaches about 0.7

    records = _metrics(out)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for key in ("student_acc", "kd_loss", "synth_loss", "loss_bn", "loss_oh", "loss_adv", "loss_rca", "loss_tar"):
        assert all(isinstance(r[key], float) for r in records), key
    assert all(0.0 <= r["student_acc"] <= 1.0 for r in records)
    for r in records:  # the synthesis steps' gradient norms, every epoch
        assert 0 < r["synth_grad_median"] <= r["synth_grad_max"] and isinstance(r["synth_grad_spikes"], int)

    with open(os.path.join(out, "summary.json")) as f:
        saved = json.load(f)
    assert saved["student_acc"] == records[-1]["student_acc"] and saved["teacher_acc"] == summary["teacher_acc"]
    assert saved["config"]["g_steps"] == 10 and saved["config"]["dataset"] == "digits"

    for epoch in (1, 2, 3):
        with open(os.path.join(out, f"synthetic_epoch{epoch:03d}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    checkpoint = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert checkpoint["epoch"] == 3 and checkpoint["memory"]["count"] == 3 * 64  # the pixels live in synthetic/
    assert {"student", "optimizer", "scheduler", "rng", "history", "config"} <= set(checkpoint)
    assert not any(isinstance(v, torch.Tensor) and v.numel() >= 3 * 64 * 64 for v in checkpoint["memory"].values())
    images, labels = open_synthetic(out)
    assert images.shape == (3 * 64, 1, 8, 8) and labels.shape == (3 * 64,) and 0 <= int(labels.min())
    assert int(labels.max()) <= 9

    assert all(r["best_acc"] == max(q["student_acc"] for q in records[:i + 1]) for i, r in enumerate(records))
    assert all(isinstance(r["lr"], float) and r["time_s"] > 0 for r in records)
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read().splitlines()
    epoch_lines = [line for line in log if line.startswith("epoch ")]
    assert len(epoch_lines) == 3 and all("student" in line and "best" in line and "kd_loss" in line and "lr" in line
                                         and "grad " in line for line in epoch_lines)
    assert log[-1] == saved["result_row"]
    assert saved["result_row"].startswith("| deepinv | on | digits_cnn → digits_snn | 4 | lif |")
    assert saved["backend"]["requested"] == "auto" and saved["backend"]["resolved"] in ("cpu", "reference")
    assert saved["device"] == "cpu" and saved["versions"]["torch"] == torch.__version__
    assert "stars_fast" in saved["versions"] and "git_commit" in saved
    modes = {name: os.stat(os.path.join(out, name)).st_mode & 0o777 for name in
             ("checkpoint.pt", "student.pth", "best.pth", "summary.json", "metrics.jsonl", "log.txt")}
    assert len(set(modes.values())) == 1, modes  # the checkpoint no longer 0600 while the rest is 0644
    assert not [name for name in os.listdir(out) if ".tmp" in name]

    student, meta = models.load_student(os.path.join(out, "student.pth"))
    assert meta["epoch"] == 3 and meta["acc"] == records[-1]["student_acc"] and not student.training
    assert (meta["arch"], meta["T"], meta["neuron"], meta["num_classes"], meta["in_channels"]) == \
        ("digits_snn", 4, "lif", 10, 1)
    best, best_meta = models.load_student(os.path.join(out, "best.pth"))
    best_epoch = max(records, key=lambda r: (r["student_acc"], r["epoch"]))
    assert best_meta["best_acc1"] == best_meta["acc"] == summary["best_student_acc"] == best_epoch["student_acc"]
    assert best_meta["epoch"] == best_epoch["epoch"]
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(student(x), models.load_student(os.path.join(out, "student.pth"))[0](x))

    with pytest.raises(SystemExit, match="--resume"):
        train.main(["--epochs", "3", "--out", out] + TINY_RUN)


def test_resume_after_sigkill_logs_every_epoch_once(teacher_cache, tmp_path):
    out = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "stars_fast.train", "--epochs", "4", "--out", out] + SHORT_EPOCHS,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = os.path.join(out, "checkpoint.pt")
    deadline = time.time() + 120
    while not os.path.exists(checkpoint) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_after = torch.load(checkpoint, weights_only=True)["epoch"]
    assert killed_after < 4

    summary = train.main(["--out", out, "--resume", "--no-progress"])
    assert [r["epoch"] for r in _metrics(out)] == [1, 2, 3, 4]
    assert summary["epochs_completed"] == 4
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 4


def test_cifar_run_with_a_checkpointed_teacher(tmp_path):
    """The non-digits path: a CIFAR-10 folder, a teacher from --teacher-ckpt (Fast-Datafree format),
    3-channel 32x32 synthesis with flips; a smoke run at toy sizes."""
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3, 4, 5]}, f)
    teacher_path = str(tmp_path / "cifar10_resnet20.pth")
    teacher = models.build_teacher("resnet20", 10)
    torch.save({"state_dict": {f"module.{k}": v for k, v in teacher.state_dict().items()}}, teacher_path)

    out = str(tmp_path / "run")
    summary = train.main(["--dataset", "cifar10", "--data-root", str(tmp_path / "data"), "--teacher", "resnet20",
                          "--teacher-ckpt", teacher_path, "--student", "s_resnet20", "--T", "2", "--epochs", "1",
                          "--g-steps", "2", "--kd-steps", "2", "--ep-steps", "2", "--batch-size", "4",
                          "--synthesis-batch-size", "4", "--threads", "1", "--out", out, "--no-progress"])
    assert summary["epochs_completed"] == 1 and 0.0 <= summary["student_acc"] <= 1.0
    assert open_synthetic(out)[0].shape == (4, 3, 32, 32)


def test_resume_after_sigkill_is_bit_identical_to_an_uninterrupted_run(teacher_cache, tmp_path):
    out, whole = str(tmp_path / "killed"), str(tmp_path / "whole")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "stars_fast.train", "--epochs", "3", "--out", out] + SHORT_EPOCHS,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not (
            os.path.exists(metrics) and open(metrics).read().count("\n") >= 1):
        time.sleep(0.02)
    time.sleep(0.5)  # into epoch 2: its synthesis has appended to the memory's files already, or soon will
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    train.main(["--out", out, "--resume", "--no-progress"])
    train.main(["--epochs", "3", "--out", whole] + SHORT_EPOCHS)
    resumed, uninterrupted = models.load_student(os.path.join(out, "student.pth"))[0], \
        models.load_student(os.path.join(whole, "student.pth"))[0]
    for (name, a), (_, b) in zip(resumed.state_dict().items(), uninterrupted.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(open_synthetic(out)[0], open_synthetic(whole)[0])
    assert [r["student_acc"] for r in _metrics(out)] == [r["student_acc"] for r in _metrics(whole)]


# ------------------------------------------------------------------- errors and hardening

@pytest.mark.parametrize("flags,message", [
    (["--kd-T", "0"], "--kd-T must be > 0"), (["--lr", "nan"], "--lr must be finite"),
    (["--lr", "inf"], "--lr must be finite"), (["--lr", "-0.1"], "--lr must be > 0"),
    (["--lr-g", "0"], "--lr-g must be > 0"), (["--delta", "0"], "--delta must be > 0"),
    (["--bn", "nan"], "--bn must be finite"), (["--adv", "-1"], "--adv must be >= 0"),
    (["--quantiles", "0.5", "nan"], "--quantiles must be finite"), (["--quantiles", "1.5"], "--quantiles"),
    (["--warmup", "15"], "--warmup"), (["--epochs", "3", "--warmup", "5"], "never distill"),
])
def test_arguments_that_can_only_give_nan_or_no_kd_are_refused(flags, message):
    with pytest.raises(SystemExit, match=message):
        train.make_config(train.parse_args(flags))


@pytest.mark.parametrize("flags,message", [
    (["--epoch", "3"], "unrecognized arguments: --epoch"),  # no prefix matching
    (["--T", "20"], "KD temperature"), (["--T", "4.0"], "KD temperature"),
    (["--teacher", "resnet50"], "invalid choice"), (["--student", "s_resnet50"], "invalid choice"),
])
def test_cli_refuses_prefixes_ambiguous_T_and_unknown_models(flags, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(flags)
    assert message in capsys.readouterr().err


def test_time_steps_and_kd_temperature_are_told_apart():
    assert train.make_config(train.parse_args(["--time-steps", "32"]))["T"] == 32
    assert train.make_config(train.parse_args(["--T", "8", "--kd-T", "4"]))[("T")] == 8
    text = train.build_parser().format_help()
    assert "TIME STEPS" in text and "KD TEMPERATURE" in text and "Fast-Datafree" in text


def test_cli_names_match_the_model_zoo_and_datasets():
    from stars_fast import cli
    assert cli.TEACHER_NAMES == models.TEACHERS and cli.STUDENT_NAMES == models.STUDENTS
    assert cli.DATASET_NAMES == tuple(DATASETS)
    from stars_fast.ops.stars import DEFAULT_QUANTILES
    from stars_fast.presets import DEFAULT_QUANTILES as PRESET_QUANTILES
    assert tuple(DEFAULT_QUANTILES) == PRESET_QUANTILES


@pytest.mark.parametrize("flag,expected", [("--help", "--time-steps"), ("--version", "stars_fast 0.1.0")])
def test_help_and_version_answer_without_importing_torch(flag, expected):
    code = (f"import sys; sys.argv = ['x', '{flag}']\n"
            "try:\n    import runpy; runpy.run_module('stars_fast.train', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


@pytest.mark.parametrize("flags,message", [
    (["--teacher", "vgg16", "--student", "digits_snn"], "taps 5 stages but --student digits_snn taps 3"),
    (["--teacher-ckpt", "MISSING"], "no such file"),
    (["--teacher-ckpt", "GARBAGE"], "not a checkpoint of --teacher digits_cnn"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--device", "tpu"], "not a device"),
])
def test_early_errors_are_one_line_and_leave_no_run_folder(flags, message, teacher_cache, tmp_path):
    if flags == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    (tmp_path / "GARBAGE").write_bytes(b"this is not a checkpoint")
    flags = [str(tmp_path / f) if f in ("MISSING", "GARBAGE") else f for f in flags]
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=message) as error:
        train.main(flags + ["--epochs", "1", "--out", str(out)] + SHORT_EPOCHS)
    assert isinstance(error.value.code, str) and "\n" not in error.value.code  # exit status 1, one line
    assert not out.exists()


def test_garbage_teacher_checkpoint_from_the_command_line_is_one_line(tmp_path):
    (tmp_path / "t.pth").write_bytes(b"garbage")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "stars_fast.train", "--teacher-ckpt", str(tmp_path / "t.pth"),
                             "--out", str(tmp_path / "run")] + SHORT_EPOCHS, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "not a checkpoint" in result.stderr
    assert not (tmp_path / "run").exists()


def test_unwritable_out_is_one_line(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(SystemExit, match="cannot write the run folder"):
        train.main(["--out", str(tmp_path / "file" / "run")] + SHORT_EPOCHS)
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(SystemExit, match="cannot write the run folder"):
            train.main(["--out", str(tmp_path / "ro")] + SHORT_EPOCHS)


@pytest.mark.parametrize("fault", ["kd_loss", "parameter", "synthesis"])
def test_non_finite_training_stops_with_the_term_named(fault, teacher_cache, tmp_path, monkeypatch):
    from stars_fast import loop
    from stars_fast.synthesis import DeepInversionSynthesizer as Synth

    real_distill, real_synthesize = loop.distill_steps, Synth.synthesize

    def distill(student, *args, **kwargs):
        loss = real_distill(student, *args, **kwargs)
        if fault == "parameter":
            with torch.no_grad():
                next(iter(getattr(student, "module", student).parameters())).view(-1)[0] = float("inf")
        return float("nan") if fault == "kd_loss" else loss

    def synthesize(self, *args, **kwargs):
        result = real_synthesize(self, *args, **kwargs)
        if fault == "synthesis" and self.epoch >= 1:
            result.losses["loss_bn"] = float("nan")
        return result

    monkeypatch.setattr(loop, "distill_steps", distill)
    monkeypatch.setattr(Synth, "synthesize", synthesize)
    out = str(tmp_path / "run")
    message = {"kd_loss": "KD loss kd_loss is nan in epoch 1", "parameter": "student parameter .* is not finite",
               "synthesis": "synthesis loss loss_bn is nan in epoch 2"}[fault]
    with pytest.raises(SystemExit, match=message) as error:
        train.main(["--epochs", "3", "--out", out] + SHORT_EPOCHS)
    assert isinstance(error.value.code, str)  # a non-zero exit status
    if fault == "synthesis":  # epoch 1 was fine: its checkpoint and files stay, nothing of epoch 2 is kept
        assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["epoch"] == 1
        assert [r["epoch"] for r in _metrics(out)] == [1]
    else:
        assert not os.path.exists(out)  # failed before its first checkpoint: no half run folder


def _flip_bytes_in_record(path, record_suffix):
    import zipfile
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(record_suffix))
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        start = info.header_offset + 30 + name_length + extra_length
        f.seek(start + info.file_size // 2)
        chunk = f.read(4)
        f.seek(start + info.file_size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))


def test_corrupted_checkpoint_is_refused_before_resuming(teacher_cache, tmp_path):
    out = str(tmp_path / "run")
    train.main(["--epochs", "1", "--out", out] + SHORT_EPOCHS)
    checkpoint = os.path.join(out, "checkpoint.pt")
    _flip_bytes_in_record(checkpoint, "/data/0")  # inside a tensor record: torch.load would not notice
    torch.load(checkpoint, weights_only=True)
    with pytest.raises(SystemExit, match="fails its CRC check"):
        train.main(["--epochs", "2", "--out", out, "--resume", "--no-progress"])
    models.save_checkpoint(torch.load(checkpoint, weights_only=True), checkpoint)  # intact again (CRCs rewritten)
    os.truncate(os.path.join(out, "synthetic", "images.u8"), 100)  # but the memory lost images
    with pytest.raises(SystemExit, match="cannot resume: .*incomplete"):
        train.main(["--epochs", "2", "--out", out, "--resume", "--no-progress"])


def test_stale_temporary_files_are_removed_on_start_and_resume(teacher_cache, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".stars_fast_run").touch()  # a run of ours, killed before its first checkpoint
    (out / ".checkpoint.pt.stars_fast-tmp-killed").write_bytes(b"x" * 100)  # what a kill mid-write leaves
    (out / ".notes.txt.tmp-editor").write_text("another program's")  # not ours: stays
    train.main(["--epochs", "1", "--out", str(out)] + SHORT_EPOCHS)
    assert not (out / ".checkpoint.pt.stars_fast-tmp-killed").exists()
    assert (out / ".notes.txt.tmp-editor").read_text() == "another program's"
    (out / ".summary.json.stars_fast-tmp-a1b2").write_text("{")
    (out / "synthetic" / ".meta.json.stars_fast-tmp-zz").write_text("{")
    train.main(["--epochs", "2", "--out", str(out), "--resume", "--no-progress"])
    leftovers = [str(p) for p in out.rglob("*") if ".stars_fast-tmp-" in p.name]
    assert not leftovers, leftovers


def test_previous_checkpoint_survives_a_failed_write(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    models.save_checkpoint({"epoch": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        models.save_checkpoint({"epoch": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_export_synthetic_writes_an_image_folder(teacher_cache, tmp_path):
    out, export = str(tmp_path / "run"), tmp_path / "export"
    train.main(["--epochs", "1", "--out", out, "--export-synthetic", str(export), "--tensorboard"] + SHORT_EPOCHS)
    images, labels = open_synthetic(out)
    from PIL import Image
    from torchvision.datasets import ImageFolder
    dataset = ImageFolder(str(export))
    assert len(dataset) == len(images) == 64
    assert sorted(dataset.classes) == sorted({f"{int(c):03d}" for c in labels})
    first = sorted(export.rglob("*.png"))[0]
    index = int(first.stem)
    assert np.array_equal(np.asarray(Image.open(first)), images[index, 0].numpy())
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(out, "tensorboard")))


def test_epoch_lines_without_a_terminal_and_no_progress_bars_in_redirected_output(tmp_path):
    """From a cold cache, so that the teacher's training (and its bar) is part of the run."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               STARS_FAST_CACHE=str(tmp_path / "cold-cache"))
    flags = [f for f in SHORT_EPOCHS if f != "--no-progress"]  # progress bars requested, but stderr is a pipe
    result = subprocess.run([sys.executable, "-m", "stars_fast.train", "--epochs", "2", "--out", str(tmp_path / "run")]
                            + flags, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "%|" not in result.stderr, result.stderr[:300]  # no tqdm bars (text mode reads their \r as \n)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("training the digits teacher")
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["1/2", "2/2"]
    assert lines[-3].startswith("| method |") and lines[-1].startswith("| deepinv | on |")


def test_gradient_statistics_count_steps_far_above_their_rounds_median():
    rounds = [[1.0, 2.0, 3.0, 1e4], [50.0, 60.0, 7e3], []]  # medians 2.5 and 60: 1e4 > 250, 7e3 > 6000
    stats = loop.gradient_statistics(rounds)
    assert stats == {"synth_grad_median": 50.0, "synth_grad_max": 1e4, "synth_grad_spikes": 2}
    assert loop.gradient_statistics([[1.0, 99.0, 100.0]])["synth_grad_spikes"] == 0
    assert loop.gradient_statistics([])["synth_grad_median"] is None


def test_a_gradient_spike_is_warned_about_once_naming_the_active_terms(teacher_cache, tmp_path, monkeypatch):
    """A synthesizer whose round has one step at 1e9 x the others: one warning line in the log (not one per
    epoch), naming the loss terms that were non-zero; every epoch's spike count in metrics.jsonl."""
    original = DeepInversionSynthesizer.synthesize

    def spiky(self, progress=None):
        result = original(self, progress)
        result.grad_norms = result.grad_norms[:-1] + [1e9 * max(result.grad_norms)]
        return result

    monkeypatch.setattr(DeepInversionSynthesizer, "synthesize", spiky)
    out = str(tmp_path / "run")
    train.main(["--epochs", "2", "--out", out] + TINY_RUN)
    with open(os.path.join(out, "log.txt")) as f:
        warnings = [line for line in f if line.startswith("warning: ")]
    assert len(warnings) == 1 and "epoch 1 " in warnings[0]
    assert "terms active: bn, oh, adv, rca, tar" in warnings[0]
    assert [r["synth_grad_spikes"] for r in _metrics(out)] == [1, 1]


# ------------------------------------------------------------------- one writer per run folder

def test_a_second_run_or_a_resume_of_a_live_run_is_refused(teacher_cache, tmp_path):
    """A live run holds the folder's lock: another run, or --resume, on that folder stops with one line
    naming the holder before touching anything; once the holder lets go, --resume works."""
    from stars_fast.run_folder import RunFolder
    out = str(tmp_path / "run")
    train.main(["--epochs", "1", "--out", out] + SHORT_EPOCHS)
    live = RunFolder(out)
    live.create()  # as a run still going would hold it
    before = {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)}
    try:
        with pytest.raises(SystemExit, match=f"another run is writing this folder \\(pid {os.getpid()} on "):
            train.main(["--epochs", "2", "--out", out, "--resume", "--no-progress"])
        assert {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)} == before
    finally:
        live.release()
    starting = RunFolder(str(tmp_path / "starting"))  # a live run before its first checkpoint
    starting.create()
    try:
        with pytest.raises(SystemExit, match="another run is writing this folder"):
            train.main(["--epochs", "1", "--out", starting.path, "--seed", "1"] + SHORT_EPOCHS)
        assert sorted(os.listdir(starting.path)) == [".stars_fast.lock", ".stars_fast_run"]
    finally:
        starting.release()
    assert train.main(["--epochs", "2", "--out", out, "--resume", "--no-progress"])["epochs_completed"] == 2


def test_the_lock_of_a_killed_run_is_free(tmp_path):
    """flock dies with its process: a run killed with SIGKILL leaves no stale lock."""
    out = str(tmp_path / "run")
    code = ("import sys, time; from stars_fast.run_folder import RunFolder; f = RunFolder(sys.argv[1]); f.create(); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, out], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        from stars_fast.run_folder import RunFolder
        with pytest.raises(SystemExit, match=f"pid {holder.pid} "):
            RunFolder(out).create()
    finally:
        holder.kill()
        holder.wait()
    folder = RunFolder(out)
    folder.create()
    folder.release()


def test_out_must_be_new_empty_or_a_run_folder(teacher_cache, tmp_path):
    """A user's folder with files in it (or a file) is never written into; an empty one is taken."""
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(SystemExit, match="not empty and is not a stars_fast run folder"):
        train.main(["--epochs", "1", "--out", str(foreign)] + SHORT_EPOCHS)
    assert sorted(p.name for p in foreign.iterdir()) == ["holiday.jpg"]
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(SystemExit, match="a file, not a folder"):
        train.main(["--epochs", "1", "--out", str(a_file)] + SHORT_EPOCHS)
    empty = tmp_path / "empty"
    empty.mkdir()
    train.main(["--epochs", "1", "--out", str(empty)] + SHORT_EPOCHS)
    assert (empty / ".stars_fast_run").is_file() and (empty / "checkpoint.pt").is_file()


def test_resume_with_other_run_defining_flags_is_refused_and_changes_are_recorded(teacher_cache, tmp_path):
    out = str(tmp_path / "run")
    train.main(["--epochs", "1", "--out", out] + SHORT_EPOCHS)
    for flags, named in ((["--T", "2"], "--T 4 (run) vs 2 (given)"), (["--seed", "1"], "--seed 0 (run) vs 1"),
                         (["--no-stars"], "--stars True (run) vs False"),
                         (["--method", "cmi"], "--method 'deepinv' (run) vs 'cmi'")):
        with pytest.raises(SystemExit, match=f"cannot resume .* with other settings: {re.escape(named)}"):
            train.main(["--epochs", "2", "--out", out, "--resume", "--no-progress"] + flags)
    summary = train.main(["--epochs", "2", "--out", out, "--resume", "--no-progress", "--threads", "1",
                          "--seed", "0"])  # the run's own value is no change
    assert summary["epochs_completed"] == 2
    with open(os.path.join(out, "summary.json")) as f:
        changes = json.load(f)["config"]["resume_changes"]
    assert changes == [{"after_epoch": 1, "flag": "--epochs", "from": 1, "to": 2},
                       {"after_epoch": 1, "flag": "--threads", "from": 0, "to": 1}]


def _flip_a_tensor_byte(path):
    """Flip one byte inside the largest tensor record of a torch.save zip (its size unchanged)."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(record.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        position = record.header_offset + 30 + name_length + extra_length + record.file_size // 2
        f.seek(position)
        byte = f.read(1)
        f.seek(position)
        f.write(bytes([byte[0] ^ 0x10]))


def test_damaged_teacher_cache_is_rebuilt_and_wrong_teacher_files_are_refused(teacher_cache, tmp_path, monkeypatch):
    """A bit flip in the cached digits teacher: caught by the CRC check, said in one line, the teacher
    trained again (the same weights: its recipe is seeded). A bit-flipped --teacher-ckpt and a student's
    model file given as --teacher-ckpt are refused with one line."""
    from stars_fast.data import DATASETS
    from stars_fast.teacher_cache import digits_teacher
    monkeypatch.setenv("STARS_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(train.DIGITS_TEACHER_RECIPE, "epochs", 2)
    first = digits_teacher("digits_cnn", DATASETS["digits"], "cpu", progress=False)
    (cached,) = (tmp_path / "cache").iterdir()
    _flip_a_tensor_byte(str(cached))
    lines = []
    again = digits_teacher("digits_cnn", DATASETS["digits"], "cpu", progress=False, log=lines.append)
    assert "fails its CRC check" in lines[0] and "training it again" in lines[0]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert len(lines) == 2 and digits_teacher("digits_cnn", DATASETS["digits"], "cpu", progress=False,
                                              log=lines.append) is not None and len(lines) == 2  # intact now

    flipped = tmp_path / "teacher.pth"
    models.save_checkpoint({"state_dict": first.state_dict()}, str(flipped))
    _flip_a_tensor_byte(str(flipped))
    with pytest.raises(SystemExit, match="--teacher-ckpt .*fails its CRC check"):
        train.main(["--epochs", "1", "--out", str(tmp_path / "run1"), "--teacher-ckpt", str(flipped)] + SHORT_EPOCHS)
    student = models.build_student("digits_snn", 10, T=2, in_channels=1)
    student_file = tmp_path / "student.pth"
    models.save_student(str(student_file), student, arch="digits_snn", num_classes=10, in_channels=1, T=2,
                        neuron="lif", acc=None, epoch=None)
    with pytest.raises(SystemExit, match="is a spiking student file of arch 'digits_snn', not a 'digits_cnn'"):
        train.main(["--epochs", "1", "--out", str(tmp_path / "run2"), "--teacher-ckpt", str(student_file)]
                   + SHORT_EPOCHS)


def test_a_failed_write_at_any_point_of_an_epochs_end_is_repaired_by_resume(teacher_cache, tmp_path, monkeypatch):
    """Each file written at the end of the last epoch (checkpoint, student.pth, best.pth, summary.json, ...)
    fails in turn (ENOSPC from the atomic rename). The run stops; --resume then leaves student.pth and
    best.pth equal to the checkpoint's student and summary.json to its history, as an uninterrupted run."""
    import errno
    import shutil
    from stars_fast import atomic
    template = str(tmp_path / "after-epoch-1")
    train.main(["--epochs", "1", "--out", template] + SHORT_EPOCHS)
    replace = atomic.os.replace
    calls = []

    def count(src, dst):
        calls.append(os.path.basename(dst))
        return replace(src, dst)

    probe = str(tmp_path / "probe")
    shutil.copytree(template, probe)
    monkeypatch.setattr(atomic.os, "replace", count)
    train.main(["--epochs", "2", "--out", probe, "--resume", "--no-progress"])
    monkeypatch.setattr(atomic.os, "replace", replace)
    written = [name for name in calls if not name.endswith(".png")]
    assert {"checkpoint.pt", "student.pth", "summary.json"} <= set(written)
    for failing in range(len(calls)):
        out = str(tmp_path / f"fail-{failing}")
        shutil.copytree(template, out)
        calls.clear()

        def fail_once(src, dst, failing=failing):
            calls.append(dst)
            if len(calls) == failing + 1:
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            return replace(src, dst)

        monkeypatch.setattr(atomic.os, "replace", fail_once)
        with pytest.raises(OSError, match="injected"):
            train.main(["--epochs", "2", "--out", out, "--resume", "--no-progress"])
        monkeypatch.setattr(atomic.os, "replace", replace)
        summary = train.main(["--epochs", "2", "--out", out, "--resume", "--no-progress"])
        checkpoint = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
        history = checkpoint["history"]
        saved_student = torch.load(os.path.join(out, "student.pth"), weights_only=True)
        assert checkpoint["epoch"] == 2 and saved_student["epoch"] == 2, calls[failing]
        assert all(torch.equal(saved_student["state_dict"][k], v) for k, v in checkpoint["student"].items())
        assert torch.load(os.path.join(out, "best.pth"), weights_only=True)["best_acc1"] == max(
            r["student_acc"] for r in history)
        assert summary["student_acc"] == history[-1]["student_acc"]
        with open(os.path.join(out, "summary.json")) as f:
            assert json.load(f)["epochs_completed"] == 2


@pytest.mark.parametrize("name,offset", [("images.u8", 64 * 64 + 5), ("labels.i64", 3)])
def test_resume_refuses_a_synthetic_memory_changed_since_the_checkpoint(teacher_cache, tmp_path, name, offset):
    """A same-size change of the memory's files (one byte of the second block, or of the first block's
    labels) is caught by the block checksums the checkpoint holds, instead of being trained on."""
    out = str(tmp_path / "run")
    train.main(["--epochs", "2", "--out", out] + SHORT_EPOCHS)  # two blocks of 64 images of 8x8
    path = os.path.join(out, "synthetic", name)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    block = "block 1 (images 64-127)" if name == "images.u8" else "block 0 (images 0-63)"
    with pytest.raises(SystemExit, match=f"cannot resume: .*{re.escape(block)} fails its checksum"):
        train.main(["--epochs", "3", "--out", out, "--resume", "--no-progress"])


def test_config_file_replays_a_run_and_flags_override_it(teacher_cache, tmp_path):
    """--config summary.json replays a run exactly (same epochs, same accuracies); a YAML or JSON file of
    flags works like the flags, and command-line flags win."""
    first = str(tmp_path / "first")
    train.main(["--epochs", "2", "--out", first, "--seed", "3", "--lambda-rca", "2"] + SHORT_EPOCHS)
    replay = str(tmp_path / "replay")
    train.main(["--config", os.path.join(first, "summary.json"), "--out", replay, "--no-progress"])
    assert [r["student_acc"] for r in _metrics(replay)] == [r["student_acc"] for r in _metrics(first)]
    with open(os.path.join(replay, "summary.json")) as f:
        assert json.load(f)["config"]["lambda_rca"] == 2.0
    flags = tmp_path / "flags.yaml"
    flags.write_text("method: nayer\nT: 2\nkd_T: 4\nquantiles: [0.5, 0.9]\n")
    config = train.make_config(train.parse_args(["--config", str(flags), "--T", "3"]))
    assert (config["method"], config["T"], config["kd_T"], config["quantiles"]) == ("nayer", 3, 4, [0.5, 0.9])
    assert config["g_loops"] == train.PRESETS["nayer-digits"]["g_loops"]  # the method's preset under the file


@pytest.mark.parametrize("content,message", [
    ('{"T": "4"}', "T must be an integer, got '4'"), ('{"kd_t": 4}', "unknown flags kd_t"),
    ('{"amp": 1}', "amp must be true or false"), ('{"quantiles": [0.5, "x"]}', "quantiles must be a list of numbers"),
    ("[1, 2]", "expected a mapping"), ("a: [1,\n", "neither JSON nor YAML"), (None, "cannot read it"),
])
def test_config_file_errors_are_one_line_naming_the_key(tmp_path, content, message):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit, match=re.escape(message)) as caught:
        train.parse_args(["--config", str(path)])
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("flags,env,message", [
    (["--stars-layers", "0", "5"], {}, "--stars-layers 0 5: distinct tap indices of the pair's 3 stages"),
    (["--stars-layers", "1", "1"], {}, "--stars-layers 1 1: distinct tap indices"),
    (["--stars-weights", "1", "2"], {}, "--stars-weights 1.0 2.0: one weight >= 0 for each of the 3 STARS layers"),
    (["--backend", "cuda"], {}, "--backend cuda: backend 'cuda' is not usable on cpu"),
    (["--synthesis-batch-size", "1"], {}, "--synthesis-batch-size must be >= 2 with STARS"),
    (["--seed", str(2 ** 70)], {}, "--seed must be in [0, 2^63 - 2^16)"),
    ([], {"STARS_FAST_BACKEND": "bogus"}, "STARS_FAST_BACKEND='bogus' names no backend"),
    ([], {"STARS_FAST_BACKEND": "cuda"}, "(from the environment variable STARS_FAST_BACKEND) is not usable on cpu"),
    ([], {"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not"),
])
def test_configuration_errors_come_before_any_work_as_one_line(tmp_path, monkeypatch, flags, env, message):
    """Found before the teacher is loaded or trained (the cache stays empty) and before a run folder exists."""
    monkeypatch.setenv("STARS_FAST_CACHE", str(tmp_path / "cache"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=re.escape(message)) as caught:
        train.main(["--device", "cpu", "--out", str(out), "--no-progress"] + flags)
    assert "\n" not in str(caught.value) and not out.exists() and not (tmp_path / "cache").exists()


def test_files_where_folders_belong_are_refused_up_front(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SystemExit, match="--export-synthetic .*: a file, not a folder"):
        train.main(["--out", str(tmp_path / "run"), "--export-synthetic", str(a_file), "--no-progress"])
    monkeypatch.setenv("STARS_FAST_CACHE", str(a_file))
    with pytest.raises(SystemExit, match="the teacher cache .* is a file, not a folder"):
        train.main(["--out", str(tmp_path / "run"), "--no-progress"])


def test_ctrl_c_and_a_full_disk_end_as_one_line(teacher_cache, tmp_path):
    """The command line turns an interrupt (exit 130) and a storage error into one line saying what is kept;
    STARS_FAST_DEBUG=1 gives the traceback."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               STARS_FAST_CACHE=teacher_cache)
    out = str(tmp_path / "run")
    # SIGINT at its default in the child: a shell's background job (CI under nohup ... &) ignores it, and a
    # Python started with SIGINT ignored never raises KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "stars_fast.train", "--epochs", "50", "--out", out] + SHORT_EPOCHS,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(out, "checkpoint.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted: the run folder keeps its last finished epoch")
    full = ("import errno, sys\nfrom stars_fast import atomic, train\n"
            "def full(src, dst):\n    raise OSError(errno.ENOSPC, 'No space left on device', dst)\n"
            "atomic.os.replace = full\ntrain.cli(sys.argv[1:])\n")
    for debug, expect in (("0", "No space left on device: "), ("1", "Traceback")):
        result = subprocess.run([sys.executable, "-c", full, "--epochs", "1", "--out", str(tmp_path / f"full{debug}")]
                                + SHORT_EPOCHS, env=dict(env, STARS_FAST_DEBUG=debug), capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 1 and expect in result.stderr
        if debug == "0":
            assert "Traceback" not in result.stderr and "continue with --resume" in result.stderr


def test_teacher_and_label_embedding_errors_keep_their_detail(teacher_cache, tmp_path):
    """A size mismatch names the tensor and both shapes (the whole message, on one line); a zip that is not
    a torch.save archive is refused as --label-embedding in one line."""
    import zipfile
    other = models.build_teacher("digits_cnn", 5, in_channels=1)  # 5 classes instead of digits' 10
    path = tmp_path / "five_classes.pth"
    torch.save({"state_dict": other.state_dict()}, path)
    with pytest.raises(SystemExit, match=r"size mismatch for linear\.weight.*torch\.Size\(\[5, ") as caught:
        train.main(["--teacher-ckpt", str(path), "--out", str(tmp_path / "run")] + SHORT_EPOCHS)
    assert "\n" not in str(caught.value)
    archive = tmp_path / "embedding.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("notes.txt", "not tensors")
    with pytest.raises(SystemExit, match="--label-embedding: .* is a zip archive but not a torch.save file"):
        train.main(["--method", "nayer", "--label-embedding", str(archive), "--out", str(tmp_path / "run2"),
                    "--epochs", "1"] + SHORT_EPOCHS)
