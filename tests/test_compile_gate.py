"""The compile gate (tests/compile_gate.py): every Triton launch the public ops make compiles for
sm_80 and sm_90 with zero register spills, and the memory-bound kernels keep at least 25% occupancy;
the register and occupancy table is printed.

CPU-only: the launches are recorded under TRITON_INTERPRET=1 (set by conftest.py before the kernels
are defined) and compiled in worker processes. A cold run compiles a few hundred variants (minutes,
two workers); results are cached (see compile_gate.py), so reruns take the recording time only.
"""
import pathlib
import sys

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import compile_gate  # noqa: E402


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    from stars_fast.kernels import lif

    return isinstance(lif._lif_fwd_kernel, InterpretedFunction)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gate records launches under the CPU interpreter")
def test_every_launch_compiles_for_sm80_and_sm90_without_spills(capsys):
    if not _interpreted():
        pytest.skip("the kernels were defined without TRITON_INTERPRET=1; run this file on its own")
    launches, results, failures, timing = compile_gate.run_gate(workers=2)
    with capsys.disabled():
        print("\n" + compile_gate.table(launches, results))
        print(f"compile gate: {len(launches)} distinct launches, {len(results)} compiles, {timing}")
    assert launches, "no Triton launch was recorded"
    assert not failures, "public ops failed while recording:\n" + "\n".join(failures[:20])
    errors = [f"sm_{c} {l.name} {l.describe()}: {r['error'][:1500]}" for (l, c), r in results.items() if "error" in r]
    assert not errors, f"{len(errors)} compile errors:\n" + "\n".join(errors[:10])
    spills = [f"sm_{c} {l.name} {l.describe()}: {r['registers']} registers, {r['spill_stores']} B spill stores, "
              f"{r['spill_loads']} B spill loads" for (l, c), r in results.items()
              if r["spill_stores"] or r["spill_loads"]]
    assert not spills, f"{len(spills)} compiles spill registers:\n" + "\n".join(spills)
    low = compile_gate.low_occupancy(results)
    assert not low, (f"{len(low)} compiles of memory-bound kernels below "
                     f"{compile_gate.MIN_MEMORY_BOUND_OCCUPANCY:.0%} occupancy:\n" + "\n".join(low))


def _n_is_16_divisible(launch) -> bool:
    names = [name for name, _ in launch.signature]
    return any(path == (names.index("N"),) and "tt.divisibility" in attr for path, attr in launch.attrs)


def _constexprs(launch) -> dict:
    return dict((launch.signature[path[0]][0], value) for path, value in launch.constexprs)


def _bytes_per_thread(launch) -> int:
    """Bytes of x per thread and [N] row: BLOCK neurons over the program's threads, times x's element size."""
    element = {"*fp32": 4, "*fp16": 2, "*bf16": 2}[dict(launch.signature)["X"]]
    return _constexprs(launch)["BLOCK"] // (32 * launch.num_warps) * element


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gate records launches under the CPU interpreter")
def test_lif_launches_use_vector_accesses():
    """Every LIF launch with a 16-divisible N reads x (and grad_spikes) and writes its outputs with one
    access per thread and row of all the thread's neurons (ld/st.global.v4 for 16 bytes, v2 for 8, a
    32-bit access for 4); no access is narrower but the one scalar load of a single decay value."""
    if not _interpreted():
        pytest.skip("the kernels were defined without TRITON_INTERPRET=1; run this file on its own")
    launches, failures = compile_gate.record_all(compile_gate.lif_scenarios()[::7])
    assert not failures, failures[:5]
    aligned = [l for l in launches if _n_is_16_divisible(l)]
    assert aligned
    results = compile_gate.compile_all(aligned)
    for (launch, capability), r in results.items():
        where = f"sm_{capability} {launch.describe()}"
        steps = _constexprs(launch)["STEPS"]
        loads_per_chunk = steps * (2 if launch.name == "_lif_bwd_kernel" else 1)
        width = _bytes_per_thread(launch)
        assert width >= 4, f"{where}: {width} bytes per thread and row"
        loads, stores = ({int(w): n for w, n in r[kind].items()} for kind in ("loads", "stores"))
        assert loads.get(width, 0) >= loads_per_chunk and stores.get(width, 0) >= steps, (where, width, r)
        narrow_loads = sum(n for w, n in loads.items() if w < width)
        narrow_stores = sum(n for w, n in stores.items() if w < width)
        assert narrow_loads <= 1 and narrow_stores == 0, (where, width, r)
