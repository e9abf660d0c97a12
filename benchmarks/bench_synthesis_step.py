"""One DeepInversion synthesis step for ResNet-34 -> S-ResNet-18 (T=4) at B=32, 32x32, on the CPU:
teacher and student forward, BN-statistics + one-hot + adversarial (+ STARS) losses, backward to
the images. Fused CPU backend vs the reference backend, STARS on vs off, and the step with a
neuron that costs next to nothing (the ceiling of what faster neuron kernels can give).

Targets (issue 5): the step >= 1.5x faster fused than reference; the extra cost of STARS
(on - off) on the fused backend at most half of what it is on the reference backend."""
import pytest
import torch

import stars_fast
from stars_fast import models, neurons
from stars_fast._backend import ENV_OVERRIDE
from stars_fast.data import DATASETS
from stars_fast.synthesis import DeepInversionSynthesizer, StarsRegularizer

BATCH = 32


def _require_backend(backend):
    reason = stars_fast.available_backends("cpu")[backend]
    if reason:
        pytest.skip(f"backend {backend!r} unusable: {reason}")


def _benchmark_step(benchmark, stars):
    torch.manual_seed(0)
    info = DATASETS["cifar10"]
    teacher = models.freeze(models.build_teacher("resnet34", info.num_classes))
    student = models.build_student("s_resnet18", info.num_classes, T=4)
    synthesizer = DeepInversionSynthesizer(
        teacher, student, info, batch_size=BATCH, iterations=1, lr_g=0.1, bn=10.0, oh=1.0, adv=1.0,
        stars=StarsRegularizer() if stars == "stars-on" else None)
    images = torch.randn(BATCH, 3, 32, 32, requires_grad=True)
    targets = torch.randint(0, info.num_classes, (BATCH,))
    optimizer = torch.optim.Adam([images], lr=0.1, betas=(0.5, 0.99))
    benchmark.group = f"synthesis step resnet34->s_resnet18 B={BATCH} 32x32 cpu {stars}"
    with synthesizer.objective.round() as objective:  # BN hooks, student folded: once per round, untimed
        benchmark.pedantic(synthesizer.step, args=(images, targets, optimizer, objective),
                           rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("stars", ["stars-on", "stars-off"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_synthesis_step(benchmark, monkeypatch, cpu_threads, backend, stars):
    _require_backend(backend)
    monkeypatch.setenv(ENV_OVERRIDE, backend)  # every "auto" op (neurons, pooling, STARS) runs on `backend`
    benchmark.extra_info["threads"] = cpu_threads
    _benchmark_step(benchmark, stars)


def test_synthesis_step_free_neuron_ceiling(benchmark, monkeypatch, cpu_threads):
    """The ceiling of any neuron kernel: the step with every neuron replaced by the identity (no work
    at all), STARS off; reference / this = the best speedup a faster neuron could give."""
    _require_backend("cpu")
    monkeypatch.setenv(ENV_OVERRIDE, "cpu")
    monkeypatch.setattr(neurons, "multistep_neuron", lambda x, *args, **kwargs: (x, None))
    benchmark.extra_info["threads"] = cpu_threads
    _benchmark_step(benchmark, "stars-off")
