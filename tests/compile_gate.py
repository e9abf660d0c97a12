"""Compile gate: every Triton launch the public ops make, compiled for sm_80 and sm_90 without a GPU.

1. Record. The public ops (stars_fast.multistep_lif, ops.lif.multistep_neuron, stars_fast.stars_loss,
   stars_fast.pool_features, all with backend="triton") run forward and backward under
   TRITON_INTERPRET=1 over a grid of the options used in practice, with the interpreter's launch
   hooked: each launch is recorded (kernel, arguments) and not executed. Its specialization is what
   Triton's JIT would compute on a GPU: the argument types (Triton signature), the 16-byte
   divisibility of pointers and integers, the constexpr values and the compile options (num_warps,
   ...), from Triton's own binder with a CUDA backend. The distinct launches are the gate's set;
   nothing is hard-coded, so a kernel added to kernels/ is picked up when a public op launches it.
2. Compile. Each distinct launch is compiled with triton.compile(ASTSource(...)) for
   GPUTarget("cuda", 80, 32) and GPUTarget("cuda", 90, 32) in worker processes without
   TRITON_INTERPRET; the ptxas -v log of Triton's own ptxas run (the bundled ptxas, sm_80 / sm_90a,
   the same flags) gives registers and spill bytes, the compiled kernel its shared memory, the PTX
   its global loads and stores by width. Results are cached by (the hash of the kernel's module
   source, kernel, signature, constexprs, options, target, Triton version, result format) in
   $STARS_FAST_COMPILE_GATE_CACHE (default ~/.cache/stars_fast/compile_gate).
3. Occupancy. From registers, shared memory and num_warps, the warps resident per SM
   (resident_warps); the memory-bound kernels (MEMORY_BOUND) need MIN_MEMORY_BOUND_OCCUPANCY.

Run `python tests/compile_gate.py` for the table; tests/test_compile_gate.py fails on any compile
error, spill, or memory-bound launch below the occupancy floor.

Covering design of the LIF grid: every option combination (LIF/IF/PLIF x hard/soft reset x
decay_input x detach_reset x sigmoid/atan/triangle x spiking x v_init x return_v) at T = 33, which uses
the largest chunk of both kernels (and the checkpointed backward), and every T = 1..33 and 40 at the
default options; each in fp32, fp16 and bf16, with N a multiple of 16 (vectorized) and not. The other
surrogates (piecewise_exp, soft_sign, super_spike, erf) differ from these in the surrogate and primitive
code only: at T = 33 with N vectorized, LIF and PLIF (dL/dk) spiking and smooth in fp32, and in bf16
(the most neurons per thread) LIF spiking and PLIF smooth. Per-channel PLIF (one k per
neuron) differs from PLIF in the load of k only: at T = 33 with v_init, spiking and smooth, in fp32 and
bf16 with N vectorized, and fp32 / fp16 with N not. A learnable threshold (one v_th per neuron, dL/dv_th)
runs the same cases on LIF, IF and per-channel PLIF (hard reset), and on LIF with the soft reset.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import importlib
import importlib.util
import io
import itertools
import json
import multiprocessing
import os
import pathlib
import re
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

from occupancy import MIN_MEMORY_BOUND_OCCUPANCY, SM_LIMITS, resident_warps

TARGETS = (80, 90)
DTYPE_NAMES = ("float32", "float16", "bfloat16")
DEFAULT_CACHE = pathlib.Path.home() / ".cache" / "stars_fast" / "compile_gate"
RESULT_FORMAT = 2  # in the cache key: entries written before compile_launch's result gained a field are not read
# They stream HBM (tests/occupancy.py); the STARS GEMM-like kernels are compute-bound and exempt.
MEMORY_BOUND = frozenset({"_lif_fwd_kernel", "_lif_bwd_kernel", "_pool_mean_kernel"})
DEFAULT_NUM_WARPS = 4  # Triton's, for a launch that does not name num_warps




@dataclass(frozen=True)
class Launch:
    """One distinct specialization of a kernel, as Triton's JIT would compile it."""

    module: str
    name: str
    signature: Tuple[Tuple[str, str], ...]
    constexprs: Tuple[Tuple[Tuple[int, ...], object], ...]
    attrs: Tuple[Tuple[Tuple[int, ...], str], ...]
    options: Tuple[Tuple[str, object], ...]
    source_hash: str

    def key(self, capability: int) -> str:
        import triton

        text = repr((self.module, self.name, self.signature, self.constexprs, self.attrs, self.options,
                     self.source_hash, capability, triton.__version__, RESULT_FORMAT))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    @property
    def num_warps(self) -> int:
        return dict(self.options).get("num_warps", DEFAULT_NUM_WARPS)

    def describe(self) -> str:
        """The key specialization: pointer dtypes, 16-divisible integer arguments, constexprs."""
        names = [n for n, _ in self.signature]
        dtypes = sorted({t[1:] for _, t in self.signature for t in _flat(t) if t.startswith("*")})
        integers = [i for i, (_, t) in enumerate(self.signature) if not any(s.startswith("*") for s in _flat(t))]
        aligned = [names[path[0]] for path, attr in self.attrs if "tt.divisibility" in attr and path[0] in integers]
        consts = [f"{names[path[0]]}={value}" for path, value in self.constexprs if value is not None]
        return f"{'/'.join(dtypes)} | {' '.join(consts)} | 16|{','.join(aligned) or '-'}"


def _flat(t):
    """The type strings of a (possibly nested tuple) Triton signature entry."""
    return [t] if isinstance(t, str) else [s for x in t for s in _flat(x)]


# ---------------------------------------------------------------------------------------------- record

def _specialize(interpreted, args, kwargs, backend, jit_cache) -> Launch:
    """The Launch that Triton's JIT would compile for this call on a CUDA device."""
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = interpreted.fn
    jit = jit_cache.get(fn)
    if jit is None:
        jit = JITFunction(fn, **interpreted.kwargs)
        jit_cache[fn] = (jit, create_function_from_signature(jit.signature, jit.params, backend))
        jit = jit_cache[fn]
    jit_fn, binder = jit
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit_fn._pack_args(backend, kwargs, bound, specialization, options)
    compile_options = tuple(sorted((k, v) for k, v in kwargs.items() if k in options.__dict__))
    source = sys.modules[fn.__module__].__file__
    if source not in jit_cache:  # the module holds the kernel and the @jit functions it calls
        jit_cache[source] = hashlib.sha256(pathlib.Path(source).read_bytes()).hexdigest()[:16]
    return Launch(fn.__module__, fn.__qualname__, tuple(signature.items()),
                  tuple(sorted(constexprs.items())), tuple(sorted((k, repr(v)) for k, v in attrs.items())),
                  compile_options, jit_cache[source])


@contextlib.contextmanager
def recording():
    """Within the block, interpreter launches are recorded into the yielded dict (Launch -> count)
    instead of run. Needs TRITON_INTERPRET=1 set before the kernels were defined."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.interpreter import InterpretedFunction

    backend = make_backend(GPUTarget("cuda", 90, 32))
    jit_cache: Dict = {}
    launches: Dict[Launch, int] = {}
    original = InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launch = _specialize(self, args, kwargs, backend, jit_cache)
        launches[launch] = launches.get(launch, 0) + 1

    InterpretedFunction.run = record
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


def _dtype(name):
    import torch

    return getattr(torch, name)


def lif_scenarios() -> List[Tuple[str, Callable[[], None]]]:
    """(name, run) pairs: forward and backward of the neuron op with backend="triton"."""
    import torch

    import stars_fast
    from stars_fast.ops import lif

    def run(T, dtype, n_aligned, neuron, v_reset, decay_input, detach_reset, surrogate, spiking, with_v_init,
            return_v):
        # N = 128 (16-divisible) or 37; a per-channel k or threshold needs a channel dim (dim 2)
        per_channel = neuron.startswith("plif_channel") or neuron.endswith("_threshold")
        shape = (T, 2, 16, 4) if n_aligned else (T, 1, 37) if per_channel else (T, 37)
        x = torch.randn(shape, dtype=_dtype(dtype), requires_grad=True)
        v_init = torch.randn(shape[1:], dtype=x.dtype, requires_grad=True) if with_v_init else None
        common = dict(v_reset=v_reset, decay_input=decay_input, detach_reset=detach_reset, surrogate=surrogate,
                      spiking=spiking, v_init=v_init, backend="triton")
        if neuron.endswith("_threshold"):  # a learnable threshold, one per channel
            common["v_threshold"] = torch.ones(shape[2], requires_grad=True)
            neuron = neuron.removesuffix("_threshold")
        if neuron in ("plif", "plif_channel"):
            w = torch.zeros(shape[2] if neuron == "plif_channel" else (), requires_grad=True)
            spikes, v = lif.multistep_neuron(x, torch.sigmoid(w), **common)
            if not return_v:
                v = None
        elif "v_threshold" in common:
            spikes, v = lif.multistep_neuron(x, tau=2.5 if neuron == "lif" else None, neuron=neuron,
                                             return_v=return_v, **common)
        else:
            out = stars_fast.multistep_lif(x, neuron=neuron, tau=2.5, return_v=return_v, **common)
            spikes, v = out if return_v else (out, None)
        loss = spikes.float().sum() + (v.float().sum() if v is not None else 0.0)
        loss.backward()

    scenarios = []
    for dtype, aligned in itertools.product(DTYPE_NAMES, (True, False)):
        for opts in itertools.product(("lif", "if", "plif"), (0.0, None), (True, False), (False, True),
                                      ("sigmoid", "atan", "triangle"), (True, False), (False, True), (False, True)):
            scenarios.append((f"lif T=33 {dtype} aligned={aligned} {opts}",
                              lambda d=dtype, a=aligned, o=opts: run(33, d, a, *o)))
        for T in list(range(1, 34)) + [40]:
            scenarios.append((f"lif T={T} {dtype} aligned={aligned} default",
                              lambda d=dtype, a=aligned, t=T: run(t, d, a, "lif", 0.0, True, False, "sigmoid", True,
                                                                 False, False)))
    for surrogate in ("piecewise_exp", "soft_sign", "super_spike", "erf"):
        for dtype, neuron, spiking in [("float32", "lif", True), ("float32", "lif", False), ("float32", "plif", True),
                                       ("float32", "plif", False), ("bfloat16", "lif", True),
                                       ("bfloat16", "plif", False)]:
            if spiking or surrogate != "super_spike":  # super_spike has no primitive
                opts = (neuron, 0.0, True, False, surrogate, spiking, True, True)
                scenarios.append((f"lif T=33 {dtype} aligned=True {opts}",
                                  lambda d=dtype, o=opts: run(33, d, True, *o)))
    for dtype, aligned, spiking in [("float32", True, True), ("float32", True, False), ("float32", False, True),
                                    ("bfloat16", True, True), ("bfloat16", True, False), ("float16", False, False)]:
        for neuron in ("plif_channel", "lif_threshold", "if_threshold", "plif_channel_threshold"):
            opts = (neuron, 0.0, True, False, "sigmoid", spiking, True, True)
            scenarios.append((f"lif T=33 {dtype} aligned={aligned} {opts}",
                              lambda d=dtype, a=aligned, o=opts: run(33, d, a, *o)))
        opts = ("lif_threshold", None, True, False, "sigmoid", spiking, True, True)  # soft reset: v_th in the reset
        scenarios.append((f"lif T=33 {dtype} aligned={aligned} {opts}",
                          lambda d=dtype, a=aligned, o=opts: run(33, d, a, *o)))
    return scenarios


def stars_scenarios() -> List[Tuple[str, Callable[[], None]]]:
    """stars_loss forward+backward at the training sizes, and pool_features."""
    import torch

    import stars_fast

    def loss(B, channels, dtype, normalize, thresholds):
        zt = [torch.randn(B, c, dtype=_dtype(dtype), requires_grad=True) for c in channels]
        zs = [torch.randn(B, c, dtype=_dtype(dtype), requires_grad=True) for c in reversed(channels)]
        total = stars_fast.stars_loss(zt, zs, normalize=normalize, thresholds=thresholds, backend="triton")
        total = total[0] if isinstance(total, tuple) else total
        total.backward()

    def pool(shape, dtype):
        f = torch.randn(shape, dtype=_dtype(dtype), requires_grad=True)
        stars_fast.pool_features(f, backend="triton").float().sum().backward()

    scenarios = []
    for B, dtype, normalize, thresholds in itertools.product(
            (2, 33, 256), DTYPE_NAMES, (None, "teacher"), (None, (-0.5, 0.5, 1.0))):
        for channels in ((64, 128, 256, 512), (2048,)):
            scenarios.append((f"stars B={B} C={channels} {dtype} normalize={normalize} thresholds={thresholds}",
                              lambda *a: loss(*a), (B, channels, dtype, normalize, thresholds)))
    for shape, dtype in itertools.product(((256, 512, 4, 4), (4, 256, 512, 2, 2), (2, 64, 32, 32),
                                           (4, 33, 2048, 1, 1), (2, 3, 7, 7)), DTYPE_NAMES):
        scenarios.append((f"pool {shape} {dtype}", lambda *a: pool(*a), (shape, dtype)))
    return [(name, (lambda f=f, a=a: f(*a))) for name, f, a in scenarios]


def record_all(scenarios) -> Tuple[Dict[Launch, int], List[str]]:
    """The distinct launches of all scenarios, and the scenarios that raised (name: error)."""
    failures = []
    with recording() as launches:
        for name, run in scenarios:
            try:
                run()
            except Exception as e:  # a public op that cannot run is a gate failure, reported by name
                failures.append(f"{name}: {type(e).__name__}: {e}")
    return launches, failures


# --------------------------------------------------------------------------------------------- compile

_PTXAS_LOG = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers", re.S)


def _worker_init():
    """Workers compile for real: no interpreter, and a private Triton cache so ptxas always runs."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile_gate_triton_")


_GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)+)")


def _global_accesses(ptx: str) -> Dict[str, Dict[str, int]]:
    """{"loads": {bytes: count}, "stores": {bytes: count}}: the PTX's global accesses by width, the bytes
    one thread moves per instruction (ld.global.v2.b32: 8), keys as strings (the result is JSON)."""
    counts = {"loads": {}, "stores": {}}
    for op, suffixes in _GLOBAL_ACCESS.findall(ptx):
        parts = suffixes.split(".")
        vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v[248]", p)), 1)
        bits = int(re.fullmatch(r"[bfsu](\d+)", parts[-1]).group(1))
        width = counts["loads" if op == "ld" else "stores"]
        width[str(vector * bits // 8)] = width.get(str(vector * bits // 8), 0) + 1
    return counts


def compile_launch(launch: Launch, capability: int) -> dict:
    """Compile one launch for sm_<capability> -> {registers, spill_stores, spill_loads, shared, loads, stores,
    ...} or {error}."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start, cpu_start = time.time(), _cpu_seconds()
    try:
        fn = getattr(importlib.import_module(launch.module), launch.name)
        source = ASTSource(fn, dict(launch.signature), dict(launch.constexprs),
                           {path: eval(attr) for path, attr in launch.attrs})  # lists of ints and strings
        knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=dict(launch.options))
        match = _PTXAS_LOG.search(log.getvalue())
        if match is None:
            raise RuntimeError(f"no ptxas -v report in the compile log:\n{log.getvalue()[-2000:]}")
        stores, loads, registers = map(int, match.groups())
        return dict(registers=registers, spill_stores=stores, spill_loads=loads, shared=kernel.metadata.shared,
                    launch=launch.describe(), seconds=round(time.time() - start, 2),
                    cpu_seconds=round(_cpu_seconds() - cpu_start, 2), **_global_accesses(kernel.asm["ptx"]))
    except Exception as e:  # reported per launch: the gate fails on it
        return dict(error=f"{type(e).__name__}: {str(e)[-3000:]}", launch=launch.describe(),
                    seconds=round(time.time() - start, 2), cpu_seconds=round(_cpu_seconds() - cpu_start, 2))


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("STARS_FAST_COMPILE_GATE_CACHE", DEFAULT_CACHE))


def _write_atomic(path: pathlib.Path, data: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(data, f)
    os.replace(f.name, path)


def compile_all(launches, workers: int = 2) -> Dict[Tuple[Launch, int], dict]:
    """Every launch for every target, from the cache or compiled in a pool of `workers` processes."""
    cache = _cache_dir()
    results, todo = {}, []
    for launch in launches:
        for capability in TARGETS:
            path = cache / f"{launch.key(capability)}.json"
            if path.exists():
                results[launch, capability] = json.loads(path.read_text())
            else:
                todo.append((launch, capability))
    if todo:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
            futures = {pool.submit(compile_launch, *job): job for job in todo}
            for future in concurrent.futures.as_completed(futures):
                launch, capability = futures[future]
                result = future.result()
                results[launch, capability] = result
                _write_atomic(cache / f"{launch.key(capability)}.json", result)
    return results


# ----------------------------------------------------------------------------------------------- table

def occupancy(launch: Launch, capability: int, result: dict) -> Tuple[int, float]:
    """(warps resident per SM, occupancy) of one compiled launch."""
    limits = SM_LIMITS[capability]
    warps = resident_warps(result["registers"], result["shared"], 32 * launch.num_warps, limits)
    return warps, warps / limits.max_warps


def low_occupancy(results) -> List[str]:
    """The compiles of MEMORY_BOUND kernels below MIN_MEMORY_BOUND_OCCUPANCY, one line each."""
    lines = []
    for (launch, capability), r in results.items():
        if launch.name in MEMORY_BOUND and "error" not in r:
            warps, fraction = occupancy(launch, capability, r)
            if fraction < MIN_MEMORY_BOUND_OCCUPANCY:
                lines.append(f"sm_{capability} {launch.name} {launch.describe()}: {r['registers']} registers, "
                             f"{r['shared']} B shared, {launch.num_warps} warps a program -> {warps} warps/SM "
                             f"({fraction:.1%})")
    return sorted(lines)


def _widths(counts: Dict[str, int]) -> str:
    return " ".join(f"{width}:{counts[width]}" for width in sorted(counts, key=int, reverse=True)) or "-"


def table(launches, results) -> str:
    """One row per launch (registers, spill bytes, resident warps and occupancy per target, global accesses
    by width on sm_90), then the worst per kernel (memory-bound ones marked *)."""
    rows = ["kernel                | specialization (dtypes | constexprs | 16-divisible ints)"
            " | regs sm_80 | regs sm_90 | spill B | warps/SM sm_80 | sm_90 | occupancy % sm_80 | sm_90"
            " | sm_90 loads | stores (bytes:count)"]
    worst: Dict[str, dict] = {}
    for launch in sorted(launches, key=lambda l: (l.name, l.describe())):
        w = worst.setdefault(launch.name, dict(count=0, regs={c: 0 for c in TARGETS}, spills=0,
                                               warps={c: None for c in TARGETS}))
        w["count"] += 1
        regs, warps, percent, spills = ["ERROR"] * len(TARGETS), ["-"] * len(TARGETS), ["-"] * len(TARGETS), 0
        for i, capability in enumerate(TARGETS):
            r = results[launch, capability]
            if "error" in r:
                continue
            resident, fraction = occupancy(launch, capability, r)
            regs[i], warps[i], percent[i] = str(r["registers"]), str(resident), f"{100 * fraction:.1f}"
            spills += r["spill_stores"] + r["spill_loads"]
            w["regs"][capability] = max(w["regs"][capability], r["registers"])
            fewest = w["warps"][capability]
            w["warps"][capability] = resident if fewest is None else min(fewest, resident)
        w["spills"] += spills
        r90 = results[launch, 90]
        accesses = f"{_widths(r90.get('loads', {}))} | {_widths(r90.get('stores', {}))}"
        rows.append(f"{launch.name:21s} | {launch.describe()} | {regs[0]:>10s} | {regs[1]:>10s} | {spills:7d}"
                    f" | {warps[0]:>14s} | {warps[1]:>5s} | {percent[0]:>17s} | {percent[1]:>5s} | {accesses}")
    rows.append("")
    rows.append("kernel                | launches | worst regs sm_80 | worst regs sm_90 | spill bytes"
                " | min warps/SM sm_80 | sm_90 | min occupancy % sm_80 | sm_90")
    for name, w in sorted(worst.items()):
        warps = [w["warps"][c] for c in TARGETS]
        percent = [f"{100 * x / SM_LIMITS[c].max_warps:.1f}" if x is not None else "-" for x, c in zip(warps, TARGETS)]
        warps = [str(x) if x is not None else "-" for x in warps]
        marked = name + (" *" if name in MEMORY_BOUND else "")
        rows.append(f"{marked:21s} | {w['count']:8d} | {w['regs'][80]:16d} | {w['regs'][90]:16d} | {w['spills']:11d}"
                    f" | {warps[0]:>18s} | {warps[1]:>5s} | {percent[0]:>21s} | {percent[1]:>5s}")
    rows.append(f"* memory-bound: needs {MIN_MEMORY_BOUND_OCCUPANCY:.0%} occupancy on every target")
    return "\n".join(rows)


def run_gate(workers: int = 2):
    """Record, compile, tabulate -> (launches, results, scenario failures, timings)."""
    t0, c0 = time.time(), time.process_time()
    launches, failures = record_all(lif_scenarios() + stars_scenarios())
    t1, c1 = time.time(), time.process_time()
    results = compile_all(launches, workers)
    compiled_cpu = sum(r.get("cpu_seconds", 0.0) for r in results.values())
    return launches, results, failures, dict(record_s=round(t1 - t0, 1), record_cpu_s=round(c1 - c0, 1),
                                             compile_s=round(time.time() - t1, 1),
                                             compile_cpu_s_of_these_results=round(compiled_cpu, 1))


def main():
    os.environ["TRITON_INTERPRET"] = "1"
    root = pathlib.Path(__file__).resolve().parents[1]
    if importlib.util.find_spec("stars_fast") is None:
        sys.path.insert(0, str(root))
    launches, results, failures, timing = run_gate()
    print(table(launches, results))
    print(f"{len(launches)} distinct launches, {len(results)} compiles; {timing}")
    for failure in failures:
        print("scenario failed:", failure)
    for (launch, capability), r in results.items():
        if "error" in r:
            print(f"compile error sm_{capability} {launch.name} {launch.describe()}: {r['error'][:2000]}")
    for line in low_occupancy(results):
        print("below the memory-bound occupancy floor:", line)


if __name__ == "__main__":
    main()
