"""Fused STARS loss (stars_fast.stars_loss, forward + backward) vs what a user would run: the
vectorized Gram-form implementation eager and under torch.compile; 4 layers C = (64, 128, 256,
512), B in {64, 256}. `gemm-floor` times the GEMMs alone (u u^T per side, E u per side, per layer):
the summary reports every variant as a multiple of it. Each baseline is checked against our op
(loss and both gradients) on one call first. Also the pooling op vs x.mean(...)."""
import functools
import time

import pytest
import torch

import stars_fast
from user_baselines import stars_gemm_floor, stars_gemm_operands, stars_loss_gram

CHANNELS = (64, 128, 256, 512)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
VARIANTS = ["fused-cpu", "fused-triton", "fused-cuda", "gram-eager", "gram-compiled", "gemm-floor"]


@functools.lru_cache(maxsize=None)
def _compiled_gram():
    return torch.compile(stars_loss_gram, dynamic=False)


def _loss(variant, device):
    """(z_teacher, z_student) -> total loss for the variant, and its role; skips what cannot run."""
    if variant.startswith("fused-"):
        backend = variant.removeprefix("fused-")
        reason = stars_fast.available_backends(device).get(backend, f"not a backend for {device}")
        if reason:
            pytest.skip(f"{variant} cannot run on {device}: {reason}")
        return functools.partial(stars_fast.stars_loss, backend=backend), "ours"
    if variant == "gram-eager":
        return stars_loss_gram, "eager"
    return _compiled_gram(), "compiled"


def _loss_and_grads(fn, zt, zs):
    zt = [z.detach().requires_grad_(True) for z in zt]
    zs = [z.detach().requires_grad_(True) for z in zs]
    total = fn(zt, zs)
    total.backward()
    return total.detach(), [z.grad for z in zt + zs]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", [64, 256])
@pytest.mark.parametrize("device", DEVICES)
def test_stars_loss(measure, smoke, device, batch, variant):
    batch = 16 if smoke else batch
    sync = torch.cuda.synchronize if device == "cuda" else None
    group = f"stars_loss {device} fwd+bwd B={batch} C={CHANNELS}"
    generator = torch.Generator(device).manual_seed(0)
    zt = [torch.randn(batch, c, device=device, generator=generator) for c in CHANNELS]
    zs = [torch.randn(batch, c, device=device, generator=generator) for c in CHANNELS]
    rounds = 41
    if variant == "gemm-floor":
        operands = stars_gemm_operands(zt, zs)
        measure(lambda: stars_gemm_floor(operands), group=group, variant="gemm-floor (GEMMs alone)",
                role="gemm-floor", rounds=rounds, sync=sync)
        return
    fn, role = _loss(variant, device)
    first_call_s = _check_against_ours(fn, variant, zt, zs)
    measure(_timed_step(fn, zt, zs), group=group, variant=variant, role=role, rounds=rounds, sync=sync,
            first_call_s=first_call_s if role == "compiled" else None)


def _check_against_ours(fn, variant, zt, zs) -> float:
    """Asserts fn's loss and gradients equal stars_fast.stars_loss's; returns the time of fn's first call."""
    ours_total, ours_grads = _loss_and_grads(stars_fast.stars_loss, zt, zs)
    start = time.perf_counter()
    total, grads = _loss_and_grads(fn, zt, zs)
    first_call_s = time.perf_counter() - start
    torch.testing.assert_close(total, ours_total, rtol=1e-4, atol=1e-7,
                               msg=lambda m: f"{variant}: loss differs from stars_fast.stars_loss: {m}")
    for i, (g, ours) in enumerate(zip(grads, ours_grads)):
        torch.testing.assert_close(g, ours, rtol=1e-3, atol=1e-7,
                                   msg=lambda m: f"{variant}: gradient {i} differs from stars_fast.stars_loss: {m}")
    return first_call_s


def _timed_step(fn, zt, zs):
    """One forward + backward of fn on leaves of its own (their grads reset each call)."""
    leaves = [z.detach().requires_grad_(True) for z in zt + zs]

    def run():
        for z in leaves:
            z.grad = None
        fn(leaves[:len(zt)], leaves[len(zt):]).backward()

    return run


def test_stars_loss_interleaved(interleave, smoke):
    """The headline CPU case (B = 256) with our op, both baselines and the GEMM floor timed in turn."""
    batch = 16 if smoke else 256
    generator = torch.Generator().manual_seed(0)
    zt = [torch.randn(batch, c, generator=generator) for c in CHANNELS]
    zs = [torch.randn(batch, c, generator=generator) for c in CHANNELS]
    variants = {}
    for variant in ["fused-cpu", "gram-eager"] + ([] if smoke else ["gram-compiled"]):
        fn, role = _loss(variant, "cpu")
        _check_against_ours(fn, variant, zt, zs)
        variants[variant] = (_timed_step(fn, zt, zs), role)
    operands = stars_gemm_operands(zt, zs)
    variants["gemm-floor (GEMMs alone)"] = (lambda: stars_gemm_floor(operands), "gemm-floor")
    interleave(variants, group=f"stars_loss cpu fwd+bwd B={batch} C={CHANNELS}", rounds=41)


@pytest.mark.parametrize("variant", ["fused", "mean"])
@pytest.mark.parametrize("device", DEVICES)
def test_pool_student_features(measure, device, variant):
    """Student pre-LIF feature [T=4, B=64, C=128, 16, 16] -> [B, C], forward + backward."""
    if variant == "fused":
        backend = "cpu" if device == "cpu" else "cuda"
        reason = stars_fast.available_backends(device)[backend]
        if reason:
            pytest.skip(f"no fused pooling on {device}: {reason}")
        pool, role = functools.partial(stars_fast.pool_features, backend=backend), "ours"
    else:
        pool, role = (lambda x: x.mean(dim=(0, 3, 4))), "eager"
    f = torch.randn(4, 64, 128, 16, 16, device=device, requires_grad=True)
    torch.testing.assert_close(pool(f), f.detach().mean(dim=(0, 3, 4)), rtol=1e-5, atol=1e-6)

    def run():
        f.grad = None
        pool(f).sum().backward()

    measure(run, group=f"pool_features {device} fwd+bwd [4, 64, 128, 16, 16]", variant=f"pool-{variant}",
            role=role, rounds=20, bytes_moved=f.numel() * f.element_size(),
            sync=torch.cuda.synchronize if device == "cuda" else None)
