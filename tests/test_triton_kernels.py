"""The Triton kernels (stars_fast.kernels) against stars_fast.reference, launchers called directly.

Without a GPU they run under Triton's interpreter on CPU tensors. @triton.jit reads TRITON_INTERPRET
when a kernel is defined, so it is set at the top, before anything imports the kernels (importing
torch imports no Triton). If they were defined earlier without it, the tests are skipped: run this
file on its own. With a GPU the same tests run the compiled kernels on CUDA tensors.
"""
import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import importlib.util  # noqa: E402
import itertools  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
if importlib.util.find_spec("stars_fast") is None:
    sys.path.insert(0, str(ROOT))

from stars_fast import reference  # noqa: E402


def _import_kernels():
    """stars_fast.kernels, or, in a source checkout without `pip install -e .`, kernels/ under that name."""
    try:
        import stars_fast.kernels as kernels
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "stars_fast.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")])
        kernels = importlib.util.module_from_spec(spec)
        sys.modules["stars_fast.kernels"] = kernels
        spec.loader.exec_module(kernels)
    return kernels


kernels = _import_kernels()
lif_kernels = sys.modules["stars_fast.kernels.lif"]

pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not isinstance(lif_kernels._lif_fwd_kernel, InterpretedFunction),
    reason="stars_fast.kernels was imported before TRITON_INTERPRET=1 was set; run this file on its own")


def _dev(*tensors):
    """The tensors on the kernels' device (None stays None)."""
    return [t.to(DEVICE) if t is not None else None for t in tensors]


def _cpu(*tensors):
    return [t.cpu() if t is not None else None for t in tensors]


SURROGATES = ("sigmoid", "atan", "triangle", "piecewise_exp", "soft_sign", "super_spike", "erf")  # by kernel id
NEURONS = [  # (leaky, v_reset, decay_input); v_reset None is soft reset
    (True, 0.0, True), (True, 0.0, False), (True, -0.5, True), (True, -0.5, False),
    (True, None, True), (True, None, False), (False, 0.0, True), (False, -0.5, True), (False, None, True)]
TAU = 1.7  # divide mode (SpikingJelly's LIFNode): fp32(1/1.7) * x differs from x / 1.7 for many x
INV_TAU = 0.6  # multiply mode (PLIF's k = sigmoid(w)), with dL/dk
T_VALUES = (1, 4, 5, 8, 32, 33)
# Gradients and smooth spikes against the reference run in the same dtype (which computes in fp32 and
# rounds once): rtol, and atol as a fraction of the largest |value|. 16-bit: two ulps of the output
# type (the interpreter truncates fp32 -> bf16 where a GPU rounds to nearest).
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _opts(leaky=True, v_reset=0.0, decay_input=True, surrogate="sigmoid", spiking=True, detach_reset=False, T=4,
          N=37, v_init=True, grad_v_last=True, plif=False, need_v_last=True, need_grad_v_init=True):
    return dict(leaky=leaky, v_reset=v_reset, decay_input=decay_input, surrogate=surrogate, spiking=spiking,
                detach_reset=detach_reset, T=T, N=N, v_init=v_init, grad_v_last=grad_v_last, plif=plif,
                need_v_last=need_v_last, need_grad_v_init=need_grad_v_init and v_init)


def _neuron_cases():
    """Every neuron x surrogate x spiking combination; the other options cycle with the case index."""
    cases = []
    for k, ((leaky, v_reset, decay), surrogate, spiking) in enumerate(
            (n, s, spiking) for n, s, spiking in itertools.product(NEURONS, SURROGATES, (True, False))
            if spiking or s != "super_spike"):  # super_spike has no primitive
        opts = _opts(leaky, v_reset, decay, surrogate, spiking, detach_reset=(k // 2) % 2 == 1,
                     T=(1, 4, 5)[k % 3], N=(37, 300, 1)[k % 7 % 3], v_init=k % 11 % 4 != 3,
                     grad_v_last=k % 13 % 5 != 4, plif=k % 17 % 3 == 2, need_v_last=k % 19 % 4 != 1)
        name = (f"{'lif' if leaky else 'if'}-{'soft' if v_reset is None else f'hard{v_reset}'}-"
                f"{'decay' if decay else 'nodecay'}-{surrogate}-{'spike' if spiking else 'smooth'}")
        cases.append(pytest.param(opts, id=name))
    return cases


def _neuron_inputs(opts, dtype):
    g = torch.Generator().manual_seed(opts["T"] * 1000 + opts["N"])
    T, N = opts["T"], opts["N"]
    x = (torch.randn(T, N, generator=g) * 1.5 + 0.4).to(dtype)
    v_init = (torch.randn(N, generator=g) * 0.5).to(dtype) if opts["v_init"] else None
    grad_spikes = torch.randn(T, N, generator=g).to(dtype)
    grad_v_last = torch.randn(N, generator=g).to(dtype) if opts["grad_v_last"] else None
    return x, v_init, grad_spikes, grad_v_last


def _triton_neuron(opts, x, v_init, grad_spikes, grad_v_last):
    """(spikes, v_last, grad_x, grad_v_init, dL/dk summed) from the two launchers (None where not asked)."""
    surrogate = SURROGATES.index(opts["surrogate"])
    alpha = reference.SURROGATE_DEFAULT_ALPHA[opts["surrogate"]]
    decay = torch.tensor([INV_TAU if opts["plif"] else TAU])
    x, v_init, grad_spikes, grad_v_last, decay = _dev(x, v_init, grad_spikes, grad_v_last, decay)
    neuron = (opts["leaky"], not opts["plif"], 1.0, opts["v_reset"], opts["decay_input"], surrogate, alpha,
              opts["spiking"])
    need_decay_grad = opts["plif"] and opts["leaky"]
    spikes, v_last = _cpu(*kernels.lif_forward(x, v_init, decay, *neuron, opts["need_v_last"]))
    grad_x, grad_v_init, grad_decay, _ = _cpu(*kernels.lif_backward(
        grad_spikes, grad_v_last, x, v_init, decay, *neuron, opts["detach_reset"], need_decay_grad,
        opts["need_grad_v_init"]))
    assert spikes.dtype == v_last.dtype == grad_x.dtype == grad_v_init.dtype == x.dtype
    assert v_last.shape == ((x.shape[1],) if opts["need_v_last"] else (0,))
    assert grad_v_init.shape == ((x.shape[1],) if opts["need_grad_v_init"] else (0,))
    if need_decay_grad:
        assert grad_decay.shape == (x.shape[1],) and grad_decay.dtype == torch.float32
    else:
        assert grad_decay.numel() == 0
    return (spikes, v_last if opts["need_v_last"] else None, grad_x,
            grad_v_init if opts["need_grad_v_init"] else None, grad_decay.sum() if need_decay_grad else None)


def _reference_neuron(opts, x, v_init, grad_spikes, grad_v_last):
    """The same five results from reference.multistep_neuron and autograd (in x's dtype)."""
    x = x.clone().requires_grad_()
    state = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_tau = torch.tensor([INV_TAU], dtype=state, requires_grad=True)
    decay = dict(inv_tau=inv_tau) if opts["plif"] else dict(tau=TAU)
    v_init = v_init.clone().requires_grad_() if v_init is not None else None
    spikes, v_last = reference.multistep_neuron(
        x, leaky=opts["leaky"], v_reset=opts["v_reset"], decay_input=opts["decay_input"],
        detach_reset=opts["detach_reset"], surrogate=opts["surrogate"], spiking=opts["spiking"], v_init=v_init,
        **decay)
    loss = (spikes * grad_spikes).sum()
    if grad_v_last is not None:
        loss = loss + (v_last * grad_v_last).sum()
    loss.backward()
    grad_decay = None
    if opts["plif"] and opts["leaky"]:
        grad_decay = inv_tau.grad.sum() if inv_tau.grad is not None else torch.zeros(())
    return (spikes.detach(), v_last.detach() if opts["need_v_last"] else None, x.grad,
            v_init.grad if opts["need_grad_v_init"] else None,
            grad_decay)


def _assert_within_reference_error(name, dtype, got, same, exact):
    """|got - exact| <= 2 max|same - exact|: twice the error of the reference run in the same dtype.

    Allowance for the interpreter: it converts fp32 -> bf16 by truncation (a GPU rounds to nearest
    even), which can put a bf16 output up to half an ulp further from the exact value.
    """
    got, same = got.double(), same.double()
    ref_err = (same - exact).abs().max()
    bound = 2 * ref_err + 1e-12
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        bound = bound + torch.finfo(dtype).eps * torch.ldexp(torch.ones_like(exact), torch.frexp(exact).exponent - 2)
    if dtype == torch.float32:  # an fp32 result of both (the reference takes half features to fp32 too): the
        bound = bound + 4 * torch.finfo(dtype).eps * exact.abs()  # order of summation moves it by a few ulps
    err = (got - exact).abs()
    assert (err <= bound).all(), f"{name}: error {err.max():.3g} vs the reference's own {ref_err:.3g}"


def _assert_close_fp32(name, got, want):
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-6 + 1e-5 * scale,
                               msg=lambda m: f"{name}: {m}")


def _assert_neuron_matches(opts, got, want, dtype):
    """Spikes exact (spiking); everything else to TOLERANCE[dtype]; NaN where the reference has NaN."""
    rtol, atol = TOLERANCE[dtype]
    names = ("spikes", "v_last", "grad_x", "grad_v_init", "grad_decay")
    for name, g, w in zip(names, got, want):
        if w is None:
            assert g is None, f"{name} returned but not asked for"
            continue
        if name == "spikes" and opts["spiking"]:
            assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.nan_to_num(), w.nan_to_num()), \
                "spikes differ from the reference"
            continue
        if name == "grad_decay":
            dtype_tol = (1e-4, 1e-4) if dtype == torch.float32 else (5e-3, 5e-3)  # an fp32 sum over T N terms
            rtol, atol = dtype_tol
        scale = w.float().abs().nan_to_num(0.0, 0.0, 0.0).max().item() if w.numel() else 0.0
        torch.testing.assert_close(g.float(), w.float(), rtol=rtol, atol=1e-6 + atol * scale, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")


def _check_neuron(opts, dtype=torch.float32):
    inputs = _neuron_inputs(opts, dtype)
    _assert_neuron_matches(opts, _triton_neuron(opts, *inputs), _reference_neuron(opts, *inputs), dtype)


@pytest.mark.parametrize("opts", _neuron_cases())
def test_lif_fp32_matches_reference(opts):
    _check_neuron(opts)


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=list(DTYPE_IDS.values()))
@pytest.mark.parametrize("T", T_VALUES)
def test_lif_every_chunking_matches_reference(T, dtype):
    """T across the chunk sizes: one chunk, a partial chunk (T=5), checkpointed chunks (T=32, 33)."""
    _check_neuron(_opts(T=T, N=300, v_reset=None, surrogate="atan", spiking=False), dtype)
    _check_neuron(_opts(T=T, N=300, decay_input=False, surrogate="triangle", detach_reset=True, plif=True), dtype)


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=list(DTYPE_IDS.values()))
@pytest.mark.parametrize("case", ["nothing-asked", "v_last-only", "grad_v_init-only"])
def test_lif_optional_outputs(case, dtype):
    """v_last / grad_v_init are stored only when asked; grad_v_last None is zero; v_init None is v_reset."""
    opts = _opts(T=5, N=300, v_init=case != "nothing-asked", grad_v_last=case == "v_last-only",
                 need_v_last=case == "v_last-only", need_grad_v_init=case == "grad_v_init-only")
    _check_neuron(opts, dtype)


def test_lif_several_programs():
    """N spanning several program blocks, none of them full at the end."""
    _check_neuron(_opts(decay_input=False, T=3, N=2500, plif=True))


def test_lif_divides_by_tau_exactly():
    """Divide mode is IEEE division: with T=1, v_init=0, soft reset and no spike, v_last = x / tau
    bit for bit, where x * fp32(1/tau) would differ (normal, subnormal, huge, signed-zero inputs)."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4000, generator=g) * 10.0 ** torch.randint(-30, 30, (4000,), generator=g),
                   torch.tensor([0.0, -0.0, 1e-40, -3e-42, 3.4e38, -1.0, 1.0, float("inf"), float("nan")])])
    for tau in (1.7, 3.0, 7.3, 123.456, 1e6):
        x_dev, decay = _dev(x[None], torch.tensor([tau]))
        _, v_last = kernels.lif_forward(x_dev, torch.zeros_like(x_dev[0]), decay, True, True, 3.4e38, None, True, 0,
                                        4.0, True, True)
        want = x / torch.tensor(tau)
        assert torch.equal(v_last.cpu(), want) or torch.equal(v_last.cpu().nan_to_num(), want.nan_to_num()), tau
        assert not torch.equal(x * torch.tensor(1.0 / tau), want)  # the test can tell the two apart


def test_lif_spike_exactly_at_threshold():
    """h == v_th exactly fires (Theta(0) = 1), and the backward's recompute sees the same spike."""
    x = torch.tensor([[2.0, 1.0], [0.5, 2.0]])  # LIF, tau = 2, v0 = 0: h[0] = (1.0, 0.5); IF: h[0] = (2.0, 1.0)
    for leaky in (True, False):
        x_dev, tau = _dev(x, torch.tensor([2.0]))
        spikes, v_last = _cpu(*kernels.lif_forward(x_dev, None, tau, leaky, True, 1.0, 0.0, True, 0, 4.0, True, True))
        ref_spikes, ref_v = reference.multistep_neuron(x, tau=2.0, leaky=leaky, v_reset=0.0)
        assert torch.equal(spikes, ref_spikes) and torch.equal(v_last, ref_v)
        assert spikes[0].tolist() == ([1.0, 0.0] if leaky else [1.0, 1.0])
        xr = x.clone().requires_grad_()
        reference.multistep_neuron(xr, tau=2.0, leaky=leaky, v_reset=0.0)[0].sum().backward()
        grad_x = kernels.lif_backward(torch.ones_like(x_dev), None, x_dev, None, tau, leaky, True, 1.0, 0.0, True, 0,
                                      4.0, True, False, False, False)[0].cpu()
        _assert_close_fp32("grad_x", grad_x, xr.grad)


@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("spiking", [True, False], ids=["spike", "smooth"])
def test_lif_nan_like_the_reference(surrogate, spiking):
    """A NaN input gives NaN spikes and NaN gradients exactly where the reference does (triangle too)."""
    if surrogate == "super_spike" and not spiking:
        pytest.skip("super_spike has no primitive")
    opts = _opts(T=4, N=37, surrogate=surrogate, spiking=spiking, v_reset=None)
    x, v_init, grad_spikes, grad_v_last = _neuron_inputs(opts, torch.float32)
    x[1, 3] = x[0, 7] = x[3, 20] = float("nan")
    got = _triton_neuron(opts, x, v_init, grad_spikes, grad_v_last)
    want = _reference_neuron(opts, x, v_init, grad_spikes, grad_v_last)
    for name, g, w in zip(("spikes", "v_last", "grad_x", "grad_v_init"), got, want):
        assert torch.equal(g.isnan(), w.isnan()), f"{name}: NaN positions differ from the reference"
        assert w.isnan().any(), f"{name}: the case should produce NaN"
    _assert_neuron_matches(opts, got, want, torch.float32)


def test_lif_bad_inputs():
    x, k = _dev(torch.randn(3, 5), torch.tensor([0.5]))
    args = (True, False, 1.0, 0.0, True, 0, 4.0, True)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        kernels.lif_forward(x.double(), None, k, *args, True)
    with pytest.raises(ValueError, match="v_init"):
        kernels.lif_forward(x, torch.zeros(4, device=x.device), k, *args, True)
    with pytest.raises(ValueError, match="decay"):
        kernels.lif_forward(x, None, torch.tensor([0.5, 0.5], device=x.device), *args, True)
    with pytest.raises(ValueError, match="surrogate"):
        kernels.lif_backward(x, None, x, None, k, True, False, 1.0, 0.0, True, 7, 4.0, True, False, False, False)
    with pytest.raises(ValueError, match="decay_is_tau"):
        kernels.lif_backward(x, None, x, None, k, True, True, 1.0, 0.0, True, 0, 4.0, True, False, True, False)
    with pytest.raises(ValueError, match="grad_spikes"):
        kernels.lif_backward(x[:2], None, x, None, k, True, False, 1.0, 0.0, True, 0, 4.0, True, False, False, False)
    spikes, v_last = kernels.lif_forward(x[:, :0], None, k, *args, True)
    assert spikes.shape == (3, 0) and v_last.shape == (0,)


# --------------------------------------------------------------------------------------------- pooling

@pytest.mark.parametrize("shape", [(2, 37, 1), (3, 300, 7), (1, 5, 300)])
def test_pool_mean(shape):
    x = torch.randn(shape)
    _assert_close_fp32("pool_mean", kernels.pool_mean(x.to(DEVICE)).cpu(), x.mean(dim=(0, 2)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_pool_mean_half(dtype):
    x = torch.randn(4, 33, 9).to(dtype)
    out = kernels.pool_mean(x.to(DEVICE)).cpu()
    assert out.dtype == dtype
    _assert_within_reference_error("pool_mean", dtype, out, x.mean(dim=(0, 2)), x.double().mean(dim=(0, 2)))


def test_pool_mean_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        kernels.pool_mean(torch.randn(0, 3, 4, device=DEVICE))
    with pytest.raises(ValueError, match=r"\[T, R, S\]"):
        kernels.pool_mean(torch.randn(3, 4, device=DEVICE))


# ------------------------------------------------------------------------------------------ STARS loss

def _stars_features(batch, c_teacher, c_student, seed=0):
    """float64 teacher and student features, one [B, C] pair per layer."""
    g = torch.Generator().manual_seed(seed)
    zt = [torch.randn(batch, c, generator=g, dtype=torch.float64) * 1.7 + 0.3 for c in c_teacher]
    zs = [torch.randn(batch, c, generator=g, dtype=torch.float64) for c in c_student]
    return zt, zs


def _fused_stars(zt, zs, quantiles, thresholds, normalize, coef_rca, coef_tar):
    """kernels.stars_loss_fused on the kernels' device (delta 0.5, eps 0 as stars_loss's default), results
    on the CPU."""
    total, parts, grad_t, grad_s = kernels.stars_loss_fused(
        _dev(*zt), _dev(*zs), quantiles, thresholds, normalize, coef_rca, coef_tar, 0.5, 0.0)
    return total.cpu(), parts.cpu(), _cpu(*grad_t), _cpu(*grad_s)


def _reference_stars(zt, zs, **kwargs):
    """(total, d total/d zt, d total/d zs) from reference.stars_loss and autograd."""
    zt = [z.clone().requires_grad_() for z in zt]
    zs = [z.clone().requires_grad_() for z in zs]
    total = reference.stars_loss(zt, zs, **kwargs)[0]
    total.backward()
    return total.detach(), [z.grad for z in zt], [z.grad for z in zs]


# Tolerances against the float64 reference, by input dtype: (rtol of the loss, rtol of the gradients
# relative to their largest entry). fp32: the kernels accumulate in fp32; half inputs: bounded by
# twice the reference's own error in that dtype instead (_assert_within_reference_error).
STARS_FP32_TOL = dict(loss=1e-5, grad=2e-5)

STARS_CASES = [  # (B, teacher channels, student channels, quantiles, normalize, weights, (lambda_rca, lambda_tar))
    pytest.param(2, [5], [3], (0.6, 0.9), False, None, (1.0, 1.0), id="B2-1layer"),
    pytest.param(33, [20, 48], [40, 9], (0.6, 0.7, 0.8, 0.9, 0.95), True, [1.0, 2.0], (1.0, 1.0), id="B33-2layers"),
    pytest.param(33, [16, 7, 24], [24, 30, 5], (0.5, 0.75, 0.95), False, [0.5, 1.0, 2.0], (0.3, 2.0),
                 id="B33-3layers"),
    pytest.param(17, [6, 5, 4, 3, 8], [3, 4, 5, 6, 2], (0.0, 0.7, 1.0), True, None, (1.0, 1.0),
                 id="B17-5layers-2launches"),
]


def _coefs(weights, lambdas, n):
    w = weights or [1.0] * n
    return [lambdas[0] * wl / sum(w) for wl in w], [lambdas[1] * wl / sum(w) for wl in w]


@pytest.mark.parametrize("batch, c_teacher, c_student, quantiles, normalize, weights, lambdas", STARS_CASES)
def test_stars_loss_matches_reference(batch, c_teacher, c_student, quantiles, normalize, weights, lambdas):
    """Quantile thresholds and normalization computed by the kernels, against the float64 reference."""
    zt, zs = _stars_features(batch, c_teacher, c_student)
    coef_rca, coef_tar = _coefs(weights, lambdas, len(zt))
    total, parts, grad_t, grad_s = _fused_stars(
        [z.float() for z in zt], [z.float() for z in zs], quantiles, None, normalize, coef_rca, coef_tar)
    assert total.shape == () and total.dtype == torch.float32 and parts.shape == (len(zt), 2)

    common = dict(quantiles=quantiles, normalize="teacher" if normalize else None)
    # the reference on the same fp32-rounded features, evaluated in float64
    zt64, zs64 = [z.float().double() for z in zt], [z.float().double() for z in zs]
    want, want_t, want_s = _reference_stars(zt64, zs64, weights=weights, lambda_rca=lambdas[0],
                                            lambda_tar=lambdas[1], **common)
    tol = STARS_FP32_TOL
    torch.testing.assert_close(total.double(), want, rtol=tol["loss"], atol=1e-7)
    for layer in range(len(zt)):
        _, rca, tar = reference.stars_loss([zt64[layer]], [zs64[layer]], **common)
        torch.testing.assert_close(parts[layer].double(), torch.stack([rca, tar]), rtol=tol["loss"], atol=1e-7)
    for g, w_ in zip(grad_t + grad_s, want_t + want_s):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w_, rtol=tol["grad"], atol=tol["grad"] * w_.abs().max().item())


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
def test_stars_thresholds_are_torch_quantile(normalize):
    """Launch 1 alone: shift/scale are the teacher's mean and 1/std, and theta is torch.quantile of
    (z - shift) * scale computed with those constants: bit for bit at integer ranks, to 1 ulp otherwise
    (torch's lerp may fuse its multiply-add). Ties and a negative/positive mix exercise the radix keys."""
    stars = sys.modules["stars_fast.kernels.stars"]
    g = torch.Generator().manual_seed(3)
    zt = (torch.randn(9, 13, generator=g) * 2.0 - 0.5)
    zt[0, :5] = 0.75  # ties
    zt[1, 0] = -0.0
    zs = torch.randn(9, 4, generator=g)
    n = zt.numel()  # 117: q * (n - 1) is an integer rank for q = k / 116
    quantiles = [0.0, 29 / 116, 0.5, 0.6, 0.7, 0.9, 0.95, 1.0]
    consts = torch.empty(stars._SLOTS, stars._CONSTS + len(quantiles), device=DEVICE)
    tar = torch.empty(stars._SLOTS, len(quantiles), 2, device=DEVICE)
    norms = torch.empty(stars._SLOTS, 2, zt.shape[0], device=DEVICE)
    counter = torch.empty(1, dtype=torch.int32, device=DEVICE)
    z_args = [zt.to(DEVICE)] * stars._SLOTS + [zs.to(DEVICE)] * stars._SLOTS
    stars._launch_stats(z_args, [zt], [zs], 0, 1, quantiles, False, normalize, 0.5, 1e-12, consts, tar, norms,
                        counter)
    shift, scale, theta = consts[0, 0].cpu(), consts[0, 1].cpu(), consts[0, stars._CONSTS:].cpu()
    if normalize:
        z64 = zt.double()
        torch.testing.assert_close(shift.double(), z64.mean(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(scale.double(), 1.0 / z64.std(correction=0), rtol=1e-6, atol=0.0)
    else:
        assert shift.item() == 0.0 and scale.item() == 1.0
    want = torch.quantile(((zt - shift) * scale).flatten(), torch.tensor(quantiles))
    integer_rank = [q * (n - 1) == int(q * (n - 1)) for q in quantiles]
    assert torch.equal(theta[integer_rank], want[integer_rank])
    torch.testing.assert_close(theta, want, rtol=2 ** -22, atol=0.0)
    zt[2, 3] = float("nan")  # torch.quantile: any NaN makes every quantile NaN
    z_args = [zt.to(DEVICE)] * stars._SLOTS + [zs.to(DEVICE)] * stars._SLOTS
    stars._launch_stats(z_args, [zt], [zs], 0, 1, quantiles, False, False, 0.5, 1e-12, consts, tar, norms, counter)
    assert torch.isnan(consts[0, stars._CONSTS:]).all()


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
def test_stars_fixed_thresholds(normalize):
    """Fixed thresholds (kernel scalars, in normalized coordinates) shared by every layer."""
    zt, zs = _stars_features(16, [12, 7], [5, 9], seed=2)
    fixed = [-0.3, 0.4, 1.1]
    total, _, grad_t, grad_s = _fused_stars([z.float() for z in zt], [z.float() for z in zs], [0.5], fixed,
                                            normalize, [0.5, 0.5], [0.5, 0.5])
    want, want_t, want_s = _reference_stars([z.float().double() for z in zt], [z.float().double() for z in zs],
                                            thresholds=fixed, normalize="teacher" if normalize else None)
    tol = STARS_FP32_TOL
    torch.testing.assert_close(total.double(), want, rtol=tol["loss"], atol=1e-7)
    for g, w_ in zip(grad_t + grad_s, want_t + want_s):
        torch.testing.assert_close(g.double(), w_, rtol=tol["grad"], atol=tol["grad"] * w_.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_stars_loss_half_inputs(dtype):
    """Loss and gradients within twice the reference's own error in that dtype (vs float64).

    Fixed thresholds (the reference's torch.quantile has no half kernel), shared by both layers.
    """
    zt, zs = _stars_features(33, [24, 12], [10, 20], seed=1)
    zt = [z.to(dtype) for z in zt]
    zs = [z.to(dtype) for z in zs]
    fixed = [0.2, 0.9, 1.6]
    total, _, grad_t, grad_s = _fused_stars(zt, zs, [0.5], fixed, False, [0.5] * 2, [0.5] * 2)
    assert all(g.dtype == dtype for g in grad_t + grad_s)
    same = _reference_stars(zt, zs, thresholds=fixed)
    exact = _reference_stars([z.double() for z in zt], [z.double() for z in zs], thresholds=fixed)
    _assert_within_reference_error("total", torch.float32, total, same[0], exact[0])
    for g, s_, e in zip(grad_t + grad_s, same[1] + same[2], exact[1] + exact[2]):
        _assert_within_reference_error("gradient", dtype, g, s_, e)


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("case", ["all-1e20", "one-1e30"])
def test_stars_loss_huge_features_stay_finite(case, normalize):
    """Huge features: rows are scaled by a power of two before the Gram (and the teacher before its
    moments), so huge features give the float64 reference's loss and gradients, not NaN."""
    zt, zs = _stars_features(8, [6], [5], seed=4)
    if case == "all-1e20":
        zt, zs = [zt[0] * 1e20], [zs[0] * 1e20]
    else:
        zt[0][1, 2] = 1e30
    zt, zs = [zt[0].float()], [zs[0].float()]
    total, parts, grad_t, grad_s = _fused_stars(zt, zs, (0.6, 0.9), None, normalize, [1.0], [1.0])
    assert torch.isfinite(total) and torch.isfinite(parts).all()
    assert all(torch.isfinite(g).all() for g in grad_t + grad_s)
    want, want_t, want_s = _reference_stars([zt[0].double()], [zs[0].double()], quantiles=(0.6, 0.9),
                                            normalize="teacher" if normalize else None)
    torch.testing.assert_close(total.double(), want, rtol=1e-5, atol=1e-7)
    for g, w_ in zip(grad_t + grad_s, want_t + want_s):
        torch.testing.assert_close(g.double(), w_, rtol=2e-5, atol=2e-5 * w_.abs().max().item())


def test_stars_loss_zero_rows_and_nan():
    """Rows of zeros are silent (no pair, no RCA gradient): a finite loss and gradients; NaN inputs give NaN."""
    zt, zs = _stars_features(4, [6], [5])
    zt[0][1] = 0.0
    zs[0][2] = 0.0
    total, parts, grad_t, grad_s = _fused_stars(
        [z.float() for z in zt], [z.float() for z in zs], (0.5, 0.9), None, False, [1.0], [1.0])
    want, want_t, want_s = _reference_stars(zt, zs, quantiles=(0.5, 0.9))
    assert torch.isfinite(total) and all(torch.isfinite(g).all() for g in grad_t + grad_s)
    torch.testing.assert_close(total.double(), want, rtol=1e-5, atol=1e-7)
    for g, w_ in zip(grad_t + grad_s, want_t + want_s):
        torch.testing.assert_close(g.double(), w_, rtol=1e-4, atol=1e-5 * w_.abs().max().item())
    zs[0][0, 0] = float("nan")
    total = _fused_stars([z.float() for z in zt], [z.float() for z in zs], (0.5, 0.9), None, False, [1.0], [1.0])[0]
    assert torch.isnan(total)


def _silent_rows_case(case):
    """(zt, zs) float32 [B, C] of one layer with rows that the silent-row rule (docs/design.md 2.2) drops."""
    batch = 37 if case.startswith("B37") else (2 if case.startswith("B2") else 16)
    zt, zs = _stars_features(batch, [8], [6], seed=6)
    zt, zs = zt[0].float(), zs[0].float()
    if case == "zero-student-row":
        zs[3] = 0.0
    elif case == "zero-teacher-row":
        zt[7] = 0.0
    elif case == "row-1e-7":
        zs[5] *= 1e-7
    elif case == "rows-2e-3-active-5e-4-silent":  # relative to the largest row norm of the side
        zs *= (1.0 / zs.norm(dim=1, keepdim=True))
        zs[2] *= 2e-3
        zs[9] *= 5e-4
    elif case == "all-zero-student":
        zs.zero_()
    elif case == "all-zero-teacher":
        zt.zero_()
    elif case == "B2-one-silent":  # n_A = 1: no pair
        zs[1] = 0.0
    elif case in ("scale-1e-20", "scale-1e20"):  # the rule is scale-invariant: the same rows drop
        zs[4] = 0.0
        zs[6] *= 5e-4
        scale = 1e-20 if case == "scale-1e-20" else 1e20
        zt, zs = zt * scale, zs * scale
    elif case == "B37-silent-in-several-row-blocks":
        zs[[0, 17, 30]] = 0.0
        zt[[5, 36]] *= 1e-4
    return zt, zs


SILENT_CASES = ["zero-student-row", "zero-teacher-row", "row-1e-7", "rows-2e-3-active-5e-4-silent",
                "all-zero-student", "all-zero-teacher", "B2-one-silent", "scale-1e-20", "scale-1e20",
                "B37-silent-in-several-row-blocks"]


@pytest.mark.parametrize("n_m", [1, 3])
@pytest.mark.parametrize("case", SILENT_CASES + ["nan-row", "inf-row"])
def test_stars_row_norms_are_the_references(case, n_m):
    """Launch 1 alone: the row norms its M programs share out (the silent-row rule's input) are
    reference._row_norms to 1 ulp, the power-of-two scaling keeping them exact at 1e-20 and 1e20."""
    stars = sys.modules["stars_fast.kernels.stars"]
    assert stars._RCA_SILENT_TOL == reference.RCA_SILENT_TOL
    zt, zs = _silent_rows_case("zero-student-row" if case in ("nan-row", "inf-row") else case)
    if case == "nan-row":
        zs[6, 2] = float("nan")
    elif case == "inf-row":
        zt[2, 1] = float("inf")
    thresholds = [0.5, 0.7, 0.9][:n_m]
    consts = torch.empty(stars._SLOTS, stars._CONSTS + n_m, device=DEVICE)
    tar = torch.empty(stars._SLOTS, n_m, 2, device=DEVICE)
    norms = torch.full((stars._SLOTS, 2, zt.shape[0]), -1.0, device=DEVICE)
    counter = torch.empty(1, dtype=torch.int32, device=DEVICE)
    z_args = [zt.to(DEVICE)] * stars._SLOTS + [zs.to(DEVICE)] * stars._SLOTS
    stars._launch_stats(z_args, [zt], [zs], 0, 1, thresholds, True, False, 0.5, 1e-12, consts, tar, norms, counter)
    norm_t, norm_s = norms[0].cpu()
    torch.testing.assert_close(norm_t.double(), reference._row_norms(zt.double())[:, 0], rtol=2 ** -23, atol=0.0,
                               equal_nan=True)
    torch.testing.assert_close(norm_s.double(), reference._row_norms(zs.double())[:, 0], rtol=2 ** -23, atol=0.0,
                               equal_nan=True)


@pytest.mark.parametrize("case", ["nan-student-row", "inf-teacher-row", "inf-row-beside-a-zero-row"])
def test_stars_loss_no_silent_rows_beside_nan_or_inf(case):
    """Where a side's largest row norm is NaN or inf, none of its rows is silent (else tau * inf would
    silence them all): the loss is NaN, as the reference's."""
    zt, zs = _silent_rows_case("zero-student-row")
    if case == "nan-student-row":
        zs[6, 2] = float("nan")
    elif case == "inf-teacher-row":
        zt[2, 1] = float("inf")
    else:
        zs[3] = 1.0
        zs[2, 1] = float("inf")
        zt[5] = 0.0
    total, parts, _, _ = _fused_stars([zt], [zs], (0.6, 0.9), None, False, [1.0], [1.0])
    want = _reference_stars([zt.double()], [zs.double()], quantiles=(0.6, 0.9))[0]
    _, rca, _ = reference.stars_loss([zt.double()], [zs.double()], quantiles=(0.6, 0.9))
    assert torch.isnan(want) and torch.isnan(rca)
    assert torch.isnan(total) and torch.isnan(parts[0, 0])


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("case", SILENT_CASES)
def test_stars_loss_silent_rows_match_reference(case, normalize):
    """Silent rows leave the pairs and get only their TAR gradient; fewer than two rows of A give
    l_rca = 0 with zero RCA gradients; features at 1e-20 (subnormal squares) and 1e20 (overflowing
    squares) keep exact row norms. Against the float64 reference on the same fp32 features."""
    zt, zs = _silent_rows_case(case)
    total, parts, grad_t, grad_s = _fused_stars([zt], [zs], (0.6, 0.9), None, normalize, [1.0], [1.0])
    assert torch.isfinite(total) and torch.isfinite(parts).all()
    assert all(torch.isfinite(g).all() for g in grad_t + grad_s)
    common = dict(quantiles=(0.6, 0.9), normalize="teacher" if normalize else None)
    want, want_t, want_s = _reference_stars([zt.double()], [zs.double()], **common)
    _, rca, tar = reference.stars_loss([zt.double()], [zs.double()], **common)
    torch.testing.assert_close(total.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts[0].double(), torch.stack([rca, tar]).double(), rtol=1e-5, atol=1e-7)
    if case in ("all-zero-student", "all-zero-teacher", "B2-one-silent"):
        assert parts[0, 0].item() == 0.0
    for g, w_ in zip(grad_t + grad_s, want_t + want_s):
        torch.testing.assert_close(g.double(), w_, rtol=2e-5, atol=2e-5 * w_.abs().max().item())


def test_stars_loss_inf_in_a_silent_row():
    """An inf feature in a row that is silent on the other side: the row is out of every pair, so the
    loss and the other rows' gradients stay finite, and the row itself gets its TAR gradient only
    (sigma' = 0 at inf), as in the reference, whose silent rows take no part in its autograd."""
    zt, zs = _silent_rows_case("zero-teacher-row")
    zs[7, 1] = float("inf")
    total, parts, grad_t, grad_s = _fused_stars([zt], [zs], (0.6, 0.9), None, False, [1.0], [1.0])
    want, want_t, want_s = _reference_stars([zt.double()], [zs.double()], quantiles=(0.6, 0.9))
    torch.testing.assert_close(total.double(), want, rtol=1e-5, atol=1e-7)
    assert grad_s[0][7, 1].item() == 0.0 == want_s[0][7, 1].item()
    for g, w_ in zip(grad_t + grad_s, want_t + want_s):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w_, rtol=2e-5, atol=2e-5 * w_.abs().max().item())


def test_stars_loss_bad_inputs():
    z = torch.randn(4, 3, device=DEVICE)
    args = ([0.5], None, False, [1.0], [1.0], 0.5, 1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        kernels.stars_loss_fused([z[:1]], [z[:1]], *args)
    with pytest.raises(ValueError, match="same batch size"):
        kernels.stars_loss_fused([z], [z[:3]], *args)
    with pytest.raises(ValueError, match="one entry per layer"):
        kernels.stars_loss_fused([z, z], [z], *args)
    with pytest.raises(ValueError, match="one dtype"):
        kernels.stars_loss_fused([z, z.half()], [z, z], [0.5], None, False, [1.0] * 2, [1.0] * 2, 0.5, 1e-12)
    with pytest.raises(ValueError, match="threshold"):
        kernels.stars_loss_fused([z], [z], [], None, False, [1.0], [1.0], 0.5, 1e-12)
    with pytest.raises(ValueError, match="eps >= 0"):
        kernels.stars_loss_fused([z], [z], [0.5], None, False, [1.0], [1.0], 0.5, -1e-12)
