"""Launch budget of the Triton STARS loss (each launch costs fixed time on a GPU): one STARS forward +
backward (4 layers C = 64..512, B = 256, default quantiles, with and without normalize="teacher") on
the triton backend makes at most 3 launches, counted on the CPU.

A launch is a Triton kernel launch (counted by a hook on the launcher) or an aten op that moves data
(torch.profiler; the outermost such op counts once, e.g. one _foreach_mul, one copy behind a .to).
Ops that only allocate or make views (empty, view, contiguous of a contiguous tensor, ...) move nothing.
At B = 256 the interpreter would take many minutes per launch, so the hook counts the launches
without running them there (their arguments and grid are built, the outputs stay uninitialized);
a small case runs the kernels too and checks the same count and the loss against the reference.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import stars_fast  # noqa: E402
from stars_fast import reference  # noqa: E402

MAX_LAUNCHES = 3
NON_MOVING = {  # aten ops that allocate or alias but move no data
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::as_strided", "aten::slice", "aten::select",
    "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::t", "aten::transpose", "aten::permute",
    "aten::detach", "aten::detach_", "aten::alias", "aten::contiguous", "aten::lift_fresh", "aten::resolve_conj",
    "aten::resolve_neg", "aten::result_type", "aten::promote_types", "aten::is_nonzero", "aten::set_", "aten::requires_grad_",
}
# Profiler range around an executed Triton launch: the interpreter's own copies inside it belong to the
# launch (counted once by the hook), not to the op.
LAUNCH_RANGE = "triton_launch"


def _data_moving_ops(prof) -> list:
    """Names of the outermost aten ops (CPU events) that move data, in order."""
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU),
                    key=lambda e: (e.time_range.start, -e.time_range.end))
    counted, stack = [], []  # stack of (end time, counted) of the enclosing aten ops
    for e in events:
        launch = e.name == LAUNCH_RANGE
        if not (launch or e.name.startswith("aten::")):
            continue
        while stack and stack[-1][0] <= e.time_range.start:
            stack.pop()
        inside_counted = any(c for _, c in stack)
        moves = launch or e.name not in NON_MOVING
        if moves and not inside_counted and not launch:
            counted.append(e.name)
        stack.append((e.time_range.end, moves or inside_counted))
    return counted


class _LaunchCounter:
    """Counts Triton launches; with run=False the kernels are not executed."""

    def __init__(self, monkeypatch, run: bool):
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        self.names = []
        for cls in (JITFunction, InterpretedFunction):
            monkeypatch.setattr(cls, "run", self._counting(cls.run, run))

    def _counting(self, original, execute: bool):
        def counted_run(fn_self, *args, **kwargs):
            self.names.append(getattr(fn_self, "__name__", None) or fn_self.fn.__name__)
            if not execute:
                return None
            with torch.profiler.record_function(LAUNCH_RANGE):
                return original(fn_self, *args, **kwargs)

        return counted_run


def _features(batch, channels, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    zt = [(torch.randn(batch, c, generator=g) * 1.5 + 0.2).to(device).requires_grad_() for c in channels]
    zs = [torch.randn(batch, c, generator=g).to(device).requires_grad_() for c in channels]
    return zt, zs


def _count_launches(monkeypatch, batch, channels, normalize, run):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    zt, zs = _features(batch, channels, device)
    small_t, small_s = _features(4, [3], device)
    stars_fast.stars_loss(small_t, small_s, backend="triton")  # warm-up: imports, first-call set-up
    seed = torch.ones((), device=device)  # grad_output, made before counting (backward() would fill one)
    counter = _LaunchCounter(monkeypatch, run)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss = stars_fast.stars_loss(zt, zs, normalize=normalize, backend="triton")
        loss.backward(seed)
    aten = _data_moving_ops(prof)
    return counter.names + aten, loss, zt, zs


@pytest.mark.parametrize("normalize", [None, "teacher"], ids=["raw", "teacher-normalized"])
def test_stars_forward_backward_launches(monkeypatch, normalize):
    launches, _, zt, zs = _count_launches(monkeypatch, 256, [64, 128, 256, 512], normalize, run=False)
    assert len(launches) <= MAX_LAUNCHES, f"{len(launches)} launches (at most {MAX_LAUNCHES}): {launches}"
    assert all(z.grad is not None for z in zt + zs)


def test_stars_launches_small_case_runs_and_matches(monkeypatch):
    """The same count with the kernels executed, and their loss equal to the reference's."""
    launches, loss, zt, zs = _count_launches(monkeypatch, 17, [6, 5, 9, 4], "teacher", run=True)
    assert len(launches) <= MAX_LAUNCHES, f"{len(launches)} launches (at most {MAX_LAUNCHES}): {launches}"
    want = reference.stars_loss([z.detach().double() for z in zt], [z.detach().double() for z in zs],
                                normalize="teacher")[0]
    torch.testing.assert_close(loss.detach().double(), want, rtol=1e-5, atol=1e-7)
