"""Shared benchmark plumbing: a ratio table (median of each variant vs the eager reference of its
group) printed after `pytest benchmarks/ --benchmark-only`, so speedups come from one process."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """The untimed smoke run (--benchmark-disable, as in CI) skips the torch.compile baselines: it
    checks that our code runs, and a cold-cache Inductor compile of the T-step reference neuron
    alone takes ~3 minutes on a 2-core CPU."""
    if not config.getoption("benchmark_disable", False):
        return
    skip = pytest.mark.skip(reason="torch.compile baseline: compiled only in timed runs (--benchmark-only)")
    for item in items:
        if "reference-compile" in item.name:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        if bench.stats is None:  # --benchmark-disable
            continue
        groups.setdefault(bench.group, {})[bench.param if bench.param else bench.name] = bench.stats.median
    if not groups:
        return
    terminalreporter.write_sep("-", "median time and speedup vs the eager reference (same process)")
    for group, medians in sorted(groups.items()):
        base = next((t for name, t in medians.items() if "reference" in name and "compile" not in name), None)
        terminalreporter.write_line(f"{group}")
        for name, t in sorted(medians.items(), key=lambda kv: -kv[1]):
            ratio = f"{base / t:7.2f}x" if base else "   n/a "
            terminalreporter.write_line(f"    {name:<40s} {t * 1e3:10.3f} ms  {ratio}")


@pytest.fixture
def cpu_threads():
    """The thread count the numbers were measured with (printed in the benchmark's extra_info)."""
    return torch.get_num_threads()
