"""The user commands end to end on digits at tiny sizes: train_teacher -> train --teacher-ckpt (accepts it)
-> evaluate (top-1 / top-5 against a plain-PyTorch count) -> analyze (figures and the numbers behind them,
checked against formulas computed here); their --help without importing torch; one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from stars_fast import analyze, evaluate, models, train, train_teacher
from stars_fast.data import DATASETS, load_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = DATASETS["digits"]
TINY_TRAIN = ["--g-steps", "10", "--kd-steps", "50", "--ep-steps", "50", "--batch-size", "64",
              "--synthesis-batch-size", "64", "--no-progress", "--T", "2"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A digits teacher from train_teacher (2 epochs), and a 1-epoch run distilled from it."""
    root = tmp_path_factory.mktemp("commands")
    teacher_path = str(root / "teachers" / "digits_cnn.pth")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = train_teacher.main(["--teacher", "digits_cnn", "--dataset", "digits", "--epochs", "2",
                                   "--lr", "0.05", "--batch-size", "64", "--out", teacher_path, "--no-progress"])
        run_dir = str(root / "run")
        train.main(["--teacher", "digits_cnn", "--teacher-ckpt", teacher_path, "--epochs", "1", "--out", run_dir,
                    "--grad-shares", "5"] + TINY_TRAIN)
    finally:
        torch.set_num_threads(threads)
    return {"teacher": teacher_path, "best": best, "run": run_dir}


def _topk_by_hand(model, k):
    test = load_dataset("digits", "test")
    with torch.no_grad():
        logits = model(torch.stack([test[i][0] for i in range(len(test))]))
    ranked = logits.argsort(dim=1, descending=True)[:, :k]
    return (ranked == test.labels[:, None]).any(dim=1).double().mean().item()


def test_train_teacher_writes_a_fast_datafree_checkpoint_that_train_accepts(pipeline, capsys):
    checkpoint = torch.load(pipeline["teacher"], map_location="cpu", weights_only=True)
    assert {"state_dict", "arch", "best_acc1", "epoch", "num_classes", "in_channels"} <= set(checkpoint)
    assert checkpoint["arch"] == "digits_cnn" and checkpoint["T"] is None and checkpoint["dataset"] == "digits"
    assert checkpoint["best_acc1"] == pipeline["best"] and checkpoint["epoch"] in (1, 2)
    teacher = models.load_teacher("digits_cnn", pipeline["teacher"], 10, in_channels=1)
    assert _topk_by_hand(teacher, 1) == pytest.approx(pipeline["best"])  # the file holds the best epoch
    with open(os.path.join(pipeline["run"], "summary.json")) as f:
        summary = json.load(f)
    assert summary["config"]["teacher_ckpt"] == pipeline["teacher"]
    assert summary["teacher_acc"] == pytest.approx(pipeline["best"])  # train used exactly that teacher


def test_train_teacher_prints_one_line_per_epoch(tmp_path, capsys):
    out = str(tmp_path / "t.pth")
    train_teacher.main(["--teacher", "digits_cnn", "--dataset", "digits", "--epochs", "1", "--lr", "0.05",
                        "--out", out, "--no-progress"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("epoch 1/1  loss ") and "top-1 " in lines[0] and "best " in lines[0]
    assert lines[-1].startswith("best top-1 ") and lines[-1].endswith(out)


@pytest.mark.parametrize("file_kind", ["teacher", "student"])
def test_evaluate_prints_top1_and_top5(pipeline, file_kind, capsys):
    path = pipeline["teacher"] if file_kind == "teacher" else os.path.join(pipeline["run"], "student.pth")
    evaluate.main(["--ckpt", path, "--device", "cpu"])
    line = capsys.readouterr().out.strip()
    model, _ = models.load_student(path)
    top1, top5 = _topk_by_hand(model, 1), _topk_by_hand(model, 5)
    assert line.endswith(f"top-1 {100 * top1:.2f}%  top-5 {100 * top5:.2f}%"), line
    assert "on digits test, 450 images" in line


def test_evaluate_T_overrides_the_students_time_steps(pipeline, capsys):
    path = os.path.join(pipeline["run"], "student.pth")
    evaluate.main(["--ckpt", path, "--T", "3", "--dataset", "digits"])
    line = capsys.readouterr().out.strip()
    model, _ = models.load_student(path)
    model.T = 3
    assert "(T=3, lif)" in line and line.endswith(f"top-5 {100 * _topk_by_hand(model, 5):.2f}%")


def test_analyze_writes_figures_and_the_numbers_behind_them(pipeline):
    run = pipeline["run"]
    analysis = analyze.main([run, "--device", "cpu"])
    for name in ("curves.png", "gradients.png", "tsne.png", "firing_rates.png", "tail_masses.png"):
        with open(os.path.join(run, name), "rb") as f:
            assert f.read(8) == PNG_MAGIC, name
    with open(os.path.join(run, "analysis.json")) as f:
        assert json.load(f)["figures"] == analysis["figures"]
    with open(os.path.join(run, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert analysis["curves"]["student_acc"] == [r["student_acc"] for r in records]
    shares = analysis["gradient_shares"]  # each measured term's norm over their sum, per epoch
    assert set(shares) == {"bn", "oh", "adv", "rca", "tar"}
    total = sum(records[0][f"grad_{term}"] for term in shares)
    for term, values in shares.items():
        assert values == pytest.approx([records[0][f"grad_{term}"] / total])

    # the numbers, recomputed here: all 450 test images (fewer than --max-images), the run's teacher and student
    test = load_dataset("digits", "test")
    images = torch.stack([test[i][0] for i in range(len(test))])
    student, _ = models.load_student(os.path.join(run, "student.pth"))
    teacher = models.load_teacher("digits_cnn", pipeline["teacher"], 10, in_channels=1)
    spikes = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: spikes.setdefault(n, o))
             for n, m in student.named_modules() if isinstance(m, models.Spiking)]
    with torch.no_grad():
        logits, zs = student(images, return_taps=True)
        _, zt = teacher(images, return_taps=True)
    for hook in hooks:
        hook.remove()
    assert analysis["images"]["real"] == 450 and analysis["tsne"]["labels"] == test.labels.tolist()
    assert len(analysis["tsne"]["coords"]) == 450
    assert analysis["student_top1_on_subset"] == pytest.approx((logits.argmax(1) == test.labels).double().mean().item())
    rates = analysis["firing_rates"]["real"]
    assert set(rates) == set(spikes)
    for name, output in spikes.items():
        assert rates[name] == pytest.approx(output.double().mean().item(), rel=1e-9)
    quantiles, delta = analysis["tail_masses"]["quantiles"], analysis["tail_masses"]["delta"]
    assert quantiles == [0.6, 0.7, 0.8, 0.9, 0.95] and delta == 0.5
    for layer, (t, s) in enumerate(zip(zt, zs)):
        theta = torch.quantile(t.double().flatten(), torch.tensor(quantiles, dtype=torch.float64))
        p_t = torch.sigmoid((t.double().flatten()[:, None] - theta) / delta).mean(0)
        p_s = torch.sigmoid((s.double().flatten()[:, None] - theta) / delta).mean(0)
        real = analysis["tail_masses"]["real"][layer]
        torch.testing.assert_close(torch.tensor(real["teacher"], dtype=torch.float64), p_t, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.tensor(real["student"], dtype=torch.float64), p_s, rtol=1e-6, atol=1e-6)
        above = torch.tensor(real["teacher_above"])  # a quantile q leaves about 1 - q of the teacher above it
        assert (above - (1 - torch.tensor(quantiles))).abs().max() <= 2.0 / t.numel() + 1e-9
    assert analysis["images"]["synthetic"] > 0 and len(analysis["tail_masses"]["synthetic"]) == len(zt)


def test_tsne_is_skipped_for_identical_features():
    """All-zero penultimate features (a silent last layer) crash Barnes-Hut t-SNE: refused with a reason."""
    coords, reason = analyze.tsne_embedding(torch.zeros(40, 8))
    assert coords is None and "1 distinct" in reason
    coords, perplexity = analyze.tsne_embedding(torch.randn(40, 8))
    assert coords.shape == (40, 2) and perplexity == 13.0


def test_tail_masses_with_fixed_thresholds_and_normalization():
    zt, zs = torch.randn(50, 8) * 2 + 1, torch.randn(50, 8)
    got = analyze.tail_masses(zt, zs, quantiles=[0.9], thresholds=[0.0, 1.0], delta=0.25, normalize=True)
    mean, std = zt.double().mean(), zt.double().std(correction=0)
    zs_n = (zs.double() - mean) / std
    expected = [torch.sigmoid((zs_n - th) / 0.25).mean().item() for th in (0.0, 1.0)]
    assert got["theta"] == [0.0, 1.0] and got["student"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("module", ["evaluate", "train_teacher", "analyze"])
def test_help_documents_the_command_without_importing_torch(module):
    code = (f"import sys\nimport stars_fast.{module} as m\nm.build_parser().format_help()\n"
            f"print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr
    help_text = subprocess.run([sys.executable, "-m", f"stars_fast.{module}", "--help"], capture_output=True,
                               text=True, cwd=REPO, timeout=120)
    assert help_text.returncode == 0 and f"python -m stars_fast.{module}" in help_text.stdout


@pytest.mark.parametrize("argv, match", [
    (["--ckpt", "/nonexistent/x.pth"], "no such file"),
    (["--ckpt", "GARBAGE"], r"garbage\.pth is not a"),
])
def test_evaluate_bad_files_are_one_line_errors(tmp_path, argv, match):
    if argv[1] == "GARBAGE":
        argv = ["--ckpt", str(tmp_path / "garbage.pth")]
        (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=match) as caught:
        evaluate.main(argv)
    assert "\n" not in str(caught.value)


def test_evaluate_T_on_a_teacher_is_refused(pipeline):
    with pytest.raises(SystemExit, match="--T applies to spiking students"):
        evaluate.main(["--ckpt", pipeline["teacher"], "--T", "4"])


def test_evaluate_dataset_mismatch_is_refused(pipeline):
    with pytest.raises(SystemExit, match="10 classes and 1 input channels; cifar10 has 10 and 3"):
        evaluate.main(["--ckpt", pipeline["teacher"], "--dataset", "cifar10"])


@pytest.mark.parametrize("extra, match", [
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--epochs", "1", "--lr", "nan"], "--lr must be a finite number"),
    (["--epochs", "1", "--out", "DIR"], "is a folder"),
    (["--epochs", "1", "--dataset", "cifar10", "--data-root", "/nonexistent"], "cifar-10-batches-py"),
])
def test_train_teacher_bad_arguments_are_one_line_errors(tmp_path, extra, match):
    argv = ["--teacher", "digits_cnn", "--dataset", "digits", "--out", str(tmp_path / "t.pth")] + extra
    argv = [str(tmp_path) if a == "DIR" else a for a in argv]
    with pytest.raises(SystemExit, match=match):
        train_teacher.main(argv)
    assert not (tmp_path / "t.pth").exists()


def test_analyze_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(SystemExit, match="not a run folder"):
        analyze.main([str(tmp_path)])


@pytest.mark.parametrize("dataset", ["cifar10", "tiny-imagenet"])
def test_train_with_a_malformed_dataset_is_a_one_line_error(tmp_path, dataset):
    """A garbage CIFAR batch / an unknown Tiny-ImageNet wnid: SystemExit with the file and the reason, no run folder."""
    data = tmp_path / "data"
    if dataset == "cifar10":
        (data / "cifar-10-batches-py").mkdir(parents=True)
        (data / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")
        match, teacher, student = "test_batch is not a python-pickle CIFAR batch", "resnet20", "s_resnet20"
    else:
        (data / "tiny-imagenet-200" / "val").mkdir(parents=True)
        (data / "tiny-imagenet-200" / "wnids.txt").write_text("".join(f"n{i:02d}\n" for i in range(200)))
        (data / "tiny-imagenet-200" / "val" / "val_annotations.txt").write_text("v.JPEG\tn777\t0\t0\t1\t1\n")
        match, teacher, student = "unknown wnid 'n777'", "resnet18", "s_resnet18"
    ckpt = tmp_path / "teacher.pth"
    ckpt.write_bytes(b"never read: the test split is loaded first")
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=match) as caught:
        train.main(["--dataset", dataset, "--data-root", str(data), "--teacher", teacher, "--student", student,
                    "--teacher-ckpt", str(ckpt), "--out", str(out), "--no-progress"])
    assert "\n" not in str(caught.value) and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("command", [evaluate, train_teacher, analyze])
def test_device_cuda_without_a_gpu_is_a_one_line_error(pipeline, command):
    argv = {evaluate: ["--ckpt", pipeline["teacher"]],
            train_teacher: ["--teacher", "digits_cnn", "--dataset", "digits", "--epochs", "1", "--out",
                            os.path.join(pipeline["run"], "unused.pth")],
            analyze: [pipeline["run"]]}[command]
    with pytest.raises(SystemExit, match="no CUDA GPU is visible"):
        command.main(argv + ["--device", "cuda"])


def test_analyze_refuses_another_datasets_shapes(pipeline):
    with pytest.raises(SystemExit, match="cifar100 has 100 and 3"):
        analyze.main([pipeline["run"], "--dataset", "cifar100"])


def test_analyze_says_what_it_could_not_draw(pipeline, tmp_path, capsys):
    """An unreadable synthetic memory: the real-image figures are still drawn, and the missing synthetic
    half is said on the console and in analysis.json instead of being dropped silently."""
    import shutil
    run = str(tmp_path / "run")
    shutil.copytree(pipeline["run"], run)
    with open(os.path.join(run, "synthetic", "meta.json"), "w") as f:
        f.write("{not json")
    analysis = analyze.main([run, "--device", "cpu"])
    assert "the synthetic memory is unreadable" in analysis["skipped"]["synthetic"]
    assert "no synthetic images in firing_rates.png" in capsys.readouterr().out
    assert set(analysis["firing_rates"]) == {"real"}


def test_analyze_refuses_a_teacher_file_in_the_students_place(pipeline, tmp_path):
    import shutil
    run = str(tmp_path / "run")
    shutil.copytree(pipeline["run"], run)
    teacher = models.build_teacher("digits_cnn", 10, in_channels=1)
    models.save_student(os.path.join(run, "student.pth"), teacher, arch="digits_cnn", num_classes=10, in_channels=1,
                        T=None, neuron=None, acc=None, epoch=None)
    with pytest.raises(SystemExit, match="is a 'digits_cnn' teacher file, not a spiking student"):
        analyze.main([run, "--device", "cpu"])
