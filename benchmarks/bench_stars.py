"""Fused STARS loss (forward + backward) vs the eager reference vs torch.compile of the reference,
4 layers C = (64, 128, 256, 512), B in {64, 256}; and the pooling op vs x.mean(...)."""
import functools

import pytest
import torch

import stars_fast
from stars_fast import reference

CHANNELS = (64, 128, 256, 512)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(reference.stars_loss)


def _loss_variants(device):
    usable = stars_fast.available_backends(device)
    fused = ["triton", "cuda"] if device == "cuda" else ["cpu"]
    variants = {f"fused-{b}": functools.partial(stars_fast.stars_loss, backend=b) for b in fused if not usable[b]}
    variants["reference-eager"] = lambda zt, zs: reference.stars_loss(zt, zs)[0]
    variants["reference-compile"] = lambda zt, zs: _compiled_reference()(zt, zs)[0]
    return variants


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [64, 256])
@pytest.mark.parametrize("variant", ["fused-triton", "fused-cuda", "fused-cpu", "reference-eager",
                                     "reference-compile"])
def test_stars_loss(benchmark, device, batch, variant):
    fn = _loss_variants(device).get(variant)
    if fn is None:
        pytest.skip(f"{variant} is not available on {device}")
    benchmark.group = f"stars_loss {device} fwd+bwd B={batch} C={CHANNELS}"
    zt = [torch.randn(batch, c, device=device).requires_grad_(True) for c in CHANNELS]
    zs = [torch.randn(batch, c, device=device).requires_grad_(True) for c in CHANNELS]

    def run():
        fn(zt, zs).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    run()
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["fused", "reference-mean"])
def test_pool_student_features(benchmark, device, variant):
    """Student pre-LIF feature [T=4, B=64, C=128, 16, 16] -> [B, C], forward + backward."""
    backend = "auto"
    if variant == "fused" and stars_fast.available_backends(device)["cpu" if device == "cpu" else "cuda"]:
        pytest.skip("no fused backend built")
    benchmark.group = f"pool_features {device} fwd+bwd [4, 64, 128, 16, 16]"
    f = torch.randn(4, 64, 128, 16, 16, device=device, requires_grad=True)
    pool = functools.partial(stars_fast.pool_features, backend=backend) if variant == "fused" \
        else (lambda x: x.mean(dim=(0, 3, 4)))

    def run():
        f.grad = None
        pool(f).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    run()
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
