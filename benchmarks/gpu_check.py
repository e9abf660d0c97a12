"""One-shot GPU check: build with CUDA, run the CUDA/Triton tests, time the LIF op
against SpikingJelly 2.0 with the copy bandwidth of the same run, count the STARS launches with
torch.profiler and time STARS against the vectorized eager baseline, and time the synthesis step
ResNet-34 -> S-ResNet-18 (B=256, T=4) fused vs reference with STARS on and off. The fused ops run on
every backend this device has (triton, cuda: the C++/CUDA extension), side by side. Beside each cuda
timing is the occupancy the CUDA compile gate predicts for the kernels it ran (registers and resident
warps per SM from tests/test_cuda_compile.py's nvcc -Xptxas -v compile for this GPU's target, started
in the background at the beginning: about a minute of one core per .cu file); after the Triton
timings, a row gives the same for the Triton kernels from Triton's own cache of what it compiled in
this run (none in the dry run: the interpreter compiles nothing). Writes ONE Markdown
table to <out>/gpu_check.md and prints it. Each section is guarded: a failure becomes a FAIL row
and the next section runs. Sized for < 8 minutes on one H200: the build gets 240 s at most, the
tests run last with the time left of --budget-s (450 s), and no section starts after it.

On the GPU machine, from the repository root (SpikingJelly 2.0 and loguru are not in its image:
install them from wheels, see benchmarks/RESULTS.md, section GPU):
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out "$OUT"
On a CPU, to check the script itself (no build, tests only collected, tiny sizes):
    python benchmarks/gpu_check.py --cpu-dry-run --out /tmp/gpu_check
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import importlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# this checkout's stars_fast (not another installed copy), and user_baselines / bench_synthesis_step
sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks")]
TESTS = os.path.join(REPO, "tests")  # test_cuda_compile: the CUDA compile gate and the occupancy formula

import torch  # noqa: E402

ROWS = []  # (section, item, result, status)
START = time.perf_counter()
GATE_DEADLINE_S = 300  # seconds into the run after which no section waits for the CUDA compile gate's table
CPP_TYPES = {torch.float32: "float", torch.float16: "c10::Half", torch.bfloat16: "c10::BFloat16"}  # c++filt's
STARS_CUDA_KERNELS = ("rows_and_constants_kernel", "pairs_and_soft_sums_kernel", "gram_difference_kernel",
                      "gram_gradient_and_finalize_kernel", "gradient_kernel")


def record(section, item, result, status="ok"):
    ROWS.append((section, item, " ".join(str(result).split()).replace("|", "/"), status))
    print(f"[{time.perf_counter() - START:6.1f} s] {section} | {item} | {result} | {status}", flush=True)


@contextlib.contextmanager
def guarded(section, budget_s):
    """Runs a section; any exception becomes a FAIL row (with its message) and the next section runs."""
    if time.perf_counter() - START > budget_s:
        record(section, "not run", f"time budget of {budget_s:.0f} s spent", "skipped")
        yield False
        return
    started = time.perf_counter()
    try:
        yield True
    except Exception as error:  # reported in the table, never swallowed: the script's contract
        traceback.print_exc()
        record(section, "section failed", f"{type(error).__name__}: {str(error)[:300]}", "FAIL")
    print(f"--- {section}: {time.perf_counter() - started:.1f} s", flush=True)


@contextlib.contextmanager
def item_guard(section, item):
    """Like `guarded`, for one case of a section: its failure is a FAIL row, the other cases still run."""
    try:
        yield
    except Exception as error:  # reported in the table
        traceback.print_exc()
        record(section, item, f"{type(error).__name__}: {str(error)[:300]}", "FAIL")


def median_ms(fn, device, reps, warmup=3):
    """Median wall time of fn() in ms: CUDA events per call on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    times = []
    for _ in range(reps):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def _tail(text, lines=6):
    return " / ".join(text.strip().splitlines()[-lines:])


def _compile_gate():
    sys.path.insert(0, TESTS)
    try:
        return importlib.import_module("test_cuda_compile")
    finally:
        sys.path.remove(TESTS)


def cuda_compile_gate(target):
    """{kernel name: KernelResources} of csrc/cuda compiled for sm_<target> as tests/test_cuda_compile.py
    compiles it (the build's flags, -Xptxas -v), or the reason there is none."""
    gate = _compile_gate()
    if gate.CUDA_HOME is None:
        return "nvcc not found (set CUDA_HOME)"
    if target not in gate.SM_LIMITS:
        return f"no occupancy limits for sm_{target} in tests/test_cuda_compile.py"
    with tempfile.TemporaryDirectory() as out:
        kernels, failures = gate.compile_kernels(out, targets=(target,))
    if failures:
        return "nvcc failed: " + _tail(failures[0], 3)
    return {k.kernel: k for k in kernels}


def cuda_occupancy(gate_table, patterns):
    """'CUDA sm_XX: name R regs [S B spilled] W warps/SM = O%, ...' for the CUDA kernels whose names match
    `patterns` (regular expressions, one kernel each) in the compile gate's table (a Future of
    cuda_compile_gate), or why it is not known."""
    try:
        kernels = gate_table.result(timeout=max(0.0, GATE_DEADLINE_S - (time.perf_counter() - START)))
    except Exception as error:  # a timeout or a failed compile: the timing rows still stand
        return f"CUDA occupancy unknown ({type(error).__name__}: {str(error)[:100]})"
    if isinstance(kernels, str):
        return f"CUDA occupancy unknown: {kernels}"
    parts = []
    for pattern in patterns:
        found = [k for name, k in kernels.items() if re.fullmatch(pattern, name)]
        if len(found) != 1:
            parts.append(f"{pattern}: {len(found)} kernels match")
            continue
        k = found[0]
        spilled = f" {k.spill_stores} B spilled" if k.spill_stores else ""
        parts.append(f"{re.sub(r'<.*', '', k.kernel).split('::')[-1]} {k.registers} regs{spilled} {k.warps} warps/SM = "
                     f"{k.occupancy:.1%}")
    targets = sorted({k.target for k in kernels.values()})
    return f"CUDA {'/'.join(f'sm_{t}' for t in targets)}: " + ", ".join(parts)


def triton_occupancy(module_name, target):
    """'name T threads R regs S spilled W warps/SM = O%; ...' of the kernels of stars_fast.kernels.<module_name>
    that Triton compiled in this run (its JIT cache: the very launches timed), by the compile gate's formula."""
    import triton

    gate = _compile_gate()
    if target not in gate.SM_LIMITS:
        return f"no occupancy limits for sm_{target} in tests/test_cuda_compile.py"
    limits = gate.SM_LIMITS[target]
    module = importlib.import_module(f"stars_fast.kernels.{module_name}")
    rows = set()
    for fn in vars(module).values():
        if not isinstance(fn, triton.runtime.JITFunction):
            continue
        for caches in getattr(fn, "device_caches", {}).values():
            for kernel in caches[0].values():
                kernel._init_handles()  # loads the binary: n_regs and n_spills come from the driver
                threads, shared = 32 * kernel.metadata.num_warps, kernel.metadata.shared
                warps = gate.resident_warps(kernel.n_regs, shared, threads, limits)
                rows.add(f"{fn.__name__} {threads} threads {kernel.n_regs} regs {kernel.n_spills} spilled "
                         f"{shared} B smem {warps} warps/SM = {warps / limits.max_warps:.1%}")
    return f"sm_{target}: " + "; ".join(sorted(rows)) if rows else \
        "no compiled Triton kernel (the interpreter compiles none)"


# ----------------------------------------------------------------------------------------------- sections
def section_environment(device):
    record("environment", "torch / triton / CUDA", f"{torch.__version__} / {_version('triton')} / "
           f"{torch.version.cuda}")
    if device == "cuda":
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        record("environment", "GPUs", f"{len(names)}: {', '.join(names)}; capability "
               f"{'.'.join(map(str, torch.cuda.get_device_capability(0)))}")
    else:
        record("environment", "device", f"CPU dry run, {torch.get_num_threads()} threads", "dry run")
    record("environment", "spikingjelly", _version("spikingjelly") or "not installed",
           "ok" if _version("spikingjelly") else "missing")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    record("environment", "commit", commit.stdout.strip() if commit.returncode == 0 else "unknown (no .git)")


def _version(dist):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return ""


def section_build(device, skip_reason, timeout_s):
    if skip_reason:
        record("build", "pip install -e . with CUDA", f"not built: {skip_reason} (the installed build is used)",
               "skipped")
    else:
        env = dict(os.environ, STARS_FAST_BUILD_CUDA="1", MAX_JOBS=str(os.cpu_count() or 8))
        major, minor = torch.cuda.get_device_capability(0)
        env.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        took = time.perf_counter() - started
        if done.returncode != 0:
            record("build", " ".join(cmd[2:]), f"rc={done.returncode} after {took:.0f} s: {_tail(done.stderr, 12)}",
                   "FAIL")
            return
        record("build", f"STARS_FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']} "
               f"{' '.join(cmd[2:])}", f"built in {took:.0f} s")
    import stars_fast

    for backend, reason in stars_fast.available_backends(device).items():
        record("build", f"backend {backend} on {device}", reason or "usable", "ok" if not reason else "unusable")


def section_tests(dry_run, timeout_s):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real kernels on the GPU
    cmd = [sys.executable, "-m", "pytest", "tests/", "-k", "cuda or triton", "-q", "-p", "no:cacheprovider", "-rfE"]
    if dry_run:
        cmd.append("--collect-only")
    elif _version("pytest-xdist"):
        cmd += ["-n", "8"]  # Triton compiles are CPU-bound: 16 cores
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        out, ok = done.stdout + done.stderr, done.returncode == 0
    except subprocess.TimeoutExpired as expired:
        out = _text(expired.stdout) + _text(expired.stderr) + f"\nstopped after the {timeout_s:.0f} s left"
        ok = False
    summary = next((line.strip("= ") for line in reversed(out.splitlines())
                    if re.search(r"\b(passed|failed|errors?|skipped|deselected|collected|stopped)\b", line)),
                   _tail(out, 3))
    record("tests", " ".join(cmd[3:]), f"{summary} ({time.perf_counter() - started:.0f} s)",
           ("dry run" if dry_run else "ok") if ok else "FAIL")
    for line in [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))][:12]:
        record("tests", "failure", line[:300], "FAIL")


def _text(output):
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def section_lif(device, dry_run, gate_table, target):
    import stars_fast
    from user_baselines import lif_loop, spikingjelly_implementation, spikingjelly_lif

    n = 2 ** 12 if dry_run else 2 ** 23
    reps = 2 if dry_run else 10
    run_sj, sj_reason = spikingjelly_lif(2.0)
    if run_sj is None:
        record("lif", "SpikingJelly 2.0 LIFNode(step_mode='m')", sj_reason, "skipped")
    backends = [b for b in ("triton", "cuda", "cpu") if not stars_fast.available_backends(device)[b]]
    for dtype in (torch.float32, torch.bfloat16):
        for steps in (4, 32):
            case = f"T={steps} N=2^{n.bit_length() - 1} {str(dtype).removeprefix('torch.')}"
            with item_guard("lif", case):
                x = (torch.randn(steps, n, device=device) + 0.5).to(dtype)
                grad = torch.randn(steps, n, device=device).to(dtype)
                dst = torch.empty_like(x)
                copy_ms = median_ms(functools.partial(dst.copy_, x), device, reps)
                copy_gbs = 2 * x.numel() * x.element_size() / copy_ms / 1e6
                record("lif", f"{case} copy_ (bandwidth)", f"{copy_ms:.3f} ms, {copy_gbs:.0f} GB/s")
                ours = _lif_forward_backward(functools.partial(stars_fast.multistep_lif, tau=2.0), x, grad)
                variants = {f"fused-{b}": functools.partial(stars_fast.multistep_lif, tau=2.0, backend=b) for b in backends}
                if run_sj is not None:
                    variants["spikingjelly"] = run_sj
                variants["loop-eager"] = lif_loop
                for name, fn in list(variants.items()):
                    mismatch = _lif_mismatch(fn, x, grad, ours, dtype)
                    if mismatch:
                        record("lif", f"{case} {name}", mismatch, "FAIL")
                        del variants[name]
                kernels = _lif_cuda_kernels(dtype)
                for mode, elements in (("fwd+bwd", 5), ("fwd", 2)):
                    times = {name: median_ms(_lif_call(fn, x, grad, mode), device, reps) for name, fn in variants.items()}
                    for name, t in times.items():
                        gbs = elements * x.numel() * x.element_size() / t / 1e6
                        result = f"{t:.3f} ms, {gbs:.0f} GB/s = {100 * gbs / copy_gbs:.0f}% of copy"
                        status = "ok"
                        if name.startswith("fused"):
                            for baseline in ("spikingjelly", "loop-eager"):
                                if baseline in times:
                                    result += f", {times[baseline] / t:.2f}x {baseline}"
                            # GPU targets for fwd+bwd: >= 85% of copy and >= 1.3x SpikingJelly
                            sj_speedup = times["spikingjelly"] / t if "spikingjelly" in times else None
                            if mode == "fwd+bwd" and device == "cuda" and (
                                    gbs < 0.85 * copy_gbs or (sj_speedup is not None and sj_speedup < 1.3)):
                                status = "below target"
                        if name == "fused-cuda":
                            result += "; " + cuda_occupancy(gate_table, kernels[mode])
                        label = f"{case} {mode} {name}"
                        if name == "spikingjelly":
                            label += f" ({spikingjelly_implementation(x)})"
                        record("lif", label, result, status)
            if device == "cuda":
                torch.cuda.empty_cache()
        if "cuda" not in backends:  # the compile gate's prediction all the same
            record("lif", f"{str(dtype).removeprefix('torch.')} fused-cuda, not timed here",
                   cuda_occupancy(gate_table, _lif_cuda_kernels(dtype)["fwd+bwd"]), "skipped")
    if "triton" in backends:
        with item_guard("lif", "fused-triton kernels"):
            record("lif", "fused-triton kernels (registers: Triton's compile in this run)",
                   triton_occupancy("lif", target))


def _lif_cuda_kernels(dtype):
    """{mode: name patterns} of the CUDA kernels the LIF op runs for a contiguous x of `dtype` (lif_ops.cuh):
    the forward 16 bytes a thread (x is 16-byte aligned), the backward at most 4 elements a thread
    (backward_pack_width), one k for all neurons."""
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    forward = rf".*::lif_forward_kernel<{CPP_TYPES[dtype]}, float, {vec}, false>"
    backward = rf".*::lif_backward_kernel<{CPP_TYPES[dtype]}, float, {min(vec, 4)}, \d+, false>"
    return {"fwd": [forward], "fwd+bwd": [forward, backward]}


def _lif_forward_backward(fn, x, grad):
    xg = x.detach().requires_grad_(True)
    spikes = fn(xg)
    spikes.backward(grad)
    return spikes.detach(), xg.grad


def _lif_call(fn, x, grad, mode):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(x)
    else:
        def run():
            _lif_forward_backward(fn, x, grad)
    return run


def _lif_mismatch(fn, x, grad, ours, dtype):
    """'' if fn gives our spikes exactly and our grad_x within tolerance, else what differs."""
    spikes, grad_x = _lif_forward_backward(fn, x, grad)
    if not torch.equal(spikes, ours[0]):
        return f"spikes differ from stars_fast.multistep_lif at {(spikes != ours[0]).sum().item()} places"
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    try:
        torch.testing.assert_close(grad_x.float(), ours[1].float(), **tol)
    except AssertionError as error:
        return f"grad_x differs from stars_fast.multistep_lif: {str(error).splitlines()[-1]}"
    return ""


def section_stars(device, dry_run, gate_table, target):
    import stars_fast
    from torch.profiler import ProfilerActivity, profile

    from user_baselines import stars_gemm_floor, stars_gemm_operands, stars_loss_gram

    channels = (64, 128, 256, 512)
    batch = 16 if dry_run else 256
    reps = 2 if dry_run else 20
    zt = [torch.randn(batch, c, device=device) for c in channels]
    zs = [torch.randn(batch, c, device=device) for c in channels]
    backends = [b for b in ("triton", "cuda", "cpu") if not stars_fast.available_backends(device)[b]]
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU

    def step(fn):
        leaves = [z.detach().requires_grad_(True) for z in zt + zs]

        def run():
            fn(leaves[:len(zt)], leaves[len(zt):]).backward()
        return run, leaves

    ours_run, ours_leaves = step(stars_fast.stars_loss)
    ours_run()
    variants = {f"fused-{b}": functools.partial(stars_fast.stars_loss, backend=b) for b in backends}
    variants["gram-eager"] = stars_loss_gram
    times = {}
    for name, fn in variants.items():
        with item_guard("stars", f"B={batch} {name}"):
            run, leaves = step(fn)
            run()
            bad = [i for i, (a, b) in enumerate(zip(leaves, ours_leaves))
                   if not torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-7)]
            if bad:
                record("stars", f"B={batch} {name}", f"gradients {bad} differ from stars_fast.stars_loss", "FAIL")
                continue  # the next variant
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            with profile(activities=[activity]) as prof:
                run()
                if device == "cuda":
                    torch.cuda.synchronize()
            if device == "cuda":
                launches = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
                what = "CUDA kernels + memcpy/memset (torch.profiler, CUDA activity)"
            else:
                launches = [e for e in prof.events() if e.name.startswith("aten::")]
                what = "aten ops on the CPU (dry run: not launches)"
            status = "ok"
            if name == "fused-triton" and device == "cuda" and len(launches) > 3:
                status = "below target"  # target: <= 3 launches forward+backward
            record("stars", f"B={batch} fwd+bwd {name} launches", f"{len(launches)} {what}: "
                   + ", ".join(sorted({e.name[:40] for e in launches})[:8]), status)
            for leaf in leaves:
                leaf.grad = None

            def timed():
                for leaf in leaves:
                    leaf.grad = None
                run()
            times[name] = median_ms(timed, device, reps)
    stars_kernels = [rf".*::{kernel}<float>" for kernel in STARS_CUDA_KERNELS]
    operands = stars_gemm_operands(zt, zs)
    floor_ms = median_ms(lambda: stars_gemm_floor(operands), device, reps)
    record("stars", f"B={batch} GEMMs alone (u u^T, E u per side and layer)", f"{floor_ms:.3f} ms")
    for name, t in times.items():
        result = f"{t:.3f} ms = {t / floor_ms:.1f}x the GEMMs"
        status = "ok"
        if name.startswith("fused") and "gram-eager" in times:
            speedup = times["gram-eager"] / t
            result += f", {speedup:.1f}x vectorized eager"
            if device == "cuda" and speedup < 10:
                status = "below target"  # target: >= 10x a vectorized eager implementation
        if name == "fused-cuda":
            result += "; " + cuda_occupancy(gate_table, stars_kernels)
        record("stars", f"B={batch} fwd+bwd {name}", result, status)
    if "cuda" not in backends:  # the compile gate's prediction all the same
        record("stars", "fused-cuda, not timed here", cuda_occupancy(gate_table, stars_kernels), "skipped")
    if "triton" in backends:
        with item_guard("stars", "fused-triton kernels"):
            record("stars", "fused-triton kernels (registers: Triton's compile in this run)",
                   triton_occupancy("stars", target))


def section_synthesis(device, dry_run):
    import stars_fast
    from bench_synthesis_step import synthesis_step
    from stars_fast._backend import ENV_OVERRIDE

    batch, size = (2, 8) if dry_run else (256, 32)
    reps, warmup = (1, 0) if dry_run else (5, 2)
    fused = "triton" if device == "cuda" else "cpu"
    times = {}
    old = os.environ.get(ENV_OVERRIDE)
    try:
        for backend in (fused, "reference"):
            reason = stars_fast.available_backends(device)[backend]
            if reason:
                record("synthesis", f"backend {backend}", reason, "skipped")
                continue
            os.environ[ENV_OVERRIDE] = backend
            for stars in (True, False):
                label = f"resnet34->s_resnet18 B={batch} T=4 {size}x{size} {backend} STARS {'on' if stars else 'off'}"
                with item_guard("synthesis", label):
                    with synthesis_step(device, batch, stars, size) as step:
                        times[backend, stars] = median_ms(step, device, reps, warmup=warmup)
                    record("synthesis", label, f"{times[backend, stars]:.1f} ms per step")
    finally:
        if old is None:
            os.environ.pop(ENV_OVERRIDE, None)
        else:
            os.environ[ENV_OVERRIDE] = old
    for stars in (True, False):
        if (fused, stars) in times and ("reference", stars) in times:
            record("synthesis", f"reference / fused, STARS {'on' if stars else 'off'}",
                   f"{times['reference', stars] / times[fused, stars]:.2f}x"
                   + (" (reference STARS = pair-by-pair oracle)" if stars else ""))
    for backend in (fused, "reference"):
        if (backend, True) in times and (backend, False) in times:
            record("synthesis", f"extra cost of STARS on {backend}",
                   f"{times[backend, True] - times[backend, False]:.1f} ms per step")


def write_table(out_dir, device, dry_run):
    title = "CPU dry run (tiny sizes; not a measurement)" if dry_run else \
        f"GPU check on {torch.cuda.get_device_name(0)}"
    lines = [f"## {title}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{time.perf_counter() - START:.0f} s", "",
             "| section | item | result | status |", "|---|---|---|---|"]
    lines += [f"| {s} | {i} | {r} | {st} |" for s, i, r, st in ROWS]
    text = "\n".join(lines) + "\n"
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "gpu_check.md")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    print(text)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="run every section on the CPU at tiny sizes")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_check.md ($OUT)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="start no section after this many seconds")
    parser.add_argument("--skip-build", action="store_true", help="use the installed build")
    args = parser.parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device visible: run on the GPU machine, or pass --cpu-dry-run")
    device = "cpu" if args.cpu_dry_run else "cuda"
    dry = args.cpu_dry_run
    major, minor = (9, 0) if dry else torch.cuda.get_device_capability(0)
    target = 10 * major + minor
    background = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    gate_table = background.submit(cuda_compile_gate, target)  # nvcc runs beside the build and the timings
    with guarded("environment", args.budget_s) as go:
        if go:
            section_environment(device)
    with guarded("build", args.budget_s) as go:
        if go:
            skip = "CPU dry run" if dry else ("--skip-build" if args.skip_build else "")
            section_build(device, skip, timeout_s=240)
    with guarded("lif", args.budget_s) as go:
        if go:
            section_lif(device, dry, gate_table, target)
    with guarded("stars", args.budget_s) as go:
        if go:
            section_stars(device, dry, gate_table, target)
    with guarded("synthesis", args.budget_s) as go:
        if go:
            section_synthesis(device, dry)
    with guarded("tests", args.budget_s) as go:  # last: it gets the time that is left
        if go:
            section_tests(dry, timeout_s=max(60.0, args.budget_s - (time.perf_counter() - START)))
    write_table(args.out, device, dry)
    return 1 if any(status == "FAIL" for *_, status in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
