"""The STARS loss and pooling through the public API against stars_fast.reference (written pair
by pair from Eqs. 14-17) and hand-computed values."""
import pytest
import torch
import torch.nn.functional as F

import stars_fast
from stars_fast import reference

from conftest import require_backend

FUSED = ["cpu", "triton"]  # triton runs under TRITON_INTERPRET=1 without a GPU (see conftest.py)
EXTENSION = ["cpu"]  # float64 (gradcheck) and torch.compile checks: Triton's interpreter is fp32-exact only
TOL = {torch.float32: dict(rtol=2e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _features(batch, teacher_channels, student_channels, dtype=torch.float32):
    zt = [torch.randn(batch, c, dtype=dtype) + 0.3 for c in teacher_channels]
    zs = [torch.randn(batch, c, dtype=dtype) * 0.7 for c in student_channels]
    return zt, zs


def _loss_and_grads(backend, zt, zs, **options):
    zt = [z.clone().requires_grad_(True) for z in zt]
    zs = [z.clone().requires_grad_(True) for z in zs]
    total, rca, tar = stars_fast.stars_loss(zt, zs, backend=backend, return_parts=True, **options)
    (total * 1.7).backward()
    return total.detach(), rca.detach(), tar.detach(), [z.grad for z in zt], [z.grad for z in zs]


CASES = [
    dict(batch=2, tc=(8,), sc=(8,), options={}),
    dict(batch=33, tc=(16, 24), sc=(20, 12), options=dict(quantiles=(0.5, 0.9))),
    dict(batch=33, tc=(8, 16, 32), sc=(8, 16, 32), options=dict(normalize="teacher", weights=(1.0, 2.0, 0.5))),
    dict(batch=256, tc=(16, 32, 64, 128), sc=(16, 48, 64, 96),
         options=dict(quantiles=(0.6, 0.7, 0.8, 0.9, 0.95), lambda_rca=0.5, lambda_tar=2.0)),
    dict(batch=17, tc=(10, 10), sc=(6, 14), options=dict(thresholds=(-0.5, 0.0, 0.7), delta=0.25)),
    dict(batch=17, tc=(10,), sc=(9,), options=dict(thresholds=(0.0, 1.0), normalize="teacher", quantiles=(0.2, 0.4, 0.6, 0.8))),
    # thresholds too far apart for one shared exp (|theta_m - theta_ref| / delta > 20): a sigmoid each
    dict(batch=17, tc=(10, 24), sc=(6, 20), options=dict(thresholds=(-8.0, 0.0, 8.0), delta=0.25)),
    # B = 100: the CPU op's Gram strips of 64 rows end in a partial one (36 rows)
    dict(batch=100, tc=(24, 40), sc=(32, 16), options={}),
    # more than 8 thresholds: the CPU kernels' runtime-M path
    dict(batch=33, tc=(16, 40), sc=(24, 16), options=dict(quantiles=tuple(i / 10 for i in range(1, 10)))),
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c['batch']}-L{len(c['tc'])}-{'-'.join(c['options'])}")
def test_matches_reference(backend, dtype, case):
    require_backend(backend)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take fp32/fp16/bf16")
    zt, zs = _features(case["batch"], case["tc"], case["sc"], dtype)
    ref = _loss_and_grads("reference", zt, zs, **case["options"])
    got = _loss_and_grads(backend, zt, zs, **case["options"])
    tol = TOL[dtype]
    for name, g, r in zip(("total", "rca", "tar"), got[:3], ref[:3]):
        torch.testing.assert_close(g, r, **tol, msg=lambda m: f"{name}: {m}")
    for side, gs, rs in (("teacher", got[3], ref[3]), ("student", got[4], ref[4])):
        for layer, (g, r) in enumerate(zip(gs, rs)):
            assert g.dtype == dtype
            torch.testing.assert_close(g, r, **tol, msg=lambda m: f"grad {side}[{layer}]: {m}")


def test_reference_hand_computed():
    """B=2: one pair. Teacher rows orthogonal (cos 0), student rows parallel (cos 1) -> l_rca = 1.
    Fixed threshold 0 with delta 1: p = mean sigmoid(z)."""
    zt = [torch.tensor([[1.0, 0.0], [0.0, 1.0]])]
    zs = [torch.tensor([[2.0, 2.0, 0.0], [1.0, 1.0, 0.0]])]
    total, rca, tar = reference.stars_loss(zt, zs, thresholds=(0.0,), delta=1.0)
    assert rca.item() == pytest.approx(1.0)
    p_t = torch.sigmoid(zt[0]).mean()
    p_s = torch.sigmoid(zs[0]).mean()
    assert tar.item() == pytest.approx(((p_s - p_t) ** 2).item())
    assert total.item() == pytest.approx(rca.item() + tar.item())
    # The Gram-matrix form gives the same RCA: sum over i != j of D^2 / (B (B - 1)).
    zt, zs = _features(9, (5,), (7,))
    g_t = F.normalize(zt[0]) @ F.normalize(zt[0]).T
    g_s = F.normalize(zs[0]) @ F.normalize(zs[0]).T
    _, rca, _ = reference.stars_loss(zt, zs)
    assert rca.item() == pytest.approx(((g_s - g_t) ** 2).sum().item() / (9 * 8), rel=1e-5)


@pytest.mark.parametrize("backend", ["reference"] + EXTENSION)
@pytest.mark.parametrize("options", [{}, dict(normalize="teacher", quantiles=(0.3, 0.75)),
                                     dict(thresholds=(0.0, 0.5), weights=(2.0, 1.0))])
def test_gradcheck(backend, options):
    """float64 gradcheck. Quantile thresholds and normalization statistics are constants of the
    teacher by definition (no gradient through them), while finite differences on z_teacher would
    move them; so z_teacher is checked only with fixed thresholds and no normalization."""
    require_backend(backend)
    teacher_is_checked = "thresholds" in options and "normalize" not in options
    zt = [torch.randn(5, 4, dtype=torch.float64, requires_grad=teacher_is_checked),
          torch.randn(5, 3, dtype=torch.float64, requires_grad=teacher_is_checked)]
    zs = [torch.randn(5, 6, dtype=torch.float64, requires_grad=True),
          torch.randn(5, 3, dtype=torch.float64, requires_grad=True)]

    def fn(a, b, c, d):
        return stars_fast.stars_loss([a, b], [c, d], backend=backend, **options)

    assert torch.autograd.gradcheck(fn, (*zt, *zs), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_bad_inputs(backend):
    require_backend(backend)
    zt, zs = _features(4, (3, 5), (3, 5))
    cases = [
        (([zt[0]], zs), ValueError, "layers"),
        (([torch.randn(1, 3)], [torch.randn(1, 3)]), ValueError, "at least 2"),
        (([torch.randn(4, 3)], [torch.randn(5, 3)]), ValueError, "batch"),
        (([torch.randn(4, 3, 2)], [torch.randn(4, 3)]), ValueError, "2-D"),
        (([torch.ones(4, 3, dtype=torch.int32)], [torch.randn(4, 3)]), TypeError, "floating"),
        ((zt[0], zs[0]), TypeError, "lists"),
        (([], []), ValueError, "at least one layer"),
    ]
    for (a, b), exc, match in cases:
        with pytest.raises(exc, match=match):
            stars_fast.stars_loss(a, b, backend=backend)
    with pytest.raises(ValueError, match="quantiles"):
        stars_fast.stars_loss(zt, zs, quantiles=(0.5, 1.5), backend=backend)
    with pytest.raises(ValueError, match="weights"):
        stars_fast.stars_loss(zt, zs, weights=(1.0,), backend=backend)
    with pytest.raises(ValueError, match="delta"):
        stars_fast.stars_loss(zt, zs, delta=0.0, backend=backend)
    with pytest.raises(ValueError, match="normalize"):
        stars_fast.stars_loss(zt, zs, normalize="student", backend=backend)
    with pytest.raises(ValueError, match="same batch size"):
        stars_fast.stars_loss([zt[0], torch.randn(5, 5)], [zs[0], torch.randn(5, 5)], backend=backend)
    for eps in (-1e-12, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps"):
            stars_fast.stars_loss(zt, zs, eps=eps, backend=backend)
    for delta in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="delta"):
            stars_fast.stars_loss(zt, zs, delta=delta, backend=backend)
    for weights in ((float("nan"), 1.0), (float("inf"), 1.0), (-1.0, 2.0), (0.0, 0.0)):
        with pytest.raises(ValueError, match="weights"):
            stars_fast.stars_loss(zt, zs, weights=weights, backend=backend)
    for name in ("lambda_rca", "lambda_tar"):
        with pytest.raises(ValueError, match=name):
            stars_fast.stars_loss(zt, zs, backend=backend, **{name: float("nan")})


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("options", [dict(weights=(2.0, 1.0), lambda_tar=0.5), dict(normalize="teacher")])
def test_double_backward(backend, options):
    """create_graph=True: the gradient is differentiable, and its derivative (a Hessian-vector
    product, a gradient penalty) is the reference's, never zeros."""
    require_backend(backend)
    zt, zs = _features(6, (4, 7), (5, 3))

    def grads_and_hvp(backend):
        t = [z.clone().requires_grad_(True) for z in zt]
        s = [z.clone().requires_grad_(True) for z in zs]
        loss = stars_fast.stars_loss(t, s, backend=backend, **options)
        g = torch.autograd.grad(loss, s + t, create_graph=True)
        penalty = sum((gi * gi).sum() for gi in g)
        (loss + 10 * penalty).backward()
        return [gi.detach() for gi in g], [z.grad for z in s + t]

    g, second = grads_and_hvp(backend)
    g_ref, second_ref = grads_and_hvp("reference")
    for a, b in zip(g + second, g_ref + second_ref):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    assert max(b.abs().max() for b in second_ref) > 0


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_cpu(backend, dtype):
    """Under CPU autocast the loss is computed as without it, in the features' dtypes, as the reference."""
    require_backend(backend)
    zt, zs = _features(8, (6, 16), (5, 16))
    zt = [z.to(dtype) for z in zt]
    zs = [z.to(dtype).requires_grad_(True) for z in zs]
    zs_ref = [z.detach().clone().requires_grad_(True) for z in zs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = stars_fast.stars_loss(zt, zs, backend=backend, normalize="teacher")
        ref = stars_fast.stars_loss(zt, zs_ref, backend="reference", normalize="teacher")
    loss.backward()
    ref.backward()
    tol = TOL[torch.float32] if dtype == torch.float32 else dict(rtol=3e-2, atol=2e-3)
    assert loss.dtype == ref.dtype
    torch.testing.assert_close(loss.float(), ref.float(), **tol)
    for g, r in zip(zs, zs_ref):
        assert g.grad.dtype == dtype
        torch.testing.assert_close(g.grad.float(), r.grad.float(), **tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_autocast_cuda(backend):
    require_backend(backend, "cuda")
    zt, zs = _features(8, (6, 16), (5, 16))
    zt = [z.cuda() for z in zt]
    zs = [z.cuda() for z in zs]
    with torch.autocast("cuda", dtype=torch.float16):
        loss = stars_fast.stars_loss(zt, zs, backend=backend)
        ref = stars_fast.stars_loss(zt, zs, backend="reference")
        pooled = stars_fast.pool_features(torch.randn(2, 3, 4, 4, device="cuda"), backend=backend)
    torch.testing.assert_close(loss, ref, **TOL[torch.float32])
    assert pooled.dtype == torch.float32


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_zero_rows_and_nan(backend):
    require_backend(backend)
    zt, zs = _features(6, (4,), (5,))
    zt[0][2] = 0.0
    zs[0][3] = 0.0
    zt = [z.requires_grad_(True) for z in zt]
    loss = stars_fast.stars_loss(zt, zs, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zt[0].grad).all()
    zs[0][1, 1] = float("nan")
    assert torch.isnan(stars_fast.stars_loss(zt, zs, backend=backend))
    zt_nan = [zt[0].detach().clone()]
    zt_nan[0][0, 0] = float("nan")
    assert torch.isnan(stars_fast.stars_loss(zt_nan, zs, backend=backend))


def _device_for(backend):
    """Where a backend's features go ('cuda' for the CUDA op, else the CPU); skips an unusable backend."""
    device = "cuda" if backend == "cuda" else "cpu"
    if backend != "reference":
        require_backend(backend, device)
    return device


def _rca_oracle(zt, zs, active):
    """Eq. 14 over the rows `active` (a list of indices), in float64 from the definition: the mean over
    their pairs i<j of (cos_S(i, j) - cos_T(i, j))^2, cosines by F.cosine_similarity."""
    zt, zs = zt.double()[active], zs.double()[active]
    n = len(active)
    if n < 2:
        return 0.0
    terms = [(F.cosine_similarity(zs[i], zs[j], dim=0) - F.cosine_similarity(zt[i], zt[j], dim=0)) ** 2
             for i in range(n) for j in range(i + 1, n)]
    return torch.stack(terms).mean().item()


def _silent_case(name):
    """(zt, zs, active rows) of one layer: unit-scale Gaussian features with silent or near-silent rows."""
    torch.manual_seed(3)
    batch = 2 if name == "B2" else 16
    zt, zs = torch.randn(batch, 8) + 0.3, torch.randn(batch, 8) * 0.7
    active = list(range(batch))
    if name == "zero_student_row":
        zs[5] = 0.0
        active.remove(5)
    elif name == "student_row_at_1e-7":
        zs[5] *= 1e-7
        active.remove(5)
    elif name == "zero_teacher_row":
        zt[9] = 0.0
        active.remove(9)
    elif name == "all_zero_student":
        zs.zero_()
        active = []
    elif name == "all_zero_teacher":
        zt.zero_()
        active = []
    elif name == "one_student_row_left":
        zs[1:] = 0.0
        active = [0]
    elif name == "just_above_and_below_tolerance":
        top = zs.norm(dim=1).max()
        zs[4] *= 2e-3 * top / zs[4].norm()   # 2 tau of the largest norm: active
        zs[7] *= 5e-4 * top / zs[7].norm()   # tau / 2: silent
        active.remove(7)
    return zt, zs, active


SILENT_CASES = ["zero_student_row", "student_row_at_1e-7", "zero_teacher_row", "all_zero_student",
                "all_zero_teacher", "one_student_row_left", "just_above_and_below_tolerance", "B2"]


@pytest.mark.parametrize("scale", [1.0, 1e-20, 1e20])
@pytest.mark.parametrize("backend", ["reference"] + FUSED + ["cuda"])
@pytest.mark.parametrize("case", SILENT_CASES)
def test_rca_silent_rows(backend, case, scale):
    """RCA compares the relation only where both nets have a direction (docs/design.md 2.2): silent rows
    (norm <= 1e-3 x the largest of their side) leave the pairs and get no RCA gradient. The loss must be
    Eq. 14 over the active rows (oracle from the definition), finite, scale-invariant; the gradients the
    reference's, bounded: no entry above 1e3 x the median row's (the old max(||z||, 1e-12) gave ~1e10)."""
    device = _device_for(backend)
    zt, zs, active = _silent_case(case)
    want = _rca_oracle(zt, zs, active)
    ref = _loss_and_grads("reference", [zt], [zs], lambda_tar=0.0)
    total, rca, _, grad_t, grad_s = _loss_and_grads(backend, [(zt * scale).to(device)], [(zs * scale).to(device)],
                                                    lambda_tar=0.0)
    assert rca.item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert total.item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    silent = [i for i in range(zt.shape[0]) if i not in active]
    for got, want_grad in ((grad_t[0].cpu(), ref[3][0]), (grad_s[0].cpu(), ref[4][0])):
        assert torch.isfinite(got).all()
        assert (got[silent] == 0).all(), "a silent row got an RCA gradient"
        got_unit = got.double() * scale
        peak = want_grad.abs().max().item()
        torch.testing.assert_close(got_unit, want_grad.double(), rtol=1e-4, atol=1e-5 * max(peak, 1e-30))
        row_norms = got_unit.norm(dim=1)
        if len(active) >= 2:
            assert got_unit.abs().max() <= 1e3 * row_norms[active].median()


def _degenerate_teacher_case(name):
    """(zt, zs, s) of one layer whose teacher has no spread, s the std the standardization must use."""
    torch.manual_seed(5)
    zt, zs = torch.full((16, 8), -3.0), torch.randn(16, 6) - 2.5
    if name == "all_zero_teacher":
        zt.zero_()
        return zt, zs, 1.0  # nothing to standardize by: raw units
    if name == "silent_student":
        zs.zero_()
    return zt, zs, 1e-3 * 3.0  # 1e-3 rms(zT) = 1e-3 |c|


def _degenerate_teacher_oracle(case, scale, delta):
    """(zt, zs, s, scale, L_TAR) of _degenerate_teacher_case at `scale`: zn_T = 0 and every threshold 0, so
    p_T = 1/2 and L_TAR = mean_m (mean sigmoid(zn_S / delta) - 1/2)^2, in float64. The all-zero teacher keeps
    raw units: its features come scaled and the returned scale is 1."""
    zt, zs, std_floor = _degenerate_teacher_case(case)
    if case == "all_zero_teacher":
        zs, std_floor, scale = zs * scale, 1.0, 1.0
    zn_s = (zs.double() - zt.double().mean()) / std_floor
    return zt, zs, std_floor, scale, ((torch.sigmoid(zn_s / delta).mean() - 0.5) ** 2).item()


@pytest.mark.parametrize("scale", [1.0, 1e-20, 1e20])
@pytest.mark.parametrize("backend", ["reference"] + FUSED + ["cuda"])
@pytest.mark.parametrize("case", ["constant_teacher", "silent_student", "all_zero_teacher"])
def test_normalize_with_a_teacher_without_spread(backend, case, scale):
    """normalize="teacher" on a teacher layer with std 0 (docs/design.md 2.2): the std is floored at 1e-3
    rms(zT) (1 for an all-zero teacher), not at eps (which gave ~1e9 gradients). Then zn_T = 0 and every
    quantile threshold is 0, so p_T = 1/2 and L_TAR = mean_m (mean sigmoid(zn_S / delta) - 1/2)^2 (the
    oracle, in float64); no gradient may exceed 0.5 / (s delta B C) of its side, the bound of Eq. 17's
    gradient; scaling all features by any power of ten gives the same loss (but for the all-zero teacher,
    whose loss is the student's in raw units)."""
    device = _device_for(backend)
    delta, quantiles = 0.5, (0.6, 0.9)
    zt, zs, std_floor, scale, want = _degenerate_teacher_oracle(case, scale, delta)
    total, _, tar, grad_t, grad_s = _loss_and_grads(
        backend, [(zt * scale).to(device)], [(zs * scale).to(device)], normalize="teacher", lambda_rca=0.0,
        quantiles=quantiles, delta=delta)
    assert tar.item() == pytest.approx(want, rel=1e-5, abs=1e-9)
    for grad, z in ((grad_t[0].cpu(), zt), (grad_s[0].cpu(), zs)):
        bound = 1.7 * 0.5 / (std_floor * scale * delta * z.numel())
        assert torch.isfinite(grad).all() and grad.abs().max().item() <= bound * (1 + 1e-4)
    if backend != "reference":
        ref = _loss_and_grads("reference", [zt * scale], [zs * scale], normalize="teacher", lambda_rca=0.0,
                              quantiles=quantiles, delta=delta)
        for got, expected in zip(grad_t + grad_s, ref[3] + ref[4]):
            torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("backend", ["reference"] + EXTENSION)
def test_gradcheck_with_a_silent_row(backend):
    """Away from the tolerance the loss is smooth: float64 gradcheck with one zero student row (finite
    differences of 1e-6 keep it far below 1e-3 of the largest norm) and one zero teacher row."""
    require_backend(backend)
    zt = torch.randn(6, 4, dtype=torch.float64)
    zs = torch.randn(6, 5, dtype=torch.float64)
    zt[1] = 0.0
    zs[4] = 0.0
    zt.requires_grad_(True)
    zs.requires_grad_(True)

    def fn(a, b):
        return stars_fast.stars_loss([a], [b], thresholds=(0.0, 0.5), backend=backend)

    assert torch.autograd.gradcheck(fn, (zt, zs), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_silent_rows_keep_their_tar_gradient(backend):
    """The silent-row rule is RCA's: TAR still sees a silent row (its values do cross thresholds)."""
    require_backend(backend)
    zt, zs, _ = _silent_case("zero_student_row")
    got = _loss_and_grads(backend, [zt], [zs], lambda_rca=0.0, thresholds=(-0.2, 0.1))
    assert got[4][0][5].abs().max() > 0


@pytest.mark.parametrize("normalize", ["teacher", None])
@pytest.mark.parametrize("backend", ["reference"] + FUSED + ["cuda"])
def test_huge_features(backend, normalize):
    """Features of 1e20, whose squares (1e40) overflow float: the teacher's std and the row norms must
    not overflow to inf, which made the normalized features 0 and u = 0, so L_TAR and L_RCA silent
    zeros (the std in the CPU and CUDA ops, the norms in those and in the reference). L_RCA, and with
    normalize='teacher' the whole loss, does not change when all features are scaled: the oracle is
    the reference at unit scale, and the gradients at 1e20 are 1e-20 times its gradients."""
    device = _device_for(backend)
    zt, zs = _features(8, (16, 24), (12, 20))
    options = dict(normalize="teacher") if normalize else dict(lambda_tar=0.0)
    unit = _loss_and_grads("reference", zt, zs, **options)
    total, rca, tar, grad_t, grad_s = _loss_and_grads(
        backend, [(z * 1e20).to(device) for z in zt], [(z * 1e20).to(device) for z in zs], **options)
    assert unit[1] > 0 and (normalize is None or unit[2] > 0)
    invariant = (total, rca, tar) if normalize else (total, rca)  # raw L_TAR (weight 0 here) does change
    for got, want in zip(invariant, unit):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=0)
    for g, r in zip(grad_t + grad_s, unit[3] + unit[4]):
        scale = r.abs().max()
        torch.testing.assert_close(g.cpu() * 1e20 / scale, r / scale, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", FUSED + ["cuda"])
def test_one_huge_feature(backend):
    """One feature of 1e30 per side, whose square overflows float: its row's norm is 1e30, not inf
    (which gave u = 0 for the whole row). Oracle: the reference in float64 on the same features."""
    device = _device_for(backend)
    zt, zs = _features(8, (16,), (12,))
    zt[0][1, 2], zs[0][3, 4] = 1e30, -1e30
    want = _loss_and_grads("reference", [z.double() for z in zt], [z.double() for z in zs])
    total, rca, tar, grad_t, grad_s = _loss_and_grads(backend, [z.to(device) for z in zt],
                                                      [z.to(device) for z in zs])
    for got, ref in zip((total, rca, tar), want):
        torch.testing.assert_close(got.cpu().double(), ref, rtol=1e-4, atol=1e-7)
    for g, r in zip(grad_t + grad_s, want[3] + want[4]):
        scale = r.abs().max()
        torch.testing.assert_close(g.cpu().double() / scale, r / scale, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", EXTENSION)
def test_module_opcheck_and_compile(backend):
    require_backend(backend)
    from stars_fast.ops.stars import _pool_op

    zt, zs = _features(6, (4, 8), (5, 8))
    for quantiles, thresholds, normalize in (([0.5, 0.9], None, True), ([], [0.0, 1.0], False)):
        # the C++ op under stars_fast.ops.stars._ExtStarsLoss (its autograd: the gradient tests)
        torch.library.opcheck(torch.ops.stars_fast.stars_loss_fused,
                              (zt, zs, quantiles, thresholds, normalize, [0.5, 0.5], [0.5, 0.5], 0.5, 1e-12),
                              test_utils=("test_schema", "test_faketensor"))
    zt = [z.requires_grad_(True) for z in zt]
    zs = [z.requires_grad_(True) for z in zs]
    torch.library.opcheck(_pool_op, (torch.randn(2, 3, 4, 5, 5, requires_grad=True), backend))
    module = stars_fast.StarsLoss(backend=backend, normalize="teacher")
    eager = module(zt, zs)
    eager_grads = torch.autograd.grad(3.0 * eager, zt + zs)
    compiled = torch.compile(lambda a, b: module(a, b), fullgraph=True, backend="aot_eager")(zt, zs)
    torch.testing.assert_close(compiled, eager)
    for got, expected in zip(torch.autograd.grad(3.0 * compiled, zt + zs), eager_grads):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", FUSED)
def test_backward_of_unscaled_loss_leaves_the_stored_gradients_intact(backend):
    """A grad_total of 1 hands autograd the stored gradients themselves: a retained graph run three
    times (1 + 1 + 3 times the loss) must accumulate 5x the reference gradient, not alias it."""
    require_backend(backend)
    zt, zs = _features(9, (8, 16), (8, 12))
    ref_t = [z.clone().requires_grad_(True) for z in zt]
    ref_s = [z.clone().requires_grad_(True) for z in zs]
    expected = torch.autograd.grad(reference.stars_loss(ref_t, ref_s)[0], ref_t + ref_s)
    leaves = [z.clone().requires_grad_(True) for z in zt + zs]
    total = stars_fast.stars_loss(leaves[:2], leaves[2:], backend=backend)
    total.backward(retain_graph=True)
    total.backward(retain_graph=True)
    (3.0 * total).backward()
    for z, g in zip(leaves, expected):
        torch.testing.assert_close(z.grad, 5.0 * g, **TOL[torch.float32])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", [(3, 5, 4, 4), (4, 3, 5, 7, 7), (1, 2, 1, 1, 1)])
def test_pool_features(backend, shape):
    require_backend(backend)
    f = torch.randn(shape, requires_grad=True)
    g = torch.randn(shape, requires_grad=True)
    with torch.no_grad():
        g.copy_(f)
    pooled = stars_fast.pool_features(f, backend=backend)
    expected = reference.pool_features(g)
    torch.testing.assert_close(pooled, expected)
    w = torch.randn_like(expected)
    (pooled * w).sum().backward()
    (expected * w).sum().backward()
    torch.testing.assert_close(f.grad, g.grad)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_pool_features_autocast(backend):
    require_backend(backend)
    f = torch.randn(2, 3, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = stars_fast.pool_features(f, backend=backend)
        expected = reference.pool_features(f)
    assert pooled.dtype == expected.dtype
    torch.testing.assert_close(pooled, expected)


def test_pool_features_bad_inputs():
    with pytest.raises(ValueError, match="expects"):
        stars_fast.pool_features(torch.randn(3, 4))
    with pytest.raises(TypeError, match="floating"):
        stars_fast.pool_features(torch.ones(2, 3, 4, 4, dtype=torch.int64))


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_loss_api_normalize_flags_parts_and_module_arguments(backend):
    """normalize takes the CLI's boolean too; return_parts gives detached parts on every backend;
    StarsLoss checks its arguments (names and values) when it is built, not at the first forward."""
    require_backend(backend)
    zt, zs = _features(9, (6,), (5,))
    zs = [z.requires_grad_(True) for z in zs]
    for same, as_given in (("teacher", True), (None, False)):
        want = stars_fast.stars_loss(zt, zs, normalize=same, backend=backend)
        assert torch.equal(stars_fast.stars_loss(zt, zs, normalize=as_given, backend=backend), want)
    total, rca, tar = stars_fast.stars_loss(zt, zs, return_parts=True, backend=backend)
    assert total.requires_grad and not rca.requires_grad and not tar.requires_grad
    with pytest.raises(TypeError, match="lamda_rca"):
        stars_fast.StarsLoss(lamda_rca=2.0)
    with pytest.raises(ValueError, match="delta"):
        stars_fast.StarsLoss(delta=-1.0)
    with pytest.raises(ValueError, match="unknown backend"):
        stars_fast.StarsLoss(backend="gpu")
    module = stars_fast.StarsLoss(lambda_tar=0.0, backend=backend)
    assert torch.equal(module(zt, zs), stars_fast.stars_loss(zt, zs, lambda_tar=0.0, backend=backend))


@pytest.mark.parametrize("backend", ["reference"] + EXTENSION)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_features_give_an_fp32_loss_and_exact_double_backward(backend, dtype):
    """Half features on every backend: the loss in fp32 (torch.quantile takes no half, so the reference
    computes in fp32 too) and a double backward, against the reference on the same features in fp32."""
    require_backend(backend)
    zt, zs = _features(9, (6,), (5,))
    zt, zs = [z.to(dtype) for z in zt], [z.to(dtype).requires_grad_(True) for z in zs]
    loss = stars_fast.stars_loss(zt, zs, backend=backend)
    want = reference.stars_loss([z.float() for z in zt], [z.detach().float() for z in zs])[0]
    assert loss.dtype == torch.float32 and torch.allclose(loss, want, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, zs, create_graph=True)
    assert grad.dtype == dtype
    (grad.float() ** 2).sum().backward()
    assert zs[0].grad is not None and torch.isfinite(zs[0].grad.float()).all()


@pytest.mark.parametrize("backend", FUSED + ["cuda"])
def test_quantile_rank_in_double_as_torch_quantile(backend):
    """n = 11, q = 0.7: torch.quantile takes q in the data's precision (0.699999988 in fp32) and its rank
    q (n - 1) in double, 6.99999988, so the threshold is a hair below the 8th value (999999.875 here); an
    fp32 rank rounds to 7.0 and gives 1e6, which the soft exceedance at delta 0.5 turns into a clear
    difference of L_TAR. On every backend, against the reference (torch.quantile itself)."""
    device = _device_for(backend)
    zt = [torch.tensor([0.0] * 7 + [1e6] * 4)[:, None]]
    zs = [torch.linspace(999999.0, 1000001.0, 11)[:, None]]
    want = _loss_and_grads("reference", zt, zs, quantiles=(0.7,), lambda_rca=0.0)
    got = _loss_and_grads(backend, [z.to(device) for z in zt], [z.to(device) for z in zs], quantiles=(0.7,),
                          lambda_rca=0.0)
    torch.testing.assert_close(got[2].cpu(), want[2], rtol=1e-5, atol=1e-7)
    if backend in ("cpu", "cuda"):
        for dtype in (torch.float32, torch.float64):
            z = zt[0].reshape(-1).to(device, dtype)
            assert torch.ops.stars_fast.quantiles(z, [0.7]).item() == torch.quantile(z, 0.7).item()
