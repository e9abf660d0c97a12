"""Fused multi-step LIF vs the eager reference vs torch.compile of the reference.

T in {4, 8}, N in {2^21, 2^23} fp32, forward and forward+backward through autograd, on the CPU
(cpu backend) and, when a GPU is present, on CUDA (triton, cuda backends, and SpikingJelly's
multi-step LIF if installed)."""
import functools

import pytest
import torch

import stars_fast
from stars_fast import reference
from stars_fast.ops.lif import multistep_neuron

SIZES = [(4, 2 ** 21), (8, 2 ** 21), (4, 2 ** 23), (8, 2 ** 23)]
MAX_COMPILED_T = 4  # torch.compile(reference) is benchmarked up to this T (see test_lif)


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(reference.multistep_neuron)


def _variants(device):
    usable = stars_fast.available_backends(device)
    fused = ["triton", "cuda"] if device == "cuda" else ["cpu"]
    variants = {f"fused-{b}": functools.partial(multistep_neuron, backend=b) for b in fused if not usable[b]}
    variants["reference-eager"] = reference.multistep_neuron
    variants["reference-compile"] = lambda x, inv_tau: _compiled_reference()(x, inv_tau)
    if device == "cuda":
        try:
            from spikingjelly.activation_based import neuron

            node = neuron.LIFNode(tau=2.0, step_mode="m", backend="triton").cuda()
            variants["spikingjelly-triton"] = lambda x, inv_tau: (node(x), None)
        except Exception:  # not installed, or its Triton backend unavailable
            pass
    return variants


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
VARIANT_NAMES = ["fused-triton", "fused-cuda", "fused-cpu", "reference-eager", "reference-compile",
                 "spikingjelly-triton"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,N", SIZES, ids=[f"T{t}-N2^{n.bit_length() - 1}" for t, n in SIZES])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_lif(benchmark, device, T, N, mode, variant):
    fn = _variants(device).get(variant)
    if fn is None:
        pytest.skip(f"{variant} is not available on {device}")
    if variant == "reference-compile" and T > MAX_COMPILED_T:
        pytest.skip(f"Inductor unrolls the recurrence and its code generation grows exponentially with T: "
                    f"measured 23 s at T=2, 180 s at T=4 (cold cache, CPU); T={T} does not finish")
    benchmark.group = f"lif {device} {mode} T={T} N=2^{N.bit_length() - 1}"
    x = torch.randn(T, N, device=device) + 0.5
    grad = torch.ones(T, N, device=device)

    def run():
        if mode == "fwd":
            with torch.no_grad():
                fn(x, 0.5)
        else:
            xg = x.detach().requires_grad_(True)
            spikes, _ = fn(xg, 0.5)
            spikes.backward(grad)
        _sync(device)

    run()  # warm-up (and compilation for torch.compile)
    rounds = 3 if (variant == "reference-eager" and device == "cpu") else 10
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
