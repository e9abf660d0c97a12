"""Multi-process training: two CPU processes with gloo, launched by torchrun, end to end on digits;
one run folder written by rank 0, per-rank state carried through a resume."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from stars_fast import train
from stars_fast.distributed import Context
from stars_fast.synthesis.memory import open_synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device", "cpu", "--method", "nayer", "--g-steps", "20", "--kd-steps", "40", "--ep-steps", "40",
        "--batch-size", "64", "--synthesis-batch-size", "64", "--lr-g", "0.02", "--le-emb-size", "256", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, cache):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "stars_fast.train", *args]
    env = dict(os.environ, STARS_FAST_CACHE=cache, OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def test_one_process_context_is_a_no_op():
    ctx = Context()
    x = torch.arange(6.0).view(3, 2)
    assert ctx.is_main and not ctx.distributed
    assert ctx.gather(x) is x and ctx.sum(2.5) == 2.5 and ctx.broadcast("a") == "a"
    [state] = ctx.gather_to_main({"rng": [x], "step": (3, None)})
    assert torch.equal(state["rng"][0], x) and state["step"] == (3, None)
    assert ctx.share(64, "--batch-size") == 64
    with pytest.raises(SystemExit, match="multiple of the number of processes"):
        Context(rank=1, world_size=3).share(64, "--batch-size")


def test_two_gloo_processes_train_into_one_run_folder_and_resume(teacher_cache, tmp_path):
    out = str(tmp_path / "run")
    stdout = _torchrun(["--epochs", "2", "--out", out, *TINY], teacher_cache)
    assert stdout.count("student accuracy") == 1  # rank 0 reports, rank 1 stays quiet

    checkpoint = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert len(checkpoint["rng"]) == 2 and len(checkpoint["synthesizer"]) == 2  # one state per rank
    generators = [state["generator"] for state in checkpoint["synthesizer"]]
    noisy_layers = {key.split(".")[1] for key in generators[0] if key.startswith("noisy_layers.")}
    assert len(noisy_layers) == 4  # each rank makes 32 images a batch: ceil(32 / 10 classes) noisy layers
    assert not torch.equal(generators[0]["body.l1.weight"], generators[1]["body.l1.weight"])  # each rank its own
    images = open_synthetic(out)[0]
    assert checkpoint["memory"]["count"] == images.shape[0] == 2 * 64  # the pixels live in <out>/synthetic
    assert not torch.equal(images[:32], images[32:64])  # both ranks' shares

    _torchrun(["--epochs", "4", "--out", out, "--resume", "--no-progress"], teacher_cache)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[2]["lr"] == pytest.approx(records[1]["lr"], rel=1e-3)  # the cosine stretched over 4 epochs
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["epochs_completed"] == 4 and summary["processes"] == 2
    assert summary["best_student_acc"] > 0.2, summary  # it learns (chance is 0.1); test_methods checks how well
    assert sorted(os.listdir(out)) == ["best.pth", "checkpoint.pt", "log.txt", "metrics.jsonl", "real_reference.png",
                                       "student.pth", "summary.json", "synthetic"] + [
        f"synthetic_epoch00{epoch}.png" for epoch in (1, 2, 3, 4)]

    with pytest.raises(SystemExit, match="2 processes"):  # the per-rank state needs the same number of processes
        train.main(["--epochs", "5", "--out", out, "--resume", "--no-progress"])
