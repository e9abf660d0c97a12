"""One DeepInversion synthesis step for ResNet-34 -> S-ResNet-18 (T=4), 32x32: teacher and student
forward, BN-statistics + one-hot + adversarial (+ STARS) losses, backward to the images. Every
"auto" op (neurons, pooling, STARS) on the fused backend vs on the reference backend, STARS on vs
off, and the step with a neuron that costs nothing (the ceiling of what faster neurons can give).
CPU: B=32; GPU: B=256.

The reference backend is the package's plain-PyTorch path: its neuron is the plain loop, but its
STARS loss is the pair-by-pair test oracle, so "STARS on, reference" is no user's baseline (the
user baselines of the loss are in bench_stars.py); the ratios here say what the fused kernels
change in the whole step, and the extra cost of STARS (on - off) per backend.
"""
import contextlib

import pytest
import torch

import stars_fast
from stars_fast import models, neurons
from stars_fast._backend import ENV_OVERRIDE
from stars_fast.data import DATASETS
from stars_fast.synthesis import DeepInversionSynthesizer, StarsRegularizer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BATCH = {"cpu": 32, "cuda": 256}
SMOKE_BATCH, SMOKE_SIZE = 2, 8  # the untimed smoke run: does it run, not how fast


@contextlib.contextmanager
def synthesis_step(device: str, batch: int, stars: bool, size: int = 32):
    """Yields step() -> None: one synthesis step on fresh ResNet-34 / S-ResNet-18 (T=4) nets, on
    `batch` images of size x size (CIFAR-10's 32 in the benchmarks; smaller for dry runs); the
    round's set-up (BN hooks, student folding) happens once, on entry. Ops dispatch by "auto"."""
    torch.manual_seed(0)
    info = DATASETS["cifar10"]
    teacher = models.freeze(models.build_teacher("resnet34", info.num_classes)).to(device)
    student = models.build_student("s_resnet18", info.num_classes, T=4).to(device)
    synthesizer = DeepInversionSynthesizer(
        teacher, student, info, batch_size=batch, iterations=1, lr_g=0.1, bn=10.0, oh=1.0, adv=1.0,
        stars=StarsRegularizer() if stars else None, device=device)
    images = torch.randn(batch, 3, size, size, device=device, requires_grad=True)
    targets = torch.randint(0, info.num_classes, (batch,), device=device)
    optimizer = torch.optim.Adam([images], lr=0.1, betas=(0.5, 0.99))
    with synthesizer.objective.round() as objective:
        yield lambda: synthesizer.step(images, targets, optimizer, objective)


def _require_backend(backend, device):
    reason = stars_fast.available_backends(device)[backend]
    if reason:
        pytest.skip(f"backend {backend!r} unusable on {device}: {reason}")


def _fused_backend(device):
    return "cpu" if device == "cpu" else "triton"


def _benchmark(measure, smoke, device, stars, variant, role):
    sync = torch.cuda.synchronize if device == "cuda" else None
    batch, size = (SMOKE_BATCH, SMOKE_SIZE) if smoke else (BATCH[device], 32)
    group = (f"synthesis step resnet34->s_resnet18 {device} B={batch} T=4 {size}x{size} "
             f"{'stars-on' if stars else 'stars-off'}")
    with synthesis_step(device, batch, stars, size) as step:
        measure(step, group=group, variant=variant, role=role, rounds=3 if device == "cpu" else 10,
                warmup=1 if device == "cpu" else 3, sync=sync)


@pytest.mark.parametrize("stars", ["stars-on", "stars-off"])
@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("device", DEVICES)
def test_synthesis_step(measure, smoke, monkeypatch, device, backend, stars):
    chosen = _fused_backend(device) if backend == "fused" else "reference"
    _require_backend(chosen, device)
    monkeypatch.setenv(ENV_OVERRIDE, chosen)  # every "auto" op runs on `chosen`
    if backend == "fused":
        variant, role = f"fused ({chosen})", "ours"
    else:  # "vs eager" in the summary: the plain loop neurons, and for STARS on the pair-by-pair oracle
        variant, role = "reference" + (" (pair-by-pair STARS oracle)" if stars == "stars-on" else ""), "eager"
    _benchmark(measure, smoke, device, stars == "stars-on", variant, role)


@pytest.mark.parametrize("device", DEVICES)
def test_synthesis_step_free_neuron_ceiling(measure, smoke, monkeypatch, device):
    """The ceiling of any neuron kernel: the step with every neuron replaced by the identity (no work
    at all), STARS off; reference / this = the best speedup a faster neuron could give."""
    chosen = _fused_backend(device)
    _require_backend(chosen, device)
    monkeypatch.setenv(ENV_OVERRIDE, chosen)
    monkeypatch.setattr(neurons, "multistep_neuron", lambda x, *args, **kwargs: (x, x[-1]))  # v: a view, free
    _benchmark(measure, smoke, device, False, f"identity neuron, fused ({chosen}) rest: ceiling", "ceiling")
