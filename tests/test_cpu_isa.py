"""The cpu backend's kernels under each vector ISA this CPU can run (csrc/common.h cpu_isa).

PyTorch reads ATEN_CPU_CAPABILITY once per process, so the narrower ISAs run in subprocesses:
- the kernel tests (test_csrc_kernels.py, test_lif.py: against stars_fast.reference;
  test_plif_per_channel.py: against its own loop) pass under each;
- the AVX2 and AVX-512 LIF builds do the same operations lane for lane: their outputs are equal bit
  for bit (the DEFAULT build uses ATen's exp and rounds c - a b twice, so it only meets the tolerances).
"""
import os
import subprocess
import sys

import pytest
import torch

_C = pytest.importorskip("stars_fast._C", reason="extension stars_fast._C not built (pip install --no-build-isolation -e .)")
import stars_fast  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK = {"baseline": 0, "avx2": 1, "avx512": 2}
CAPABILITY = {"baseline": "default", "avx2": "avx2", "avx512": "avx512"}  # ATEN_CPU_CAPABILITY values


def _run(isa: str, args, timeout=900) -> subprocess.CompletedProcess:
    env = dict(os.environ, ATEN_CPU_CAPABILITY=CAPABILITY[isa])
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _narrower_isas():
    native = stars_fast.cpu_isa()
    return [isa for isa in RANK if RANK[isa] < RANK[native]]


def test_cpu_isa_reports_the_capability_cap():
    native = stars_fast.cpu_isa()
    assert native in RANK
    for isa in _narrower_isas():
        out = _run(isa, ["-c", "import stars_fast; print(stars_fast.cpu_isa())"], timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == isa


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_kernel_tests_pass_under_narrower_isa(isa):
    if isa not in _narrower_isas():
        pytest.skip(f"{isa} is this CPU's own ISA (the other tests run it) or beyond it")
    out = _run(isa, ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_csrc_kernels.py",
                     "tests/test_lif.py", "tests/test_plif_per_channel.py"])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def _lif_outputs():
    """Spikes, v_last and every gradient of lif_forward / lif_backward over configurations that reach
    the vector tails (N % 16), several parallel chunks (N > 32768), every surrogate, both resets,
    float32 / float64 / bfloat16 I/O, and one k per neuron (per-channel PLIF)."""
    ops = torch.ops.stars_fast
    gen = torch.Generator().manual_seed(7)
    outputs = []
    configs = [(4, 70001, torch.float32, s, hard, leaky, True, False) for s in range(7) for hard in (True, False)
               for leaky in (True, False)]
    configs += [(4, 70001, torch.float32, 0, True, True, False, False),
                (1, 1000, torch.float32, 0, True, True, True, False),
                (3, 4099, torch.float64, 0, True, True, True, False),
                (4, 4099, torch.bfloat16, 1, False, True, True, False)]
    configs += [(4, 70001, torch.float32, 0, True, True, False, True),  # one k per neuron
                (3, 4099, torch.float64, 1, False, True, False, True),
                (4, 4099, torch.bfloat16, 2, True, True, False, True)]
    for T, N, dtype, surrogate, hard, leaky, decay_is_tau, per_neuron in configs:
        x = (torch.randn(T, N, generator=gen) * 0.8 + 0.6).to(dtype)
        gs = torch.randn(T, N, generator=gen).to(dtype)
        gv = torch.randn(N, generator=gen).to(dtype)
        v0 = (torch.rand(N, generator=gen) - 0.5).to(dtype)
        decay = torch.tensor([3.0 if decay_is_tau else 1 / 3], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        if per_neuron:
            decay = torch.rand(N, generator=gen, dtype=decay.dtype) * 0.9 + 0.05
        v_reset = 0.0 if hard else None
        need_decay_grad = leaky and not decay_is_tau  # the PLIF gradient (multiply mode only)
        for spiking in (True, False) if surrogate != 5 else (True,):  # super_spike (5) has no primitive
            common = (decay, leaky, decay_is_tau, 1.0, v_reset, True, surrogate, 4.0, spiking)
            outputs += list(ops.lif_forward(x, v0, *common, True))
            outputs += list(ops.lif_backward(gs, gv, x, v0, *common, False, need_decay_grad, True))
    return outputs


def test_avx2_and_avx512_lif_builds_agree_bit_for_bit(tmp_path):
    if stars_fast.cpu_isa() != "avx512":
        pytest.skip(f"this CPU's kernels are {stars_fast.cpu_isa()}, not avx512")
    path = tmp_path / "avx2.pt"
    out = _run("avx2", [os.path.abspath(__file__), str(path)], timeout=300)
    assert out.returncode == 0, out.stderr
    theirs = torch.load(path, weights_only=True)
    ours = _lif_outputs()
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert torch.equal(a.view(torch.int8) if a.numel() else a, b.view(torch.int8) if b.numel() else b), i


if __name__ == "__main__":  # the subprocess of the test above: save this ISA's outputs
    torch.save(_lif_outputs(), sys.argv[1])
