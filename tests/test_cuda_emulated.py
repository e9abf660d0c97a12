"""The CUDA STARS ops executed on the CPU: their host code (csrc/cuda/stars_ops.cuh) and kernels
(csrc/cuda/stars_kernels.cuh), unchanged, built by the host compiler over our CUDA emulation
(csrc/cuda/emulation/cuda_on_host.h: one host thread per CUDA thread, blocks one after another), on
CPU tensors, against stars_fast.reference, torch.quantile and the oracles of test_stars.py, and their
launch count; the emulation's own shuffles, shared memory, atomics and fault reports too. The extension
is built once into ~/.cache/stars_fast/cuda_emulated (cold: about 15 s on 2 cores; rebuilt when a
source or header changes). One host thread per CUDA thread is slow: the shapes are small, C = 512 only at B = 33.

A kernel that hangs (a deadlock the emulation does not report) ends the run with every thread's
traceback after cuda_emulation.HANG_TIMEOUT_S, rather than stalling it."""
import pytest
import torch

from stars_fast import reference

import cuda_emulation
from test_stars import SILENT_CASES, _degenerate_teacher_oracle, _rca_oracle, _silent_case

pytestmark = pytest.mark.cuda_emulated

DEFAULT_QUANTILES = (0.6, 0.7, 0.8, 0.9, 0.95)
TOL = {torch.float32: dict(rtol=2e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


@pytest.fixture(scope="module")
def emulated():
    return cuda_emulation.build("stars_cuda_emulated", ["stars_emulated.cpp", "emulator_checks.cpp"])


@pytest.fixture(autouse=True)
def _hang_guard(emulated):
    yield from cuda_emulation.hang_guard()


def _emulated_loss(emulated, zt, zs, quantiles=DEFAULT_QUANTILES, thresholds=None, delta=0.5, weights=None,
                   lambda_rca=1.0, lambda_tar=1.0, normalize=None, eps=0.0):
    """As stars_fast.stars_loss with return_parts over the emulated op: (total, rca, tar, d total/d z_teacher,
    d total/d z_student)."""
    weights = [1.0] * len(zt) if weights is None else list(weights)
    w_sum = sum(weights)
    total, parts, grad_t, grad_s = emulated.stars_loss_fused(
        zt, zs, list(quantiles), None if thresholds is None else list(thresholds), normalize == "teacher",
        [lambda_rca * w / w_sum for w in weights], [lambda_tar * w / w_sum for w in weights], delta, eps)
    rca, tar = (parts * parts.new_tensor(weights)[:, None] / w_sum).sum(dim=0)
    return total, rca, tar, grad_t, grad_s


def _reference_loss(zt, zs, **options):
    """stars_fast.reference's (total, rca, tar, d total/d z_teacher, d total/d z_student)."""
    zt = [z.clone().requires_grad_(True) for z in zt]
    zs = [z.clone().requires_grad_(True) for z in zs]
    total, rca, tar = reference.stars_loss(zt, zs, **options)
    total.backward()
    return total.detach(), rca.detach(), tar.detach(), [z.grad for z in zt], [z.grad for z in zs]


def _features(batch, teacher_channels, student_channels, dtype):
    zt = [(torch.randn(batch, c) + 0.3).to(dtype) for c in teacher_channels]
    zs = [(torch.randn(batch, c) * 0.7).to(dtype) for c in student_channels]
    return zt, zs


CASES = [
    dict(batch=2, tc=(8,), sc=(8,), options={}),
    dict(batch=33, tc=(16, 512), sc=(24, 512), options=dict(quantiles=(0.5, 0.9))),
    dict(batch=33, tc=(8, 16, 32), sc=(8, 16, 32), options=dict(normalize="teacher", weights=(1.0, 2.0, 0.5))),
    dict(batch=256, tc=(8,), sc=(12,), options=dict(quantiles=(0.6, 0.7, 0.8, 0.9, 0.95), lambda_rca=0.5,
                                                    lambda_tar=2.0, normalize="teacher")),
    dict(batch=17, tc=(10, 24), sc=(6, 20), options=dict(thresholds=(-8.0, 0.0, 8.0), delta=0.25)),
    # B = 100: the GEMM's 16 x 16 tiles end in partial ones; 9 thresholds
    dict(batch=100, tc=(24, 40), sc=(32, 16), options=dict(quantiles=tuple(i / 10 for i in range(1, 10)))),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c['batch']}-C{max(c['tc'])}-{'-'.join(c['options'])}")
def test_matches_reference(emulated, dtype, case):
    zt, zs = _features(case["batch"], case["tc"], case["sc"], dtype)
    got = _emulated_loss(emulated, zt, zs, **case["options"])
    want = _reference_loss(zt, zs, **case["options"])
    for name, g, r in zip(("total", "rca", "tar"), got[:3], want[:3]):
        assert g.dtype == dtype
        torch.testing.assert_close(g, r, **TOL[dtype], msg=lambda m: f"{name}: {m}")
    for side, gs, rs in (("teacher", got[3], want[3]), ("student", got[4], want[4])):
        for layer, (g, r) in enumerate(zip(gs, rs)):
            assert g.dtype == dtype
            torch.testing.assert_close(g, r, **TOL[dtype], msg=lambda m: f"grad {side}[{layer}]: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_features(emulated, dtype):
    """Half features: the loss in fp32 (as the reference on the same values in fp32), the gradients in
    the features' dtype."""
    zt, zs = _features(9, (6, 40), (5, 33), dtype)
    total, rca, tar, grad_t, grad_s = _emulated_loss(emulated, zt, zs, normalize="teacher")
    want = _reference_loss([z.float() for z in zt], [z.float() for z in zs], normalize="teacher")
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, want[0], **TOL[torch.float32])
    for g, r in zip(grad_t + grad_s, want[3] + want[4]):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), r.to(dtype).float(), rtol=1e-2, atol=1e-2 * r.abs().max().item())


@pytest.mark.parametrize("scale", [1.0, 1e-20, 1e20])
@pytest.mark.parametrize("case", SILENT_CASES)
def test_rca_silent_rows(emulated, case, scale):
    """As test_stars.test_rca_silent_rows: rows at most 1e-3 x their side's largest norm leave the pairs and
    get no RCA gradient; L_RCA is Eq. 14 over the active rows at any scale."""
    zt, zs, active = _silent_case(case)
    want = _rca_oracle(zt, zs, active)
    ref = _reference_loss([zt], [zs], lambda_tar=0.0)
    total, rca, _, grad_t, grad_s = _emulated_loss(emulated, [zt * scale], [zs * scale], lambda_tar=0.0)
    assert rca.item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert total.item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    silent = [i for i in range(zt.shape[0]) if i not in active]
    for got, want_grad in ((grad_t[0], ref[3][0]), (grad_s[0], ref[4][0])):
        assert torch.isfinite(got).all()
        assert (got[silent] == 0).all(), "a silent row got an RCA gradient"
        peak = want_grad.abs().max().item()
        torch.testing.assert_close(got.double() * scale, want_grad.double(), rtol=1e-4, atol=1e-5 * max(peak, 1e-30))


@pytest.mark.parametrize("scale", [1.0, 1e-20, 1e20])
@pytest.mark.parametrize("case", ["constant_teacher", "silent_student", "all_zero_teacher"])
def test_normalize_with_a_teacher_without_spread(emulated, case, scale):
    """As test_stars.test_normalize_with_a_teacher_without_spread: the std floored at 1e-3 rms(zT) (1 for an
    all-zero teacher), so p_T = 1/2 and L_TAR = mean_m (mean sigmoid(zn_S / delta) - 1/2)^2, gradients
    bounded by 0.5 / (s delta B C) and as the reference's."""
    delta, quantiles = 0.5, (0.6, 0.9)
    zt, zs, std_floor, scale, want = _degenerate_teacher_oracle(case, scale, delta)
    options = dict(normalize="teacher", lambda_rca=0.0, quantiles=quantiles, delta=delta)
    _, _, tar, grad_t, grad_s = _emulated_loss(emulated, [zt * scale], [zs * scale], **options)
    assert tar.item() == pytest.approx(want, rel=1e-5, abs=1e-9)
    for grad, z in ((grad_t[0], zt), (grad_s[0], zs)):
        bound = 0.5 / (std_floor * scale * delta * z.numel())
        assert torch.isfinite(grad).all() and grad.abs().max().item() <= bound * (1 + 1e-4)
    ref = _reference_loss([zt * scale], [zs * scale], **options)
    for got, expected in zip(grad_t + grad_s, ref[3] + ref[4]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("scale", [1e-20, 1e20])
@pytest.mark.parametrize("normalize", ["teacher", None])
def test_tiny_and_huge_features(emulated, normalize, scale):
    """Features at 1e20 (squares overflow float) and 1e-20 (squares underflow to subnormals): the norms and
    the std are rescaled, so L_RCA, and with normalize='teacher' the whole loss, is the unit-scale
    reference's, and the gradients are 1/scale times its gradients."""
    zt, zs = _features(8, (16, 40), (12, 36), torch.float32)
    options = dict(normalize="teacher") if normalize else dict(lambda_tar=0.0)
    unit = _reference_loss(zt, zs, **options)
    total, rca, tar, grad_t, grad_s = _emulated_loss(emulated, [z * scale for z in zt], [z * scale for z in zs],
                                                     **options)
    assert unit[1] > 0 and (normalize is None or unit[2] > 0)
    invariant = (total, rca, tar) if normalize else (total, rca)  # raw L_TAR (weight 0 here) does change
    for got, want in zip(invariant, unit):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    for g, r in zip(grad_t + grad_s, unit[3] + unit[4]):
        peak = r.abs().max()
        torch.testing.assert_close(g * scale / peak, r / peak, rtol=1e-4, atol=1e-5)


def test_one_huge_feature(emulated):
    """One feature of 1e30 per side: its row's norm is 1e30, not inf. Oracle: the reference in float64."""
    zt, zs = _features(8, (16,), (12,), torch.float32)
    zt[0][1, 2], zs[0][3, 4] = 1e30, -1e30
    want = _reference_loss([z.double() for z in zt], [z.double() for z in zs])
    got = _emulated_loss(emulated, zt, zs)
    for g, r in zip(got[:3], want[:3]):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-7)
    for g, r in zip(got[3] + got[4], want[3] + want[4]):
        peak = r.abs().max()
        torch.testing.assert_close(g.double() / peak, r / peak, rtol=1e-4, atol=1e-5)


def test_zero_rows_and_nan(emulated):
    """Zero rows leave a finite loss and gradient; a NaN feature on either side makes the loss NaN (with
    normalize='teacher', L_TAR alone too)."""
    zt, zs = _features(6, (4,), (5,), torch.float32)
    zt[0][2] = 0.0
    zs[0][3] = 0.0
    total, _, _, grad_t, _ = _emulated_loss(emulated, zt, zs)
    assert torch.isfinite(total) and torch.isfinite(grad_t[0]).all()
    zs[0][1, 1] = float("nan")
    assert torch.isnan(_emulated_loss(emulated, zt, zs)[0])
    zs[0][1, 1] = 0.5
    zt[0][0, 0] = float("nan")
    assert torch.isnan(_emulated_loss(emulated, zt, zs)[0])
    for thresholds in (None, (0.0, 1.0)):  # NaN moments: NaN shift and scale, whatever the thresholds
        assert torch.isnan(_emulated_loss(emulated, zt, zs, normalize="teacher", lambda_rca=0.0,
                                          thresholds=thresholds)[0])


def test_quantile_rank_in_double_as_torch_quantile(emulated):
    """n = 11, q = 0.7: the rank q (n - 1) in double (6.99999988 for the fp32 q) puts the threshold a hair
    below the 8th value (999999.875), as torch.quantile; an fp32 rank would give 1e6."""
    zt = [torch.tensor([0.0] * 7 + [1e6] * 4)[:, None]]
    zs = [torch.linspace(999999.0, 1000001.0, 11)[:, None]]
    want = _reference_loss(zt, zs, quantiles=(0.7,), lambda_rca=0.0)
    got = _emulated_loss(emulated, zt, zs, quantiles=(0.7,), lambda_rca=0.0)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-7)
    for dtype in (torch.float32, torch.float64):
        z = zt[0].reshape(-1).to(dtype)
        assert emulated.quantiles(z, [0.7]).item() == torch.quantile(z, 0.7).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_quantiles(emulated, dtype):
    z = torch.randn(7, 13).to(dtype)
    q = [0.0, 0.1, 0.5, 0.7, 0.95, 1.0]
    got = emulated.quantiles(z, q)
    assert got.dtype == dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    want = torch.quantile(z.reshape(-1).to(compute), torch.tensor(q, dtype=compute)).to(dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    z.view(-1)[5] = float("nan")
    assert emulated.quantiles(z, q).isnan().all()


def _torch_quantiles(z, q):
    """torch.quantile(z.flatten(), q) in z's compute dtype (fp32 for half), as the op's oracle."""
    compute = torch.float64 if z.dtype == torch.float64 else torch.float32
    return torch.quantile(z.reshape(-1).to(compute), torch.tensor(q, dtype=compute)).to(z.dtype)


def _quantile_grid(n):
    """q at every rank, halfway between ranks, just off them, 0 and 1: hi = lo, a tie spanning lo and hi,
    lo the last of its ties (hi the next key up)."""
    q = [r / (n - 1) for r in range(n)] + [(r + 0.5) / (n - 1) for r in range(n - 1)] if n > 1 else [0.0, 1.0]
    return sorted(set(q + [0.0, 1.0, 0.3, 0.7, 1e-7, 1 - 1e-7]))


TIE_CASES = {  # at most 29 values: _quantile_grid's q then take one launch
    "all_equal": lambda: torch.full((29,), 2.5),
    "two_values": lambda: torch.tensor([0.0] * 4 + [5.0] * 5 + [9.0]),
    "many_ties": lambda: torch.randint(-2, 3, (29,)).float(),
    "signed_zeros": lambda: torch.tensor([-0.0, 0.0, -0.0, 0.0, -1.0, 1.0, 0.0, -0.0, -2.0]),
    "negative": lambda: -torch.rand(29) * 1e3 - 5,
    "tiny_and_huge": lambda: torch.tensor([1e-30, -1e-30, 3e38, -3e38, 1e-45, 0.0, 7.0]),
    "single_value": lambda: torch.tensor([-4.25]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(TIE_CASES))
def test_quantiles_with_ties_and_signs(emulated, case, dtype):
    """The selection against torch.quantile, bit for bit: ties (the rank inside a run of equal keys, or the
    last of one, so that the upper rank is the next key), -0.0 and +0.0 (equal values, distinct keys),
    negative, tiny and huge values, q = 0 and 1, n = 1."""
    z = TIE_CASES[case]().to(dtype)
    q = _quantile_grid(z.numel())
    torch.testing.assert_close(emulated.quantiles(z, q), _torch_quantiles(z, q), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quantiles_many_q_and_values(emulated, dtype):
    """70 quantiles (two launches of at most 64) of 20000 values, bit for bit: torch.quantile's weight and
    its fused lerp (exact in one rounding)."""
    z = torch.randn(20000).to(dtype) * 3 - 1
    q = [0.0, 1.0, 0.5] + torch.rand(67, dtype=torch.float64).tolist()
    torch.testing.assert_close(emulated.quantiles(z, q), _torch_quantiles(z, q), rtol=0, atol=0)


def test_quantiles_of_infinities(emulated):
    """+-inf sort to the ends: quantiles between them and finite values are infinite; lerp(inf, inf) is NaN,
    as torch.quantile's."""
    z = torch.tensor([float("inf"), 1.0, -float("inf"), 2.0, float("inf")])
    q = _quantile_grid(5)
    torch.testing.assert_close(emulated.quantiles(z, q), _torch_quantiles(z, q), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("normalize", [None, "teacher"])
def test_tied_teacher_thresholds(emulated, normalize):
    """A teacher with few distinct values (thresholds on and between ties) and -0.0 / +0.0 in both nets:
    the loss and gradients as the reference's."""
    zt = [torch.randint(-2, 3, (24, 10)).float(), torch.full((24, 6), -0.0)]
    zt[1][::2] = 0.0
    zs = [torch.randn(24, 7), torch.randn(24, 5)]
    zs[1][3] = -0.0
    options = dict(quantiles=(0.0, 0.25, 0.5, 0.6, 0.9, 1.0), normalize=normalize)
    got = _emulated_loss(emulated, zt, zs, **options)
    want = _reference_loss(zt, zs, **options)
    for g, r in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, r, **TOL[torch.float32])
    for g, r in zip(got[3] + got[4], want[3] + want[4]):
        torch.testing.assert_close(g, r, **TOL[torch.float32])


def test_more_layers_than_one_launch_takes(emulated):
    """17 layers: two groups of launches (at most 16 layers each), the second adding to the first's total."""
    zt, zs = _features(4, (3,) * 17, (2,) * 17, torch.float64)
    weights = [1.0 + i / 17 for i in range(17)]
    got = _emulated_loss(emulated, zt, zs, weights=weights, normalize="teacher")
    want = _reference_loss(zt, zs, weights=weights, normalize="teacher")
    for g, r in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, r, **TOL[torch.float64])
    for g, r in zip(got[3] + got[4], want[3] + want[4]):
        torch.testing.assert_close(g, r, **TOL[torch.float64])


def test_at_most_64_thresholds(emulated):
    zt, zs = _features(4, (3,), (3,), torch.float32)
    with pytest.raises(RuntimeError, match="at most 64 thresholds"):
        _emulated_loss(emulated, zt, zs, quantiles=[0.5] * 65)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (2, 70, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_pool_mean(emulated, shape, dtype):
    """[T, R, S] -> the mean over T and S of each of the R rows (one warp per row, R over several blocks)."""
    x = torch.randn(shape).to(dtype)
    got = emulated.pool_mean(x)
    want = x.double().mean(dim=(0, 2))
    assert got.dtype == dtype
    tol = TOL.get(dtype, dict(rtol=1e-2, atol=1e-2))
    torch.testing.assert_close(got.double(), want.to(dtype).double(), **tol)


MAX_LAUNCHES = 5  # stars_loss_fused for up to 16 layers; quantiles: 1
NON_MOVING = {  # aten ops that allocate, alias or convert nothing; a conversion's copy is its own child op
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::_unsafe_view", "aten::reshape",
    "aten::as_strided", "aten::slice", "aten::select", "aten::narrow", "aten::detach", "aten::alias",
    "aten::contiguous", "aten::to", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg",
}


def _launches(emulated, fn):
    """(our kernel launches, the outermost aten ops that move data) of fn()."""
    before = emulated.launch_count()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    launches = emulated.launch_count() - before

    def moves(event):
        return event.name.startswith("aten::") and event.name not in NON_MOVING

    def outermost(event):
        parent = event.cpu_parent
        while parent is not None:
            if moves(parent):
                return False
            parent = parent.cpu_parent
        return True

    return launches, [e.name for e in prof.events() if moves(e) and outermost(e)]


@pytest.mark.parametrize("thresholds", [None, (-1.0, 0.5)], ids=["quantiles", "fixed"])
@pytest.mark.parametrize("normalize", [None, "teacher"], ids=["raw", "teacher-normalized"])
def test_launch_budget(emulated, normalize, thresholds):
    """One stars_loss_fused call (forward and gradients) for 4 float32 layers: at most MAX_LAUNCHES of our
    kernels and no aten op that moves data (the thresholds and moments are ours, on the device)."""
    zt, zs = _features(8, (8, 16, 32, 64), (8, 16, 32, 64), torch.float32)
    launches, aten = _launches(emulated, lambda: emulated.stars_loss_fused(
        zt, zs, list(DEFAULT_QUANTILES), thresholds, normalize == "teacher", [0.25] * 4, [0.25] * 4, 0.5, 0.0))
    assert launches <= MAX_LAUNCHES and aten == [], (launches, aten)


def test_quantiles_launch_budget(emulated):
    z = torch.randn(1000)
    launches, aten = _launches(emulated, lambda: emulated.quantiles(z, list(DEFAULT_QUANTILES)))
    assert launches == 1 and aten == [], (launches, aten)


@pytest.mark.parametrize("blocks", [1, 3])
def test_emulated_atomic_add(emulated, blocks):
    """64 threads, 16 on each of 4 shared bins, 50 adds each: every bin ends at 800 and hands out each of
    0..799 exactly once (one atomic step per add)."""
    counts, olds = emulated.emulated_atomic_add(blocks, 50)
    assert counts == [16 * 50] * (4 * blocks)
    olds = torch.tensor(olds).reshape(blocks, 64, 50)
    for b in range(blocks):
        for bin_ in range(4):
            assert sorted(olds[b, bin_::4].flatten().tolist()) == list(range(16 * 50))


def _shuffle_expectations(width):
    """Per thread of two warps: what shuffles_kernel (emulator_checks.cpp) must read, from the rules of the
    CUDA programming guide."""
    rows = []
    for thread in range(64):
        lane, base = thread % 32, 100 * (thread // 32)
        group = lane // width * width

        def value(source_lane):
            return base + source_lane

        xor_source = lane ^ 17
        rows.append([
            value(group + 3 % width),
            value(lane - 2) if lane % width >= 2 else value(lane),
            value(lane + 5) if lane % width + 5 < width else value(lane),
            value(xor_source) if xor_source < group + width else value(lane),  # a later group: own value
            value(15 if lane < 16 else 16),
        ])
    return rows


@pytest.mark.parametrize("width", [32, 16, 8])
def test_emulated_shuffles(emulated, width):
    got = emulated.emulated_shuffles(width)
    assert [got[5 * t:5 * t + 5] for t in range(64)] == _shuffle_expectations(width)


def test_emulated_shared_memory_is_per_block(emulated):
    got = emulated.emulated_reverse_in_shared(3)
    assert got == [1000 * b + 63 - t for b in range(3) for t in range(64)]


@pytest.mark.parametrize("kernel, message", [
    ("return_before_syncthreads", "returned"),
    ("divergent_syncthreads", "different __syncthreads"),
    ("shuffle_with_a_returned_lane", "returned"),
    ("shuffle_outside_its_mask", "leaves out its own lane"),
    ("too_many_threads", "threads per block"),
])
def test_emulation_reports_cuda_bugs_instead_of_hanging(emulated, kernel, message):
    with pytest.raises(RuntimeError, match=message):
        emulated.launch_faulty_kernel(kernel)
