"""Multi-process training: two CPU processes with gloo, launched by torchrun, end to end on digits;
one run folder written by rank 0, per-rank state carried through a resume; and the synthesis
objective of 2 processes equal to that of 1 process holding the whole batch."""
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
    assert sorted(os.listdir(out)) == [".stars_fast.lock", ".stars_fast_run",  # rank 0's lock and the marker
                                       "best.pth", "checkpoint.pt", "log.txt", "metrics.jsonl", "real_reference.png",
                                       "student.pth", "summary.json", "synthetic"] + [
        f"synthetic_epoch00{epoch}.png" for epoch in (1, 2, 3, 4)]

    with pytest.raises(SystemExit, match="2 processes"):  # the per-rank state needs the same number of processes
        train.main(["--epochs", "5", "--out", out, "--resume", "--no-progress"])


OBJECTIVE_SCRIPT = r"""
import os, sys
import torch
import torch.distributed as dist
from stars_fast import models
from stars_fast.synthesis import InversionObjective, StarsRegularizer
from stars_fast.synthesis.deepinversion import l2_norm, total_variation

world = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
if world > 1:
    dist.init_process_group("gloo")
torch.manual_seed(0)
teacher = models.freeze(models.build_teacher("digits_cnn", 10, in_channels=1))
student = models.build_student("digits_snn", 10, T=2, in_channels=1, backend="reference")
for model in (teacher, student):  # running statistics away from 0 / 1, so every BN term matters
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
images_all, targets_all = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
share = 8 // world
images = images_all[rank * share:(rank + 1) * share].clone().requires_grad_()
targets = targets_all[rank * share:(rank + 1) * share]
stars = StarsRegularizer(backend=sys.argv[2])
objective = InversionObjective(teacher, student, bn=10, oh=1, adv=1, stars=stars, adversarial="jsdiv",
                               student_bn=0.001, bn_momentum=0.9)
results = {}
with objective.round() as loss:
    for step in range(2):  # the second batch (other images) has the momentum target of the first
        batch = images * (1.0 + step)
        out = loss(batch, targets)
        total = out.loss + 1e-2 * total_variation(batch) + 1e-3 * l2_norm(batch)
        grad, = torch.autograd.grad(total, images)
        results[f"loss{step}"], results[f"grad{step}"] = total.detach(), grad
        results[f"terms{step}"] = out.terms
        objective.end_batch()
torch.save(results, os.path.join(sys.argv[1], f"rank{rank}.pt"))
if world > 1:
    dist.destroy_process_group()
"""


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_two_processes_optimize_the_one_process_objective(tmp_path, backend):
    """BN moments, the batch means, RCA's Gram and TAR's quantiles over the whole batch: the loss and the
    image gradients of 2 gloo processes (4 images each) equal those of 1 process holding all 8."""
    script = tmp_path / "objective.py"
    script.write_text(OBJECTIVE_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    single = subprocess.run([sys.executable, str(script), str(one), backend], env=env, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-4000:]
    pair = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(_free_port()), str(script), str(two), backend],
                          env=env, capture_output=True, text=True, timeout=300)
    assert pair.returncode == 0, pair.stdout[-4000:] + pair.stderr[-4000:]
    full = torch.load(one / "rank0.pt", weights_only=True)
    ranks = [torch.load(two / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for step in (0, 1):
        for rank in ranks:  # every process holds the whole batch's loss, term by term
            torch.testing.assert_close(rank[f"loss{step}"], full[f"loss{step}"], rtol=1e-5, atol=1e-5)
            for name, value in full[f"terms{step}"].items():
                torch.testing.assert_close(rank[f"terms{step}"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        grad = torch.cat([rank[f"grad{step}"] for rank in ranks])
        scale = full[f"grad{step}"].abs().max()
        torch.testing.assert_close(grad / scale, full[f"grad{step}"] / scale, rtol=0, atol=1e-5)
    assert full["terms0"]["loss_rca"] > 0 and full["terms0"]["loss_tar"] > 0 and full["terms0"]["loss_adv"] != 0
    assert full["loss1"] != full["loss0"]  # the momentum target changed the BN term


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _rank_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return int(env.get(b"RANK", b"-1"))


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
def test_a_stalled_process_ends_the_job_with_a_message(teacher_cache, tmp_path):
    """SIGSTOP one of 2 gloo processes mid-run: the other stops after --dist-timeout with one line
    naming itself and the wait, and torchrun ends the job (instead of gloo's 30-minute wait)."""
    import signal
    import time
    out = str(tmp_path / "run")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "stars_fast.train", "--epochs", "200", "--out", out,
               "--dist-timeout", "10", *TINY]
    env = dict(os.environ, STARS_FAST_CACHE=teacher_cache, OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = None
    try:
        deadline = time.time() + 240
        while not os.path.isfile(os.path.join(out, "metrics.jsonl")) or os.path.getsize(os.path.join(out, "metrics.jsonl")) == 0:
            assert time.time() < deadline and proc.poll() is None, "the run did not reach its first epoch"
            time.sleep(0.5)
        stopped = next(pid for pid in _children(proc.pid) if _rank_of(pid) == 1)
        os.kill(stopped, signal.SIGSTOP)
        started = time.time()
        stdout, stderr = proc.communicate(timeout=180)
        waited = time.time() - started
    finally:
        if stopped is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(stopped, sig)
                except ProcessLookupError:
                    pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "process 0 of 2: waited more than 10 s (--dist-timeout)" in stdout + stderr, (stdout + stderr)[-3000:]
    assert waited < 120
