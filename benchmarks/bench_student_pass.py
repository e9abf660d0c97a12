"""The synthesis-step student pass on the CPU: S-ResNet-18, B=32, 32x32, T=4, forward with the STARS
taps + backward to the input, weights frozen, BN in eval mode; the neurons on the fused "cpu"
backend vs the "reference" (plain PyTorch) backend. Target: fused >= 1.6x faster.

Two groups, each timing both backends on the same model:
- "folded-cl": the synthesis path of this package, BN folded into the convs (models.fold_bn) and
  channels-last activations;
- "plain": the eager student as built (freeze(): eval-mode BN layers, contiguous NCHW).
The end-to-end gain of the package is reference-plain / fused-cpu-folded-cl."""
import pytest
import torch

import stars_fast
from stars_fast.models import build_student, fold_bn, freeze

BATCH, T, SIZE = 32, 4, 32


def _frozen_student(backend, path):
    torch.manual_seed(0)
    student = build_student("s_resnet18", num_classes=10, T=T, backend=backend)
    if path == "plain":
        return freeze(student)
    return fold_bn(student).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("path", ["folded-cl", "plain"])
@pytest.mark.parametrize("variant", ["fused-cpu", "reference"])
def test_student_synthesis_pass(measure, smoke, variant, path):
    backend = "cpu" if variant == "fused-cpu" else "reference"
    reason = stars_fast.available_backends("cpu")[backend]
    if reason:
        pytest.skip(f"backend {backend!r} unusable: {reason}")
    model = _frozen_student(backend, path)
    batch, size = (2, 8) if smoke else (BATCH, SIZE)  # the untimed smoke run: tiny
    images = torch.randn(batch, 3, size, size)

    def run():
        x = images.detach().requires_grad_(True)
        logits, taps = model(x, return_taps=True)
        (logits.logsumexp(1).sum() + sum(t.square().sum() for t in taps)).backward()

    measure(run, group=f"student pass s_resnet18 cpu B={batch} T={T} {size}px fwd+taps+bwd-to-input, {path}",
            variant=variant, role="ours" if variant == "fused-cpu" else "eager", rounds=3, warmup=1)
