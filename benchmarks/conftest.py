"""Benchmark plumbing: allocator control, the `measure` and `interleave` fixtures and the summary
tables printed after `pytest benchmarks/ --benchmark-only`.

Two ways of timing. `measure`: one pytest-benchmark test per variant, run one after another (each
on caches warmed by its own previous call); a shared machine's speed drifts between them, which
moves their ratios (on the 2-core VM: STARS vs eager 6.34x, then 4.90x, in two consecutive runs of
the same code).
`interleave`: the headline cases' variants timed in turn within every round, ratios paired per
round; drift hits all alike, and every call starts on caches the other variants left.

Allocator. Freshly allocated large CPU outputs are page-faulted in on every call under glibc's
defaults (a 32 MiB clone: ~17 ms instead of ~2 ms), which swings CPU ratios 2-3x with heap state.
This file therefore calls mallopt at import, before torch is imported (M_MMAP_THRESHOLD = 32 MiB,
M_TRIM_THRESHOLD = 2 GiB - 1, mallopt's int maximum, M_TOP_PAD = 1 GiB), unless the glibc
tunables are given in the environment (MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=1073741824), which then win. Every benchmark
records its page faults per timed call, and the summary prints a 32 MiB clone check, so a reader
sees whether the setting took effect.

torch.compile baselines are compiled in a fresh Inductor cache (cold) unless TORCHINDUCTOR_CACHE_DIR
is set; their first call (compilation included) is reported apart from the timed median. The untimed
smoke run (--benchmark-disable, CI) skips them and shrinks every size (it checks that each variant runs).
"""
import ctypes
import ctypes.util
import os
import resource
import statistics
import sys
import tempfile
import time

import pytest

ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296",
                 "MALLOC_TOP_PAD_": "1073741824"}
# mallopt parameter ids (malloc.h) and values; M_TRIM_THRESHOLD is an int there, so 2 GiB - 1.
_MALLOPT = {"M_MMAP_THRESHOLD": (-3, 32 << 20), "M_TRIM_THRESHOLD": (-1, 2 ** 31 - 1), "M_TOP_PAD": (-2, 1 << 30)}


def _tune_allocator() -> str:
    given = {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ}
    if given:
        return "glibc tunables from the environment: " + " ".join(f"{k}={v}" for k, v in given.items())
    libc_name = ctypes.util.find_library("c")
    if libc_name is None or not sys.platform.startswith("linux"):
        return "allocator defaults (no glibc found: mallopt not called)"
    libc = ctypes.CDLL(libc_name)
    refused = [name for name, (param, value) in _MALLOPT.items() if libc.mallopt(param, value) != 1]
    late = " (torch was imported before this: may not take effect)" if "torch" in sys.modules else ""
    if refused:
        return f"mallopt refused {refused}{late}"
    return "mallopt at conftest import: M_MMAP_THRESHOLD=32 MiB, M_TRIM_THRESHOLD=2 GiB-1, M_TOP_PAD=1 GiB" + late


ALLOCATOR = _tune_allocator()
if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
    INDUCTOR_CACHE = f"Inductor cache {os.environ['TORCHINDUCTOR_CACHE_DIR']} (may be warm)"
else:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="stars_fast_bench_inductor_")
    INDUCTOR_CACHE = "fresh Inductor cache (cold compile)"

import torch  # noqa: E402  (after mallopt: the tuning must precede torch's first large allocations)

import stars_fast  # noqa: E402

torch._dynamo.config.recompile_limit = 64  # one graph per benchmarked shape and grad mode

BASELINE_ROLES = ("eager", "compiled", "spikingjelly")  # the ratio columns, in this order


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def pytest_collection_modifyitems(config, items):
    """The smoke run skips the torch.compile baselines: a cold Inductor compile of the T-step loop
    takes about a minute at T=4 on 2 cores, and it checks our code, not Inductor."""
    if not config.getoption("benchmark_disable", False):
        return
    skip = pytest.mark.skip(reason="torch.compile baseline: compiled only in timed runs (--benchmark-only)")
    for item in items:
        if "compiled" in item.name:
            item.add_marker(skip)


@pytest.fixture
def smoke(request) -> bool:
    """True in the untimed smoke run (--benchmark-disable): benchmarks shrink their sizes."""
    return bool(request.config.getoption("benchmark_disable", False))


@pytest.fixture
def measure(benchmark, smoke):
    """measure(fn, group=..., variant=..., role=..., rounds=..., ...): time fn with pytest-benchmark
    (pedantic: `warmup` untimed calls, then `rounds`), recording in extra_info the variant's role
    (ours, eager, compiled, spikingjelly, copy, gemm-floor), the minimal bytes it moves, the thread
    count, the page faults per timed call and the first call's time (torch.compile baselines)."""

    def run(fn, *, group, variant, role, rounds, warmup=3, bytes_moved=None, first_call_s=None, sync=None):
        calls = {"n": 0, "faults": 0}

        def timed():
            before = _minor_faults()
            fn()
            if sync is not None:
                sync()
            calls["n"] += 1
            if calls["n"] > warmup:
                calls["faults"] += _minor_faults() - before

        benchmark.group = group
        info = benchmark.extra_info
        info.update(variant=variant, role=role, threads=torch.get_num_threads())
        if bytes_moved is not None:
            info["bytes"] = int(bytes_moved)
        if first_call_s is not None:
            info["first_call_s"] = round(first_call_s, 3)
        benchmark.pedantic(timed, rounds=1 if smoke else rounds, iterations=1, warmup_rounds=0 if smoke else warmup)
        timed_calls = calls["n"] - (0 if smoke else warmup)
        if timed_calls > 0 and not smoke:
            info["faults_per_call"] = round(calls["faults"] / timed_calls)

    return run


@pytest.fixture
def interleave(benchmark, smoke):
    """interleave({variant: (fn, role[, bytes])}, group=..., rounds=...): the variants timed in turn within each
    round (the order rotated every round), so that drift of a shared machine hits all of them alike and
    none runs on caches warmed by its own previous call. Records each variant's median and, for every
    variant against ours, the median over rounds of the paired ratio (its time / ours in that round),
    printed as their own table in the summary (with GB/s and % of the `copy` variant's for those given
    the bytes they move, and page faults per timed call)."""

    def run(variants, *, group, rounds, warmup=2):
        samples = {name: [] for name in variants}
        faults = {name: [] for name in variants}
        order = list(variants)

        def one_round():
            for name in order:
                before, start = _minor_faults(), time.perf_counter()
                variants[name][0]()
                samples[name].append(time.perf_counter() - start)
                faults[name].append(_minor_faults() - before)
            order.append(order.pop(0))

        for _ in range(0 if smoke else warmup):
            one_round()
        for values in list(samples.values()) + list(faults.values()):
            values.clear()
        benchmark.group = group
        benchmark.pedantic(one_round, rounds=1 if smoke else rounds, iterations=1, warmup_rounds=0)
        ours = next(name for name, (_, role, *_) in variants.items() if role == "ours")
        benchmark.extra_info["interleaved"] = {
            name: {"role": role, "median_s": statistics.median(samples[name]), "bytes": (extra or [None])[0],
                   "faults_per_call": round(statistics.mean(faults[name])),
                   "paired_ratio": statistics.median(b / a for a, b in zip(samples[ours], samples[name]))}
            for name, (_, role, *extra) in variants.items()}
        benchmark.extra_info["threads"] = torch.get_num_threads()

    return run


@pytest.fixture
def cpu_threads():
    """The thread count the numbers were measured with (recorded in extra_info)."""
    return torch.get_num_threads()


def _clone_check() -> str:
    """A 32 MiB clone after warm-up: ~0 page faults per call when freed blocks are kept (tuned)."""
    x = torch.randn(8 << 20)
    times, faults = [], []
    for i in range(8):
        before, start = _minor_faults(), time.perf_counter()
        y = x.clone()
        elapsed = time.perf_counter() - start
        del y
        if i >= 3:
            times.append(elapsed)
            faults.append(_minor_faults() - before)
    return (f"32 MiB clone check: {statistics.median(times) * 1e3:.2f} ms, {statistics.median(faults):.0f} page "
            f"faults per call (8192 = every page faulted in anew, the untuned behaviour)")


def _write_table(write, rows):
    """rows[0] the header: columns padded to their widest cell, the first left-aligned, the rest right."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        write("  " + "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))))


def _ratio(base, t):
    return f"{base / t:.2f}x" if base else "-"


def _skip_reasons(terminalreporter):
    """{reason: count} of the skipped benchmark variants (also in the smoke run)."""
    reasons = {}
    for report in terminalreporter.stats.get("skipped", []):
        if not report.nodeid.startswith("benchmarks/"):
            continue
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, config):
    terminalreporter.write_line(f"benchmarks allocator: {ALLOCATOR}; torch.compile: {INDUCTOR_CACHE}")
    reasons = _skip_reasons(terminalreporter)
    if reasons:
        terminalreporter.write_sep("-", "benchmark variants that did not run, and why")
        for reason, count in sorted(reasons.items()):
            terminalreporter.write_line(f"{count:4d} x {reason}")
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups, interleaved = {}, []
    for bench in session.benchmarks:
        if bench.stats is None:  # --benchmark-disable
            continue
        if "interleaved" in bench.extra_info:
            interleaved.append(bench)
        else:
            groups.setdefault(bench.group, []).append(bench)
    if not groups and not interleaved:
        return
    write = terminalreporter.write_line
    terminalreporter.write_sep("-", "medians, ratios (baseline time / this time) from this one process")
    write(f"allocator: {ALLOCATOR}")
    write(f"cpu kernels: {stars_fast.cpu_isa() or 'not built'} (ATEN_CPU_CAPABILITY caps them; PyTorch's own: "
          f"{torch.backends.cpu.get_cpu_capability()})")
    write(_clone_check())
    write(f"torch.compile: {INDUCTOR_CACHE}; first call (compile + run) in its own column, not in the median")
    header = ("variant", "median ms", "vs eager", "vs compiled", "vs SpikingJelly", "GB/s", "floor", "faults",
              "threads", "first call s")
    for group, benches in sorted(groups.items()):
        roles = {}
        for b in benches:
            roles.setdefault(b.extra_info.get("role"), b.stats.median)
        copy = next((b for b in benches if b.extra_info.get("role") == "copy"), None)
        copy_gbs = copy.extra_info["bytes"] / copy.stats.median / 1e9 if copy and "bytes" in copy.extra_info else None
        gemm = roles.get("gemm-floor")
        rows = []
        for b in sorted(benches, key=lambda b: -b.stats.median):
            info, t = b.extra_info, b.stats.median
            gbs = info["bytes"] / t / 1e9 if "bytes" in info else None
            if gbs is not None and copy_gbs and info.get("role") != "copy":
                floor = f"{100 * gbs / copy_gbs:.0f}% of copy"
            elif gemm and info.get("role") != "gemm-floor":
                floor = f"{t / gemm:.1f}x GEMMs"
            else:
                floor = "-"
            rows.append((info.get("variant", b.name), f"{t * 1e3:.3f}",
                         *(_ratio(roles.get(r), t) for r in BASELINE_ROLES),
                         f"{gbs:.1f}" if gbs is not None else "-", floor, str(info.get("faults_per_call", "-")),
                         str(info.get("threads", "-")), str(info.get("first_call_s", "-"))))
        write("")
        write(group)
        _write_table(write, [header] + rows)
    for bench in interleaved:
        write("")
        write(f"{bench.group} (interleaved: {bench.stats.rounds} rounds, variants in turn, order rotated; "
              f"{bench.extra_info['threads']} threads)")
        entries = bench.extra_info["interleaved"]
        copy = next((e for e in entries.values() if e["role"] == "copy" and e["bytes"]), None)
        gemm = next((e for e in entries.values() if e["role"] == "gemm-floor"), None)
        rows = [("variant", "median ms", "paired ratio (its time / ours, median over rounds)", "GB/s", "floor",
                 "faults")]
        for name, entry in sorted(entries.items(), key=lambda kv: -kv[1]["median_s"]):
            gbs = entry["bytes"] / entry["median_s"] / 1e9 if entry["bytes"] else None
            floor = "-"
            if gbs is not None and copy is not None and entry is not copy:
                floor = f"{100 * gbs / (copy['bytes'] / copy['median_s'] / 1e9):.0f}% of copy"
            elif gemm is not None and entry is not gemm:
                floor = f"{entry['median_s'] / gemm['median_s']:.2f}x GEMMs"
            rows.append((name, f"{entry['median_s'] * 1e3:.3f}", f"{entry['paired_ratio']:.2f}x",
                         "-" if gbs is None else f"{gbs:.1f}", floor, str(entry["faults_per_call"])))
        _write_table(write, rows)
