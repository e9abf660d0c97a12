"""The C++ CPU kernels (torch.ops.stars_fast.*, csrc/*.cpp) called directly, against stars_fast.reference.

Spikes must equal the reference bit for bit; v_last and the gradients (lif_backward against autograd
through reference.multistep_neuron) agree to per-dtype tolerances.
"""
import itertools
import math

import pytest
import torch

from stars_fast import reference as R

_C = pytest.importorskip("stars_fast._C", reason="extension stars_fast._C not built (pip install --no-build-isolation -e .)")
ops = torch.ops.stars_fast

SURROGATES = ("sigmoid", "atan", "triangle", "piecewise_exp", "soft_sign", "super_spike", "erf")  # by kernel id
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12),
       torch.float16: dict(rtol=1e-2, atol=1e-3), torch.bfloat16: dict(rtol=2e-2, atol=1e-2)}


# ---------------------------------------------------------------------------------------------
# LIF / IF neuron


def _neuron_case(T, N, dtype, *, leaky, v_reset, decay_input, detach_reset, surrogate, spiking, with_v_init,
                 with_grad_v_last, need_decay_grad, decay_is_tau=False, seed=0):
    """Run lif_forward / lif_backward and the reference (autograd) on one configuration.

    decay_is_tau: decay holds tau = 3 and the charge divides by it; else it holds k = 1/3 (fp32) and multiplies."""
    gen = torch.Generator().manual_seed(seed)
    v_th, alpha = 1.0, R.SURROGATE_DEFAULT_ALPHA[surrogate]
    x = (torch.randn(T, N, generator=gen, dtype=torch.float64) * 0.8 + 0.6).to(dtype)
    if N >= 4 and not leaky:
        x[0, :4] = v_th  # IF from rest: h == v_th exactly at t = 0 -> Theta(0) = 1
    v_r = 0.0 if v_reset is None else v_reset
    v_init = (torch.rand(N, generator=gen, dtype=torch.float64) - 0.5).to(dtype) if with_v_init else None
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    decay = torch.tensor([3.0 if decay_is_tau else 1.0 / 3.0], dtype=compute)
    grad_spikes = torch.randn(T, N, generator=gen, dtype=torch.float64).to(dtype)
    grad_v_last = torch.randn(N, generator=gen, dtype=torch.float64).to(dtype) if with_grad_v_last else None
    sid = SURROGATES.index(surrogate)

    spikes, v_last = ops.lif_forward(x, v_init, decay, leaky, decay_is_tau, v_th, v_reset, decay_input, sid, alpha,
                                     spiking, True)
    grad_x, grad_v_init, grad_decay, _ = ops.lif_backward(
        grad_spikes, grad_v_last, x, v_init, decay, leaky, decay_is_tau, v_th, v_reset, decay_input, sid, alpha,
        spiking, detach_reset, need_decay_grad, True)

    def reference(as_dtype, compute):
        x_ref = x.to(as_dtype).requires_grad_(True)
        v0_ref = (v_init.to(as_dtype) if with_v_init else torch.full((N,), v_r, dtype=as_dtype)).requires_grad_(True)
        k_ref = decay.to(compute).requires_grad_(not decay_is_tau)
        mode = dict(tau=3.0) if decay_is_tau else dict(inv_tau=k_ref)
        s_ref, v_ref = R.multistep_neuron(x_ref, leaky=leaky, v_threshold=v_th, v_reset=v_reset,
                                          decay_input=decay_input, detach_reset=detach_reset, surrogate=surrogate,
                                          alpha=alpha, spiking=spiking, v_init=v0_ref, **mode)
        loss = (s_ref.to(compute) * grad_spikes.to(compute)).sum()
        if with_grad_v_last:
            loss = loss + (v_ref.to(compute) * grad_v_last.to(compute)).sum()
        g_x, g_v0, *g_k = torch.autograd.grad(loss, [x_ref, v0_ref] + ([] if decay_is_tau else [k_ref]),
                                              allow_unused=True)
        g_k = g_k[0] if g_k else None
        return dict(spikes=s_ref.detach(), v_last=v_ref.detach(), grad_x=g_x, grad_v_init=g_v0,
                    grad_decay=torch.zeros(1, dtype=compute) if g_k is None else g_k)

    ref = reference(dtype, compute)
    if dtype == torch.float32:  # the same inputs in float64: the accuracy yardstick of fp32 gradients
        ref["float64"] = reference(torch.float64, torch.float64)
    got = dict(spikes=spikes, v_last=v_last, grad_x=grad_x, grad_v_init=grad_v_init, grad_decay=grad_decay)
    return got, ref


def _assert_fp32_grad_close(key, got, ref, spiking, where):
    """An fp32 gradient's largest error against the float64 reference of the same inputs within 2x the
    fp32 reference's own (taken as at least 2 ulp of the largest gradient: fp32 promises no better),
    on the elements whose spikes float64 reproduces at every step (all of them for the smooth neuron).
    Two fp32 computations can each be that close to the truth and still miss each other by more than
    a fixed tolerance. Where float64's h flips a spike (another trajectory): the fp32 reference, to TOL."""
    ref64 = ref["float64"]
    same = (ref64["spikes"].to(torch.float32) == ref["spikes"]).reshape(ref["spikes"].shape[0], -1).all(dim=0)
    same = same | (not spiking)
    g, r, r64 = (t[key].reshape(-1, same.numel()).double() for t in (got, ref, ref64))
    if same.any():
        truth = r64[:, same]
        floor = 2 * 2.0 ** -23 * truth.abs().max().item()
        own_error = max((r[:, same] - truth).abs().max().item(), floor)
        error = (g[:, same] - truth).abs().max().item()
        assert error <= 2 * own_error, (f"{key} ({where}): largest error {error:.3g} against float64, over 2x "
                                        f"the fp32 reference's {own_error:.3g}")
    torch.testing.assert_close(g[:, ~same], r[:, ~same], **TOL[torch.float32],
                               msg=lambda m: f"{key}, flipped spikes ({where}): {m}")


NEURON_CONFIGS = [
    (leaky, v_reset, decay_input, surrogate, spiking)
    for leaky, v_reset, decay_input, surrogate, spiking in itertools.product(
        (True, False), (0.0, -0.5, None), (True, False), SURROGATES, (True, False))
    if (leaky or decay_input)  # decay_input means nothing for IF
    and (spiking or surrogate != "super_spike")  # which has no primitive
]


@pytest.mark.parametrize("leaky,v_reset,decay_input,surrogate,spiking", NEURON_CONFIGS)
def test_neuron_matches_reference(leaky, v_reset, decay_input, surrogate, spiking):
    cases = [  # (T, N, dtype, detach_reset, with_v_init, with_grad_v_last, decay_is_tau)
        (4, 1003, torch.float32, False, False, False, False),
        (4, 1003, torch.float32, False, False, True, True),
        (4, 37, torch.float32, True, True, True, False),
        (5, 37, torch.float32, True, True, False, True),
        (1, 37, torch.float32, False, True, False, False),
        (4, 1, torch.float32, True, False, True, False),
        (4, 37, torch.float64, False, True, True, False),
        (3, 37, torch.float64, True, False, False, True),
        (2, 1003, torch.float32, False, True, True, False),  # the backward's groups of 4 vectors, then 1, then a tail
    ]
    for T, N, dtype, detach_reset, with_v_init, with_grad_v_last, decay_is_tau in cases:
        need_decay_grad = leaky and not decay_is_tau
        got, ref = _neuron_case(T, N, dtype, leaky=leaky, v_reset=v_reset, decay_input=decay_input,
                                detach_reset=detach_reset, surrogate=surrogate, spiking=spiking,
                                with_v_init=with_v_init, with_grad_v_last=with_grad_v_last,
                                need_decay_grad=need_decay_grad, decay_is_tau=decay_is_tau)
        tol = TOL[dtype]
        where = (f"T={T} N={N} {dtype} detach={detach_reset} v_init={with_v_init} grad_v_last={with_grad_v_last} "
                 f"decay_is_tau={decay_is_tau}")
        assert got["spikes"].dtype == dtype and got["v_last"].dtype == dtype
        if spiking:
            assert torch.equal(got["spikes"], ref["spikes"]), f"spikes differ ({where})"
        else:
            torch.testing.assert_close(got["spikes"], ref["spikes"], **tol, msg=f"smooth spikes ({where})")
        torch.testing.assert_close(got["v_last"], ref["v_last"], **tol, msg=f"v_last ({where})")
        for key in ("grad_x", "grad_v_init"):
            if dtype == torch.float32:
                _assert_fp32_grad_close(key, got, ref, spiking, where)
            else:
                torch.testing.assert_close(got[key], ref[key], **tol, msg=f"{key} ({where})")
        if need_decay_grad:
            state = torch.float64 if dtype == torch.float64 else torch.float32
            assert got["grad_decay"].shape == (N,) and got["grad_decay"].dtype == state
            # partial sums in the state dtype (the op's contract), summed in float64 here
            torch.testing.assert_close(got["grad_decay"].double().sum(), ref["grad_decay"].double().sum()[()],
                                       rtol=1e-5, atol=1e-5, msg=f"grad_decay ({where})")
        else:
            assert got["grad_decay"].numel() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_neuron_half_io(dtype):
    for v_reset, surrogate, decay_is_tau in ((0.0, "sigmoid", True), (None, "atan", False)):
        got, ref = _neuron_case(4, 1003, dtype, leaky=True, v_reset=v_reset, decay_input=True, detach_reset=False,
                                surrogate=surrogate, spiking=True, with_v_init=True, with_grad_v_last=True,
                                need_decay_grad=False, decay_is_tau=decay_is_tau)
        assert torch.equal(got["spikes"], ref["spikes"])
        assert got["grad_x"].dtype == dtype and got["grad_decay"].numel() == 0
        for key in ("v_last", "grad_x", "grad_v_init"):
            torch.testing.assert_close(got[key], ref[key], **TOL[dtype], msg=key)


FWD_OPTS = (True, False, 1.0, 0.0, True, 0, 4.0, True)  # leaky, decay_is_tau, v_th, v_reset, decay_input, sg, alpha, spiking


# x / 3 (IEEE division, SpikingJelly's LIFNode) rounds one ulp below x * fp32(1/3): a threshold at the
# product fires in multiply mode only.
DIVIDE_X = float.fromhex("0x1.9dc8f0p+1")  # 3.2326946...
DIVIDE_TH = float.fromhex("0x1.13db4cp+0")  # fp32(DIVIDE_X * fp32(1/3)); DIVIDE_X / 3 = 0x1.13db4ap+0


def test_neuron_divides_by_tau():
    """decay_is_tau: h = v + (x - v) / tau with a true division, not a multiply by fp32(1/tau)."""
    x = torch.tensor([[DIVIDE_X]], dtype=torch.float32)
    k = torch.tensor([1.0 / 3.0], dtype=torch.float32)
    assert (x / 3.0).item() < DIVIDE_TH == (x * k).item()
    opts = (DIVIDE_TH, 0.0, True, 0, 4.0, True, False)  # v_th, v_reset, decay_input, surrogate, alpha, spiking, v_last
    divided, _ = ops.lif_forward(x, None, torch.tensor([3.0]), True, True, *opts)
    multiplied, _ = ops.lif_forward(x, None, k, True, False, *opts)
    assert divided.item() == 0.0 and multiplied.item() == 1.0


def test_neuron_power_of_two_tau_divides_exactly():
    """tau = 2^k multiplies by 1 / tau inside the kernel (exact): spikes still equal the division's
    bit for bit, on inputs whose products land on the threshold, subnormal and huge values included."""
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(4, 4096, generator=gen) * 3, torch.full((4, 4), 2.0 ** -140), torch.full((4, 4), 3e38)], 1)
    for tau in (2.0, 4.0, 1024.0):
        x_at = x.clone()
        x_at[0, :64] = 2.0 * tau  # h = 2 exactly at t = 0: on the threshold
        for v_reset in (0.0, None):
            spikes, v_last = ops.lif_forward(x_at, None, torch.tensor([tau]), True, True, 2.0, v_reset, True, 0, 4.0,
                                             True, True)
            ref, ref_v = R.multistep_neuron(x_at, leaky=True, tau=tau, v_threshold=2.0, v_reset=v_reset)
            assert torch.equal(spikes, ref) and torch.equal(v_last, ref_v), (tau, v_reset)


def test_neuron_sigmoid_accuracy_over_the_exp_range():
    """The CPU sigmoid (spiking=False emits it) against float64 over alpha u in [-160, 160], beyond
    where e^-y overflows and underflows: within 4 ulp (its exp is within 1 ulp) down to the normal
    floats, and 0 below."""
    alpha = 4.0
    h = torch.linspace(-39.0, 41.0, 200_003, dtype=torch.float32)  # T = 1 from rest: h = x / 2
    x = (h * 2.0).reshape(1, -1)
    out, _ = ops.lif_forward(x, None, torch.tensor([2.0]), True, True, 1.0, 0.0, True, 0, alpha, False, False)
    y = (alpha * (h - 1.0)).double()  # the kernel's fp32 argument, exactly
    want = torch.sigmoid(y)
    torch.testing.assert_close(out[0].double(), want, rtol=4 * 2.0 ** -24, atol=2.0 ** -126)


def test_neuron_spike_at_threshold_and_nan():
    """h == v_th fires (Theta(0) = 1); a NaN input gives a NaN spike, not a silent 0, and NaN gradients
    where the reference has them (the triangle surrogate included)."""
    x = torch.tensor([[1.0, 0.5, float("nan")], [0.0, 0.5, 0.0]])
    decay = torch.tensor([0.5])
    spikes, _ = ops.lif_forward(x, None, decay, False, False, 1.0, 0.0, True, 0, 4.0, True, False)
    assert spikes[0, 0] == 1 and spikes[1, 1] == 1 and spikes[0, 1] == 0
    assert torch.isnan(spikes[0, 2]) and torch.isnan(spikes[1, 2])
    for sid, surrogate in enumerate(SURROGATES):
        grad_x, _, _, _ = ops.lif_backward(torch.ones_like(x), None, x, None, decay, False, False, 1.0, 0.0, True, sid,
                                        1.0, True, False, False, False)
        xr = x.clone().requires_grad_(True)
        R.multistep_neuron(xr, leaky=False, surrogate=surrogate, alpha=1.0)[0].sum().backward()
        assert torch.equal(torch.isnan(grad_x), torch.isnan(xr.grad)), surrogate
        assert torch.isnan(grad_x[:, 2]).all(), surrogate


def test_neuron_broadcast_grad():
    """Stride-0 gradients (as from .sum()) are read without being materialized, with the same result."""
    x = torch.randn(4, 1003) + 0.5
    decay = torch.tensor([2.0])
    args = (x, None, decay, True, True, 1.0, 0.0, True, 0, 4.0, True, False, False, True)
    dense = ops.lif_backward(torch.ones(4, 1003), torch.full((1003,), 2.0), *args)
    expanded = ops.lif_backward(torch.ones(()).expand(4, 1003), torch.tensor(2.0).expand(1003), *args)
    for a, b in zip(dense, expanded):
        assert torch.equal(a, b)


def test_neuron_optional_outputs():
    """v_last, grad_v_init and grad_decay are empty unless asked for; grad_v_last None is zero."""
    x = torch.randn(4, 100) + 0.5
    k = torch.tensor([0.5])
    spikes, v_last = ops.lif_forward(x, None, k, *FWD_OPTS[:-1], True, False)
    assert v_last.shape == (0,) and spikes.shape == x.shape
    grad_x, grad_v_init, grad_decay, grad_threshold = ops.lif_backward(
        torch.ones_like(x), None, x, None, k, *FWD_OPTS[:-1], True, False, False, False)
    assert grad_v_init.shape == (0,) and grad_decay.shape == (0,) and grad_threshold.shape == (0,)
    with_zero = ops.lif_backward(torch.ones_like(x), torch.zeros(100), x, None, k, *FWD_OPTS[:-1], True, False,
                                 False, True)
    assert torch.equal(grad_x, with_zero[0])


def test_neuron_empty_steps():
    x = torch.empty(0, 5)
    v_init = torch.arange(5.0)
    spikes, v_last = ops.lif_forward(x, v_init, torch.tensor([2.0]), True, True, 1.0, 0.0, True, 0, 4.0, True, True)
    assert spikes.shape == (0, 5) and torch.equal(v_last, v_init)


def test_neuron_bad_inputs():
    x = torch.randn(4, 10)
    k = torch.tensor([0.5])
    fwd = ops.lif_forward
    with pytest.raises(RuntimeError, match="2-D"):
        fwd(torch.randn(10), None, k, *FWD_OPTS, True)
    with pytest.raises(RuntimeError, match="v_init must have shape"):
        fwd(x, torch.zeros(9), k, *FWD_OPTS, True)
    with pytest.raises(RuntimeError, match="v_init dtype"):
        fwd(x, torch.zeros(10, dtype=torch.float64), k, *FWD_OPTS, True)
    with pytest.raises(RuntimeError, match="float32, float64"):
        fwd(torch.ones(4, 10, dtype=torch.int32), None, k, *FWD_OPTS, True)
    with pytest.raises(RuntimeError, match="contiguous"):
        fwd(torch.randn(10, 4).t(), None, k, *FWD_OPTS, True)
    with pytest.raises(RuntimeError, match="one element"):
        fwd(x, None, torch.tensor([0.5, 0.5]), *FWD_OPTS, True)
    with pytest.raises(RuntimeError, match="surrogate must be"):
        fwd(x, None, k, True, False, 1.0, 0.0, True, 7, 4.0, True, True)
    with pytest.raises(RuntimeError, match="alpha must be"):
        fwd(x, None, k, True, False, 1.0, 0.0, True, 0, 0.0, True, True)
    with pytest.raises(RuntimeError, match="tau must be a finite number > 1"):
        fwd(x, None, torch.tensor([float("inf")]), True, True, 1.0, 0.0, True, 0, 4.0, True, True)
    bwd_opts = (True, False, 1.0, 0.0, True, 0, 4.0, True, False, False, True)
    with pytest.raises(RuntimeError, match="grad_spikes shape"):
        ops.lif_backward(torch.ones(3, 10), None, x, None, k, *bwd_opts)
    with pytest.raises(RuntimeError, match="grad_v_last must have shape"):
        ops.lif_backward(torch.ones(4, 10), torch.ones(3), x, None, k, *bwd_opts)
    with pytest.raises(ValueError, match="decay_is_tau=False"):
        ops.lif_backward(torch.ones(4, 10), None, x, None, torch.tensor([2.0]), True, True, 1.0, 0.0, True, 0, 4.0,
                         True, False, True, True)


# ---------------------------------------------------------------------------------------------
# pool_mean and quantiles


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_pool_mean(dtype):
    gen = torch.Generator().manual_seed(1)
    for shape in ((1, 7, 1), (4, 37, 16), (3, 5, 1000)):
        x = torch.randn(*shape, generator=gen).to(dtype)
        expected = x.float().mean(dim=(0, 2)).to(dtype) if dtype in (torch.float16, torch.bfloat16) else \
            x.mean(dim=(0, 2))
        got = ops.pool_mean(x)
        assert got.dtype == dtype and got.shape == (shape[1],)
        torch.testing.assert_close(got, expected, **TOL[dtype])
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    student = torch.randn(4, 3, 5, 6, 6, generator=gen).to(dtype)  # [T, B, C, H, W] -> [B, C]
    got = ops.pool_mean(student.reshape(4, 15, 36)).reshape(3, 5)
    torch.testing.assert_close(got, R.pool_features(student.to(compute)).to(dtype), **TOL[dtype])
    noncontig = torch.randn(6, 5, 4, generator=gen).to(dtype).permute(2, 1, 0)
    torch.testing.assert_close(ops.pool_mean(noncontig), noncontig.to(compute).mean(dim=(0, 2)).to(dtype),
                               **TOL[dtype])


def test_pool_mean_bad_inputs():
    with pytest.raises(RuntimeError, match="3-D"):
        ops.pool_mean(torch.randn(4, 5))
    with pytest.raises(RuntimeError, match="float32, float64"):
        ops.pool_mean(torch.ones(2, 3, 4, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quantiles(dtype):
    gen = torch.Generator().manual_seed(2)
    q_sets = ([0.6, 0.7, 0.8, 0.9, 0.95], [0.0, 1.0], [0.95, 0.1, 0.5, 0.5], [0.25])
    samples = [torch.randn(n, generator=gen, dtype=dtype) for n in (1, 2, 7, 1000, 4099)]
    samples[3][:333] = samples[3][0]  # ties
    samples += [torch.full((500,), 2.5, dtype=dtype),  # one value: one histogram bucket holds everything
                torch.tensor([0.0, -0.0, 3.0, -float("inf"), float("inf"), -2.0, 1e-30, -1e-30], dtype=dtype),
                torch.rand(3000, generator=gen, dtype=dtype) * 1e-3 + 7.0,  # concentrated
                torch.tensor([3e38, -3e38, 1.0, 2.0, 0.5, -1.0, 3e38], dtype=dtype),  # max - min overflows fp32
                torch.cat([torch.randn(2000, generator=gen, dtype=dtype), torch.tensor([1e30], dtype=dtype)])]  # outlier
    for z in samples:
        n = z.numel()
        for q in q_sets:
            expected = torch.quantile(z, torch.tensor(q, dtype=dtype))
            got = ops.quantiles(z.reshape(-1, 1) if n % 2 else z, q)
            assert got.dtype == dtype
            torch.testing.assert_close(got, expected, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0,
                                       equal_nan=True)


def test_quantiles_nan_and_bad_inputs():
    z = torch.randn(100)
    z[17] = float("nan")
    assert torch.isnan(ops.quantiles(z, [0.5, 0.9])).all()
    with pytest.raises(RuntimeError, match=r"in \[0, 1\]"):
        ops.quantiles(torch.randn(10), [0.5, 1.5])
    with pytest.raises(RuntimeError, match="non-empty"):
        ops.quantiles(torch.empty(0), [0.5])
    with pytest.raises(RuntimeError, match="float32, float64"):
        ops.quantiles(torch.arange(10), [0.5])


# ---------------------------------------------------------------------------------------------
# STARS loss


def _coefs(n_layers, weights, lambda_rca, lambda_tar):
    w = [1.0] * n_layers if weights is None else weights
    return [lambda_rca * wi / sum(w) for wi in w], [lambda_tar * wi / sum(w) for wi in w]


STARS_CASES = [  # (B, teacher channels, student channels, quantiles, weights, normalize)
    (2, [3], [5], [0.6, 0.9], None, False),
    (33, [8, 16], [12, 16], [0.6, 0.7, 0.8, 0.9, 0.95], [1.0, 2.0], True),
    (33, [5, 9, 7], [6, 9, 4], [0.5, 0.8, 0.95], None, False),
    (33, [8, 16, 12, 10], [12, 16, 8, 10], [0.6, 0.7, 0.8, 0.9, 0.95], [1.0, 1.0, 2.0, 0.5], True),
    (256, [24, 48], [32, 48], [0.7, 0.9, 0.95, 0.99], None, True),
    (64, [64, 517], [9, 130], [0.0, 0.25, 1.0], None, True),  # AVX2 tails (C % 8 != 0), extreme quantiles
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", range(len(STARS_CASES)))
def test_stars_loss_matches_reference(case, dtype):
    """The op computes the normalization moments and the quantile thresholds itself."""
    B, ct, cs, quantiles, weights, normalize = STARS_CASES[case]
    gen = torch.Generator().manual_seed(case)
    z_teacher = [(torch.randn(B, c, generator=gen, dtype=dtype) * 1.5 + 0.3) for c in ct]
    z_student = [(torch.randn(B, c, generator=gen, dtype=dtype) + 0.1 * i) for i, c in enumerate(cs)]
    z_student[0][0] = 0.0  # a row of zeros: a silent row, no NaN
    lambda_rca, lambda_tar = 1.0, 0.7
    coef_rca, coef_tar = _coefs(len(ct), weights, lambda_rca, lambda_tar)
    total, parts, grad_t, grad_s = ops.stars_loss_fused(z_teacher, z_student, quantiles, None, normalize, coef_rca,
                                                        coef_tar, 0.5, 1e-12)

    zt_ref = [z.clone().requires_grad_(True) for z in z_teacher]
    zs_ref = [z.clone().requires_grad_(True) for z in z_student]
    kwargs = dict(quantiles=quantiles, lambda_rca=lambda_rca, lambda_tar=lambda_tar,
                  normalize="teacher" if normalize else None)
    ref_total, _, _ = R.stars_loss(zt_ref, zs_ref, weights=weights, **kwargs)
    ref_grads = torch.autograd.grad(ref_total, zt_ref + zs_ref)
    ref_parts = []
    for zt, zs in zip(z_teacher, z_student):
        _, rca, tar = R.stars_loss([zt], [zs], lambda_rca=1.0, lambda_tar=1.0, quantiles=quantiles,
                                   normalize=kwargs["normalize"])
        ref_parts.append([rca.item(), tar.item()])

    tol = dict(rtol=2e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-13)
    assert total.dtype == dtype and parts.dtype == dtype and total.dim() == 0 and parts.shape == (len(ct), 2)
    torch.testing.assert_close(total.double(), ref_total.detach().double(), **tol)
    torch.testing.assert_close(parts.double(), torch.tensor(ref_parts, dtype=torch.float64), **tol)
    for got, ref in zip(list(grad_t) + list(grad_s), ref_grads):
        assert got.dtype == dtype and got.shape == ref.shape
        scale = ref.abs().max().item()
        torch.testing.assert_close(got, ref, rtol=tol["rtol"] * 10, atol=tol["rtol"] * scale)
        assert torch.isfinite(got).all()


def test_stars_loss_fixed_thresholds_and_half_inputs():
    gen = torch.Generator().manual_seed(5)
    zt = [torch.randn(16, 8, generator=gen)]
    zs = [torch.randn(16, 12, generator=gen)]
    thresholds = [-0.5, 0.0, 1.0]
    total, _, grad_t, grad_s = ops.stars_loss_fused(zt, zs, [], thresholds, False, [1.0], [1.0], 0.5, 1e-12)
    zt_ref = [z.clone().requires_grad_(True) for z in zt]
    zs_ref = [z.clone().requires_grad_(True) for z in zs]
    ref_total, _, _ = R.stars_loss(zt_ref, zs_ref, thresholds=thresholds)
    ref_grads = torch.autograd.grad(ref_total, zt_ref + zs_ref)
    torch.testing.assert_close(total, ref_total.detach(), rtol=2e-5, atol=1e-7)
    for got, ref in zip(grad_t + grad_s, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    # bf16 features are computed in float32; the gradients come back in bf16
    total_h, _, grad_th, _ = ops.stars_loss_fused([z.bfloat16() for z in zt], [z.bfloat16() for z in zs], [],
                                                  thresholds, False, [1.0], [1.0], 0.5, 1e-12)
    assert grad_th[0].dtype == torch.bfloat16
    assert math.isclose(total_h.item(), total.item(), rel_tol=5e-2)


@pytest.mark.parametrize("thresholds, delta", [((-0.5, 0.0, 1.0), 0.5), ((-3.0, 0.0, 8.0), 0.2)])
def test_stars_loss_spread_thresholds(thresholds, delta):
    """Close thresholds share one exp per element (exp(-x_m) = exp(-x_ref) e^((theta_m - theta_ref) / delta));
    far apart ones (here (8 - 0) / 0.2 = 40) take one exp per threshold. Both as the reference."""
    gen = torch.Generator().manual_seed(7)
    zt = [torch.randn(12, 37, generator=gen) * 4]
    zs = [torch.randn(12, 29, generator=gen) * 4]
    total, _, grad_t, grad_s = ops.stars_loss_fused(zt, zs, [], list(thresholds), False, [0.0], [1.0], delta, 1e-12)
    zt_ref = [z.clone().requires_grad_(True) for z in zt]
    zs_ref = [z.clone().requires_grad_(True) for z in zs]
    ref_total, _, _ = R.stars_loss(zt_ref, zs_ref, thresholds=thresholds, delta=delta, lambda_rca=0.0)
    ref_grads = torch.autograd.grad(ref_total, zt_ref + zs_ref)
    torch.testing.assert_close(total, ref_total.detach(), rtol=2e-5, atol=1e-8)
    for got, ref in zip(grad_t + grad_s, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7)


def test_stars_loss_nan_propagates():
    zt = [torch.randn(4, 3)]
    zs = [torch.randn(4, 3)]
    zs[0][1, 2] = float("nan")
    total, _, _, _ = ops.stars_loss_fused(zt, zs, [], [0.0], False, [1.0], [1.0], 0.5, 1e-12)
    assert torch.isnan(total)
    zs[0][1, 2] = 0.0
    zt[0][0, 0] = float("nan")  # NaN quantiles and moments, as torch.quantile / torch.std
    total, parts, _, _ = ops.stars_loss_fused(zt, zs, [0.5], None, True, [1.0], [1.0], 0.5, 1e-12)
    assert torch.isnan(total) and torch.isnan(parts).all()


def test_stars_loss_under_autocast():
    """Called directly under CPU autocast, the op still computes in fp32 (its GEMMs bypass autocast)."""
    gen = torch.Generator().manual_seed(6)
    zt = [torch.randn(8, 16, generator=gen)]
    zs = [torch.randn(8, 12, generator=gen)]
    expected = ops.stars_loss_fused(zt, zs, [0.5, 0.9], None, True, [1.0], [1.0], 0.5, 1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.stars_loss_fused(zt, zs, [0.5, 0.9], None, True, [1.0], [1.0], 0.5, 1e-12)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert got[2][0].dtype == torch.float32


def test_stars_loss_bad_inputs():
    one = [1.0]

    def call(zt, zs, quantiles=[0.5], thresholds=None, c_rca=one, c_tar=one, delta=0.5, eps=1e-12):
        return ops.stars_loss_fused(zt, zs, quantiles, thresholds, True, c_rca, c_tar, delta, eps)

    z = [torch.randn(4, 4)]
    with pytest.raises(RuntimeError, match="at least 2"):
        call([torch.randn(1, 4)], [torch.randn(1, 4)])
    with pytest.raises(RuntimeError, match="teacher batch 4 != student batch 5"):
        call(z, [torch.randn(5, 4)])
    with pytest.raises(RuntimeError, match="same batch size"):
        call(z + [torch.randn(5, 4)], z + [torch.randn(5, 4)], c_rca=[1.0, 1.0], c_tar=[1.0, 1.0])
    with pytest.raises(RuntimeError, match="one entry per layer"):
        call([torch.randn(4, 4)] * 2, z)
    with pytest.raises(RuntimeError, match="one entry per layer"):
        call(z, z, c_tar=[1.0, 1.0])
    with pytest.raises(RuntimeError, match="2-D"):
        call([torch.randn(4, 4, 1)], z)
    with pytest.raises(RuntimeError, match="float32, float64"):
        call([torch.ones(4, 4, dtype=torch.int64)], z)
    with pytest.raises(RuntimeError, match="quantiles must be non-empty"):
        call(z, z, quantiles=[])
    with pytest.raises(RuntimeError, match=r"in \[0, 1\]"):
        call(z, z, quantiles=[1.5])
    with pytest.raises(RuntimeError, match="thresholds must be finite"):
        call(z, z, thresholds=[float("nan")])
    for eps in (-1.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="eps must be"):
            call(z, z, eps=eps)
    for delta in (0.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="delta must be"):
            call(z, z, delta=delta)
    with pytest.raises(RuntimeError, match="coefficients must be finite"):
        call(z, z, c_rca=[float("inf")])
