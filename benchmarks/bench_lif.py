"""Fused multi-step LIF (stars_fast.multistep_lif, tau=2, through autograd) vs what a user would run:
the plain loop eager and under torch.compile, and SpikingJelly 2.0's LIFNode(step_mode='m').

Modes: fwd (no grad), bwd (the backward of a kept graph), fwd+bwd. Every figure also reports
achieved GB/s over the minimal bytes (fwd: read x, write spikes; bwd: read x and grad_spikes,
write grad_x; fwd+bwd: the sum) and the % of the copy bandwidth measured in the same group
(`copy`: dst.copy_(x) of the same [T, N]). CPU: fp32, T in {4, 8}, N in {2^21, 2^23}. GPU:
fp32 and bf16, T in {4, 32}, N = 2^23. Each baseline is checked against our op on one call first.
test_plif: ParametricLIFNode fwd+bwd with one k, with one k per channel (per_channel=True), and each with a
learnable threshold (one, or one per channel) at the same [T, B, C, H, W] shape: the cost of per-channel
time constants and of learning the threshold.
"""
import functools
import time

import pytest
import torch

import stars_fast
from user_baselines import lif_loop, spikingjelly_implementation, spikingjelly_lif

TAU = 2.0
SMOKE_N = 2 ** 12  # the untimed smoke run's neuron count
MAX_COMPILED_T = 4  # Inductor unrolls the loop: cold compile ~1 min at T=4, ~12 min at T=8 (2 busy cores)
CASES = [("cpu", 4, 2 ** 21, torch.float32), ("cpu", 8, 2 ** 21, torch.float32),
         ("cpu", 4, 2 ** 23, torch.float32), ("cpu", 8, 2 ** 23, torch.float32)]
if torch.cuda.is_available():
    CASES += [("cuda", t, 2 ** 23, dtype) for dtype in (torch.float32, torch.bfloat16) for t in (4, 32)]
VARIANTS = ["fused-cpu", "fused-triton", "fused-cuda", "loop-eager", "loop-compiled", "spikingjelly", "copy"]
MODES = ["fwd", "bwd", "fwd+bwd"]
BYTES_PER_ELEMENT = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}  # tensors of [T, N] read or written, minimally


def _case_id(case):
    device, steps, n, dtype = case
    return f"{device}-T{steps}-N2^{n.bit_length() - 1}-{str(dtype).removeprefix('torch.')}"


@functools.lru_cache(maxsize=None)
def _compiled_loop():
    return torch.compile(lif_loop, dynamic=False)


def _neuron(variant, device, steps):
    """x -> spikes for the variant, and its role in the summary; skips (with the reason) what cannot run."""
    if variant.startswith("fused-"):
        backend = variant.removeprefix("fused-")
        reason = stars_fast.available_backends(device).get(backend, f"not a backend for {device}")
        if reason:
            pytest.skip(f"{variant} cannot run on {device}: {reason}")
        return functools.partial(stars_fast.multistep_lif, tau=TAU, backend=backend), "ours"
    if variant == "loop-eager":
        return lif_loop, "eager"
    if variant == "loop-compiled":
        if steps > MAX_COMPILED_T:
            pytest.skip(f"torch.compile of the loop: Inductor unrolls the {steps} steps; a cold compile took "
                        f"55 s at T=4 and 694 s at T=8 on 2 busy cores, so only T <= {MAX_COMPILED_T} is timed")
        return _compiled_loop(), "compiled"
    if variant == "spikingjelly":
        run, reason = spikingjelly_lif(TAU)
        if run is None:
            pytest.skip(f"SpikingJelly baseline cannot run: {reason}")
        return run, "spikingjelly"
    raise AssertionError(variant)


def _forward_backward(fn, x, grad):
    xg = x.detach().requires_grad_(True)
    spikes = fn(xg)
    spikes.backward(grad)
    return spikes.detach(), xg.grad


def _assert_same_as_ours(spikes, grad_x, ours_spikes, ours_grad, dtype, variant):
    assert torch.equal(spikes, ours_spikes), f"{variant}: spikes differ from stars_fast.multistep_lif"
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(grad_x.float(), ours_grad.float(), **tol,
                               msg=lambda m: f"{variant}: grad_x differs from stars_fast.multistep_lif: {m}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_lif(measure, smoke, case, mode, variant):
    device, steps, n, dtype = case
    n = SMOKE_N if smoke else n
    sync = torch.cuda.synchronize if device == "cuda" else None
    generator = torch.Generator(device).manual_seed(0)
    x = (torch.randn(steps, n, device=device, generator=generator) + 0.5).to(dtype)
    grad = torch.randn(steps, n, device=device, generator=generator).to(dtype)
    bytes_moved = BYTES_PER_ELEMENT[mode] * x.numel() * x.element_size()
    rounds = 21  # medians of 21: single calls on this shared 2-core VM stray by up to 40%
    group = f"lif {_case_id((device, steps, n, dtype))} {mode}"

    if variant == "copy":
        dst = torch.empty_like(x)
        measure(lambda: dst.copy_(x), group=group, variant="copy_ (bandwidth)", role="copy", rounds=rounds * 2,
                bytes_moved=2 * x.numel() * x.element_size(), sync=sync)
        return

    fn, role = _neuron(variant, device, steps)
    ours_spikes, ours_grad = _forward_backward(functools.partial(stars_fast.multistep_lif, tau=TAU), x, grad)
    start = time.perf_counter()
    if mode == "fwd":
        with torch.no_grad():
            spikes = fn(x)
        first_call_s = time.perf_counter() - start
        assert torch.equal(spikes, ours_spikes), f"{variant}: spikes differ from stars_fast.multistep_lif"
    else:
        spikes, grad_x = _forward_backward(fn, x, grad)
        first_call_s = time.perf_counter() - start
        _assert_same_as_ours(spikes, grad_x, ours_spikes, ours_grad, dtype, variant)
    del ours_spikes, ours_grad, spikes

    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(x)
    elif mode == "fwd+bwd":
        def run():
            _forward_backward(fn, x, grad)
    else:
        xg = x.detach().requires_grad_(True)
        kept = fn(xg)

        def run():
            xg.grad = None  # assigned, not accumulated: grad_x written once
            kept.backward(grad, retain_graph=True)

    label = variant
    if variant == "spikingjelly":
        label = f"spikingjelly ({spikingjelly_implementation(x)})"
    measure(run, group=group, variant=label, role=role, rounds=3 if role in ("eager", "spikingjelly") else rounds,
            bytes_moved=bytes_moved, sync=sync, first_call_s=first_call_s if role == "compiled" else None)


# PLIF fwd+bwd (gradients of x and w, and of v_threshold when learnable) with one k and with one k per channel,
# at one [T, B, C, H, W] shape: N = 2^21 on the CPU (the LIF headline's), 2^23 on a GPU. The per-channel kernels
# read k per neuron; a learnable threshold (any shape) takes the per-neuron path too, reading v_th per neuron.
PLIF_VARIANTS = {"plif-scalar": dict(), "plif-per-channel": dict(per_channel=True),
                 "plif-scalar-learnable-threshold": dict(learnable_threshold=True),
                 "plif-per-channel-learnable-threshold": dict(per_channel=True, learnable_threshold=True,
                                                              per_channel_threshold=True)}
PLIF_CASES = [("cpu", 4, (32, 64, 32, 32), torch.float32)]
if torch.cuda.is_available():
    PLIF_CASES += [("cuda", 4, (32, 256, 32, 32), torch.float32)]


def _plif_case_id(case):
    device, steps, (b, c, h, w), dtype = case
    return f"{device}-T{steps}-B{b}-C{c}-{h}x{w}-{str(dtype).removeprefix('torch.')}"


@pytest.mark.parametrize("variant", PLIF_VARIANTS)
@pytest.mark.parametrize("case", PLIF_CASES, ids=_plif_case_id)
def test_plif(measure, smoke, case, variant):
    device, steps, step_shape, dtype = case
    if smoke:
        step_shape = (2, 4) + step_shape[2:]
    sync = torch.cuda.synchronize if device == "cuda" else None
    generator = torch.Generator(device).manual_seed(0)
    x = (torch.randn(steps, *step_shape, device=device, generator=generator) + 0.5).to(dtype)
    grad = torch.randn(x.shape, device=device, generator=generator).to(dtype)
    options = PLIF_VARIANTS[variant]
    channels = step_shape[1] if "per_channel" in options or "per_channel_threshold" in options else None
    node = stars_fast.neurons.ParametricLIFNode(init_tau=TAU, channels=channels, **options).to(device)
    xg = x.detach().requires_grad_(True)

    def run():
        node.zero_grad(set_to_none=True)
        xg.grad = None
        node(xg).backward(grad)

    run()
    if variant != "plif-scalar":  # every channel at the scalar's k and threshold: the scalar's spikes and grad_x
        spikes, grad_x = node(x).detach(), xg.grad.clone()
        xg.grad = None
        scalar = stars_fast.neurons.ParametricLIFNode(init_tau=TAU).to(device)
        scalar(xg).backward(grad)
        _assert_same_as_ours(spikes, grad_x, scalar(x).detach(), xg.grad, dtype, variant)
    measure(run, group=f"plif {_plif_case_id((device, steps, step_shape, dtype))} fwd+bwd", variant=variant,
            role="ours", rounds=21, bytes_moved=BYTES_PER_ELEMENT["fwd+bwd"] * x.numel() * x.element_size(),
            sync=sync)


def test_lif_interleaved(interleave, smoke):
    """The headline CPU case (T=4, N=2^21 fp32, fwd+bwd) with our op, the baselines that can run and the
    copy timed in turn."""
    steps, n = 4, SMOKE_N if smoke else 2 ** 21
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(steps, n, generator=generator) + 0.5
    grad = torch.randn(steps, n, generator=generator)
    ours_spikes, ours_grad = _forward_backward(functools.partial(stars_fast.multistep_lif, tau=TAU), x, grad)
    variants = {}
    for variant in ["fused-cpu", "loop-eager", "spikingjelly"] + ([] if smoke else ["loop-compiled"]):
        if variant == "spikingjelly" and spikingjelly_lif(TAU)[0] is None:
            continue  # test_lif[...-spikingjelly] reports why it cannot run
        fn, role = _neuron(variant, "cpu", steps)
        spikes, grad_x = _forward_backward(fn, x, grad)
        _assert_same_as_ours(spikes, grad_x, ours_spikes, ours_grad, torch.float32, variant)
        variants[variant] = (functools.partial(_forward_backward, fn, x, grad), role,
                             BYTES_PER_ELEMENT["fwd+bwd"] * x.numel() * x.element_size())
    dst = torch.empty_like(x)
    variants["copy_ (bandwidth)"] = (lambda: dst.copy_(x), "copy", 2 * x.numel() * x.element_size())
    interleave(variants, group=f"lif {_case_id(('cpu', steps, n, torch.float32))} fwd+bwd", rounds=21)
