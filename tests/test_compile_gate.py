"""The compile gate (tests/compile_gate.py): every Triton launch the public ops make compiles for
sm_80 and sm_90 with zero register spills; the register table is printed.

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


def _n_is_16_divisible(launch) -> bool:
    names = [name for name, _ in launch.signature]
    return any(path == (names.index("N"),) and "tt.divisibility" in attr for path, attr in launch.attrs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gate records launches under the CPU interpreter")
def test_lif_launches_use_128_bit_accesses():
    """Every LIF launch with a 16-divisible N reads x (and grad_spikes) and writes its outputs with
    ld/st.global.v4 (16 B per thread); the only scalar global load is the 1-element decay."""
    if not _interpreted():
        pytest.skip("the kernels were defined without TRITON_INTERPRET=1; run this file on its own")
    launches, failures = compile_gate.record_all(compile_gate.lif_scenarios()[::7])
    assert not failures, failures[:5]
    aligned = [l for l in launches if _n_is_16_divisible(l)]
    assert aligned
    results = compile_gate.compile_all(aligned)
    for (launch, capability), r in results.items():
        steps = dict((launch.signature[p[0]][0], v) for p, v in launch.constexprs)["STEPS"]
        loads_per_chunk = steps * (2 if launch.name == "_lif_bwd_kernel" else 1)
        assert r["scalar_loads"] <= 1, f"sm_{capability} {launch.describe()}: {r['scalar_loads']} scalar loads"
        assert r["v4_loads"] >= loads_per_chunk and r["v4_stores"] >= steps, (capability, launch.describe(), r)
