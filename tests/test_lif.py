"""The neuron op through its public API, on every backend usable on the CPU, against
stars_fast.reference (plain PyTorch autograd), SpikingJelly when installed, and hand-computed values."""
import itertools
import math

import pytest
import torch

import stars_fast
from stars_fast import reference
from stars_fast.neurons import IFNode, LIFNode, ParametricLIFNode, make_neuron
from stars_fast._backend import triton_interpreter
from stars_fast.ops.lif import multistep_neuron

from conftest import require_backend

FUSED = ["cpu", "triton"]  # triton runs under TRITON_INTERPRET=1 without a GPU (see conftest.py)
EXTENSION = ["cpu"]  # float64 (gradcheck) and torch.compile checks: Triton's interpreter is fp32-exact only
# Gradient tolerances per dtype (rtol, atol): fp32 sums over T steps of O(1) terms.
GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12)}

OPTION_GRID = [
    dict(neuron=n, v_reset=vr, decay_input=di, detach_reset=dr, surrogate=sg)
    for n, vr, di, dr, sg in itertools.product(
        ["lif", "if"], [0.0, -0.5, None], [True, False], [False, True], ["sigmoid", "atan", "triangle"])
    if not (n == "if" and not di)  # decay_input means nothing for IF
]


def _ids(opts):
    return "-".join(f"{k}={v}" for k, v in opts.items())


def _run(backend, x, v_init=None, decay=(("inv_tau", 0.5),), **opts):
    x = x.detach().clone().requires_grad_(True)
    v0 = None if v_init is None else v_init.detach().clone().requires_grad_(True)
    spikes, v_last = multistep_neuron(x, v_init=v0, backend=backend, **dict(decay), **opts)
    return x, v0, spikes, v_last


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("opts", OPTION_GRID, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("decay", [(("inv_tau", 0.5),), (("tau", 3.0),)], ids=["inv_tau=0.5", "tau=3"])
def test_matches_reference(backend, opts, dtype, decay):
    require_backend(backend)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take fp32/fp16/bf16")
    T, shape = 4, (3, 37)  # 111 elements: not a multiple of any block size
    x = torch.randn(T, *shape, dtype=dtype) * 1.5 + 0.4
    v_init = torch.randn(shape, dtype=dtype) * 0.3
    grad_s = torch.randn(T, *shape, dtype=dtype)
    grad_v = torch.randn(shape, dtype=dtype)
    results = {}
    for name in ("reference", backend):
        xr, v0, spikes, v_last = _run(name, x, v_init, decay, **opts)
        torch.autograd.backward([spikes, v_last], [grad_s, grad_v])
        results[name] = (spikes.detach(), v_last.detach(), xr.grad, v0.grad)
    ref, got = results["reference"], results[backend]
    assert torch.equal(got[0], ref[0]), "spikes must be bit-identical to the reference"
    rtol, atol = GRAD_TOL[dtype]
    for name, g, r in zip(("v_last", "grad_x", "grad_v_init"), got[1:], ref[1:]):
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("T,numel", [(1, 1), (1, 1000), (7, 1003), (16, 4099)])
def test_shapes_and_defaults(backend, T, numel):
    require_backend(backend)
    x = torch.randn(T, numel) * 2
    ref = stars_fast.multistep_lif(x, backend="reference", return_v=True)
    got = stars_fast.multistep_lif(x, backend=backend, return_v=True)
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_hand_computed_if_and_lif(backend):
    require_backend(backend)
    x = torch.tensor([[0.6], [0.6], [0.6], [1.0]])
    # IF, hard reset to 0, threshold 1: v = 0.6, 1.2 -> spike, reset 0, 0.6, 1.6 -> spike.
    s, v = stars_fast.multistep_lif(x, neuron="if", return_v=True, backend=backend)
    assert s.flatten().tolist() == [0.0, 1.0, 0.0, 1.0] and v.item() == 0.0
    # LIF tau=2, decay_input: h = v + (x - v)/2: 0.3, 0.45, 0.525, 0.7625 -> no spike.
    s, v = stars_fast.multistep_lif(x, tau=2.0, return_v=True, backend=backend)
    assert s.sum().item() == 0.0 and v.item() == pytest.approx(0.7625)
    # Soft reset keeps the surplus: IF with v_reset=None: 0.6, 1.2 -> 0.2, 0.8, 1.8 -> 0.8.
    s, v = stars_fast.multistep_lif(x, neuron="if", v_reset=None, return_v=True, backend=backend)
    assert s.flatten().tolist() == [0.0, 1.0, 0.0, 1.0] and v.item() == pytest.approx(0.8)
    # Theta(0) = 1: a membrane exactly at threshold fires.
    assert stars_fast.multistep_lif(torch.tensor([[1.0]]), neuron="if", backend=backend).item() == 1.0


@pytest.mark.parametrize("backend", ["reference"] + EXTENSION)
@pytest.mark.parametrize("surrogate", ["sigmoid", "atan", "triangle"])
@pytest.mark.parametrize("neuron,v_reset,decay_input", [("lif", 0.0, True), ("lif", -0.3, False), ("if", None, True)])
def test_gradcheck_smooth_mode(backend, surrogate, neuron, v_reset, decay_input):
    """spiking=False makes the forward the surrogate's primitive, so the surrogate backward is the
    exact derivative: float64 gradcheck over x, v_init and (PLIF) 1/tau."""
    require_backend(backend)
    x = (torch.randn(3, 2, 5, dtype=torch.float64) * 0.8 + 0.5).requires_grad_(True)
    v_init = (torch.randn(2, 5, dtype=torch.float64) * 0.2).requires_grad_(True)
    inv_tau = torch.tensor(0.4, dtype=torch.float64, requires_grad=neuron == "lif")
    opts = dict(neuron=neuron, v_reset=v_reset, decay_input=decay_input, surrogate=surrogate, spiking=False,
                backend=backend)

    def fn(x, v_init, inv_tau):
        spikes, v_last = multistep_neuron(x, inv_tau, v_init=v_init, **opts)
        return spikes, v_last

    assert torch.autograd.gradcheck(fn, (x, v_init, inv_tau), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", FUSED)
def test_plif_tau_gradient(backend):
    require_backend(backend)
    x = torch.randn(4, 2, 33) + 0.5
    grads = {}
    for name in ("reference", backend):
        node = ParametricLIFNode(init_tau=3.0, backend=name)
        node(x).sum().backward()
        grads[name] = node.w.grad
    torch.testing.assert_close(grads[backend], grads["reference"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_matches_spikingjelly(backend):
    """An independent implementation: SpikingJelly 2.0's multi-step nodes on the same options."""
    require_backend(backend)
    sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    sj_surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")
    x = torch.randn(6, 4, 50) * 1.5 + 0.3
    cases = [
        (sj_neuron.LIFNode(tau=2.0, surrogate_function=sj_surrogate.Sigmoid(), step_mode="m"),
         LIFNode(tau=2.0, backend=backend)),
        (sj_neuron.LIFNode(tau=2.0, decay_input=False, v_reset=None, detach_reset=True,
                           surrogate_function=sj_surrogate.ATan(), step_mode="m"),
         LIFNode(tau=2.0, decay_input=False, v_reset=None, detach_reset=True, surrogate="atan", backend=backend)),
        (sj_neuron.IFNode(v_reset=-0.5, surrogate_function=sj_surrogate.ATan(alpha=3.0), step_mode="m"),
         IFNode(v_reset=-0.5, surrogate="atan", alpha=3.0, backend=backend)),
        (sj_neuron.ParametricLIFNode(init_tau=2.0, surrogate_function=sj_surrogate.Sigmoid(), step_mode="m"),
         ParametricLIFNode(init_tau=2.0, backend=backend)),
    ]
    for sj_node, node in cases:
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        sa, sb = sj_node(xa), node(xb)
        assert torch.equal(sa, sb), type(node).__name__
        g = torch.randn_like(sa)
        sa.backward(g)
        sb.backward(g)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)
        if isinstance(node, ParametricLIFNode):
            torch.testing.assert_close(node.w.grad, sj_node.w.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend):
    require_backend(backend)
    from stars_fast.ops import lif

    if backend == "triton":
        lif.multistep_neuron(torch.zeros(1, 1), 0.5, backend="triton")  # defines the op on the first triton call
    _triton_neuron = lif._triton_neuron
    x = torch.randn(3, 20, requires_grad=True)
    v_init = torch.randn(20, requires_grad=True)
    inv_tau = torch.tensor([0.5], requires_grad=True)
    tau = torch.tensor([3.0])
    for args in [(x, v_init, inv_tau, True, False, 1.0, 0.0, True, 0, 4.0, True, False, True),
                 (x, v_init, tau, True, True, 1.0, None, False, 2, 1.0, True, True, False),
                 (x, None, inv_tau.detach(), False, False, 1.0, None, True, 1, 2.0, False, True, True)]:
        if backend == "triton" and triton_interpreter():
            # Under the interpreter a Triton launch reads real data pointers, so the AOT-dispatch
            # check (which traces with fake tensors) cannot run the kernel; on a GPU it runs it all.
            torch.library.opcheck(_triton_neuron, args, test_utils=(
                "test_schema", "test_autograd_registration", "test_faketensor"))
        elif backend == "triton":
            torch.library.opcheck(_triton_neuron, args)
        else:  # the C++ ops under stars_fast.ops.lif._ExtNeuron (autograd: the gradient tests)
            x_, v_init_, decay = (t.detach() if t is not None else None for t in args[:3])
            options, need_v_last = args[3:12], args[12]
            torch.library.opcheck(torch.ops.stars_fast.lif_forward, (x_, v_init_, decay, *options[:-1], need_v_last))
            grad_v_last = torch.randn(20) if need_v_last else None
            need_decay_grad = options[0] and not options[1]  # leaky, with decay holding k
            torch.library.opcheck(torch.ops.stars_fast.lif_backward, (torch.randn(3, 20), grad_v_last, x_, v_init_,
                                                                     decay, *options, need_decay_grad, v_init_ is not None))


@pytest.mark.parametrize("backend", EXTENSION)
def test_torch_compile_fullgraph(backend):
    require_backend(backend)

    def step(x):
        return stars_fast.multistep_lif(x, tau=2.0, backend=backend).sum(dim=0)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 64) + 0.5
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = compiled(xa), step(xb)
    assert torch.equal(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_bad_inputs(backend):
    require_backend(backend)
    with pytest.raises(TypeError, match="floating-point"):
        stars_fast.multistep_lif(torch.ones(4, 3, dtype=torch.int64), backend=backend)
    with pytest.raises(ValueError, match="time dimension"):
        stars_fast.multistep_lif(torch.tensor(1.0), backend=backend)
    with pytest.raises(ValueError, match="unknown surrogate"):
        stars_fast.multistep_lif(torch.randn(4, 3), surrogate="relu", backend=backend)
    with pytest.raises(ValueError, match="unknown neuron"):
        stars_fast.multistep_lif(torch.randn(4, 3), neuron="izhikevich", backend=backend)
    with pytest.raises(ValueError, match="v_init"):
        stars_fast.multistep_lif(torch.randn(4, 3), v_init=torch.zeros(5), backend=backend)
    with pytest.raises(ValueError, match="tau"):
        stars_fast.multistep_lif(torch.randn(4, 3), tau=0.5, backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        stars_fast.multistep_lif(torch.randn(4, 3), backend="fpga")


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_edge_inputs_give_correct_answers(backend):
    require_backend(backend)
    # Empty tensors: empty spikes, and v_last from v_init / v_reset.
    assert stars_fast.multistep_lif(torch.randn(4, 0), backend=backend).shape == (4, 0)
    s, v = stars_fast.multistep_lif(torch.randn(0, 3), return_v=True, backend=backend)
    assert s.shape == (0, 3) and torch.equal(v, torch.zeros(3))
    # Non-contiguous input: same as its contiguous copy.
    x = torch.randn(5, 8, 6).transpose(1, 2)
    assert torch.equal(stars_fast.multistep_lif(x, backend=backend),
                       stars_fast.multistep_lif(x.contiguous(), backend="reference"))
    # NaN in, NaN out (never a silent 0 spike); the other elements are unaffected.
    x = torch.randn(3, 4) + 1
    x[1, 2] = float("nan")
    s = stars_fast.multistep_lif(x, backend=backend)
    assert torch.isnan(s[1:, 2]).all() and not torch.isnan(s[:, [0, 1, 3]]).any()
    # A broadcastable v_init (a scalar) is accepted.
    s1 = stars_fast.multistep_lif(x.nan_to_num(), v_init=torch.tensor(0.25), backend=backend)
    s2 = stars_fast.multistep_lif(x.nan_to_num(), v_init=torch.full((4,), 0.25), backend="reference")
    assert torch.equal(s1, s2)


# --- divide by tau, as SpikingJelly 2.0's LIFNode -------------------------------------------------

# x / 3 (IEEE division) rounds one ulp below x * fp32(1/3): with the threshold at the product, a
# neuron that multiplies by fp32(1/tau) fires, one that divides by tau does not.
DIVIDE_X = float.fromhex("0x1.9dc8f0p+1")
DIVIDE_TH = float.fromhex("0x1.13db4cp+0")


def _sj_lif(**kwargs):
    sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    sj_surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")
    return sj_neuron.LIFNode(surrogate_function=sj_surrogate.Sigmoid(), step_mode="m", **kwargs)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_lif_divides_by_tau_like_spikingjelly(backend):
    """Spikes bit-equal to SpikingJelly's LIFNode(step_mode='m') (its CPU torch backend) and to our
    reference on a case where multiplying by fp32(1/tau) fires and dividing by tau does not."""
    require_backend(backend)
    x = torch.full((1, 1, 8), DIVIDE_X)
    assert (x / 3.0).max().item() < DIVIDE_TH <= (x * torch.tensor(1.0 / 3.0)).min().item()
    sj = _sj_lif(tau=3.0, v_threshold=DIVIDE_TH)
    expected = sj(x)
    assert expected.sum().item() == 0.0
    got = stars_fast.multistep_lif(x, tau=3.0, v_threshold=DIVIDE_TH, backend=backend)
    assert torch.equal(got, expected)
    assert torch.equal(got, stars_fast.multistep_lif(x, tau=3.0, v_threshold=DIVIDE_TH, backend="reference"))
    multiplied, _ = multistep_neuron(x, 1.0 / 3.0, v_threshold=DIVIDE_TH, backend=backend)
    assert multiplied.sum().item() == 8.0  # the multiply form would have fired


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
@pytest.mark.parametrize("tau", [3.0, 2.7, 5.0, 1.3])
@pytest.mark.parametrize("decay_input,v_reset", [(True, 0.0), (False, 0.0), (True, None), (False, -0.25)])
def test_lif_matches_spikingjelly_for_any_tau(backend, tau, decay_input, v_reset):
    require_backend(backend)
    x = torch.randn(8, 4, 257) * 1.5 + 0.5
    sj = _sj_lif(tau=tau, decay_input=decay_input, v_reset=v_reset)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    expected = sj(xa)
    got = stars_fast.multistep_lif(xb, tau=tau, decay_input=decay_input, v_reset=v_reset, backend=backend)
    assert torch.equal(got, expected)
    assert torch.equal(got, stars_fast.multistep_lif(x, tau=tau, decay_input=decay_input, v_reset=v_reset,
                                                     backend="reference"))
    g = torch.randn_like(x)
    expected.backward(g)
    got.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)


# --- minimal traffic: what the backward op is asked for ------------------------------------------

class _RecordBackward(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.stars_fast.lif_forward.default, torch.ops.stars_fast.lif_backward.default):
            self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", EXTENSION)
def test_only_needed_outputs_are_computed(backend):
    require_backend(backend)
    x = (torch.randn(4, 3, 17) + 0.5).requires_grad_(True)
    with _RecordBackward() as rec:
        spikes = stars_fast.multistep_lif(x, tau=2.0, backend=backend)
        spikes.sum().backward()
    (fwd, fwd_args), (bwd, bwd_args) = rec.calls
    assert fwd_args[-1] is False  # need_v_last
    assert bwd_args[1] is None  # grad_v_last: not materialized as zeros
    assert bwd_args[-1] is False and bwd_args[-2] is False  # need_grad_v_init, need_decay_grad
    # with v_init needing grad and v_last returned, both are computed
    v0 = torch.zeros(3, 17, requires_grad=True)
    with _RecordBackward() as rec:
        spikes, v_last = stars_fast.multistep_lif(x, tau=2.0, v_init=v0, return_v=True, backend=backend)
        (spikes.sum() + v_last.sum()).backward()
    (_, fwd_args), (_, bwd_args) = rec.calls
    assert fwd_args[-1] is True and bwd_args[1] is not None and bwd_args[-1] is True
    assert v0.grad is not None and v0.grad.shape == v0.shape
    # only v_last used: grad_spikes arrives as a stride-0 zero, and the result matches the reference
    xa, xb = x.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(True)
    stars_fast.multistep_lif(xa, tau=2.0, return_v=True, backend=backend)[1].sum().backward()
    stars_fast.multistep_lif(xb, tau=2.0, return_v=True, backend="reference")[1].sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)


# --- hardening: invalid arguments refused on every backend ----------------------------------------

@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_invalid_alpha_tau_and_thresholds_refused_on_every_backend(backend):
    require_backend(backend)
    x = torch.randn(4, 3)
    for alpha in (0.0, -1.0, float("nan"), float("inf")):
        for surrogate in ("sigmoid", "triangle"):
            with pytest.raises(ValueError, match="alpha"):
                stars_fast.multistep_lif(x, surrogate=surrogate, alpha=alpha, backend=backend)
    for tau in (float("inf"), float("nan"), 1.0, -3.0):
        with pytest.raises(ValueError, match="tau"):
            stars_fast.multistep_lif(x, tau=tau, backend=backend)
    for inv_tau in (0.0, -0.5, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="inv_tau"):
            multistep_neuron(x, inv_tau, backend=backend)
    with pytest.raises(ValueError, match="exactly one"):
        multistep_neuron(x, 0.5, tau=2.0, backend=backend)
    with pytest.raises(ValueError, match="exactly one"):
        multistep_neuron(x, backend=backend)
    with pytest.raises(ValueError, match="v_threshold"):
        stars_fast.multistep_lif(x, v_threshold=float("nan"), backend=backend)
    with pytest.raises(ValueError, match="v_reset"):
        stars_fast.multistep_lif(x, v_reset=float("inf"), backend=backend)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_if_ignores_tau(backend):
    require_backend(backend)
    x = torch.randn(4, 3) + 0.5
    expected = stars_fast.multistep_lif(x, neuron="if", backend="reference")
    for tau in (0.0, float("inf"), -1.0):
        assert torch.equal(stars_fast.multistep_lif(x, neuron="if", tau=tau, backend=backend), expected)
    assert torch.equal(multistep_neuron(x, neuron="if", backend=backend)[0], expected)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_zero_steps_stay_differentiable(backend):
    require_backend(backend)
    x = torch.randn(0, 3, 5, requires_grad=True)
    v0 = torch.randn(3, 5, requires_grad=True)
    spikes, v_last = stars_fast.multistep_lif(x, v_init=v0, return_v=True, backend=backend)
    assert spikes.shape == (0, 3, 5) and spikes.grad_fn is not None
    (spikes.sum() + v_last.sum()).backward()
    assert x.grad.shape == x.shape and torch.equal(v0.grad, torch.ones(3, 5))


@pytest.mark.parametrize("backend", ["reference"] + EXTENSION)
@pytest.mark.parametrize("surrogate", ["sigmoid", "atan", "triangle"])
@pytest.mark.parametrize("neuron,mode", [("lif", "tau"), ("lif", "inv_tau"), ("if", None)])
def test_double_backward_is_the_references(backend, surrogate, neuron, mode):
    """create_graph=True then a second grad: the fused ops give the reference's second derivatives
    (spiking=False, where they exist), never zeros; gradgradcheck in float64 on top."""
    require_backend(backend)
    x = (torch.randn(3, 2, 5, dtype=torch.float64) * 0.8 + 0.5).requires_grad_(True)
    v_init = (torch.randn(2, 5, dtype=torch.float64) * 0.2).requires_grad_(True)
    k = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    decay = {"tau": dict(tau=2.5), "inv_tau": dict(inv_tau=k), None: {}}[mode]
    opts = dict(neuron=neuron, surrogate=surrogate, spiking=False, v_init=v_init, **decay)

    def second_order(name):
        spikes, v_last = multistep_neuron(x, backend=name, **opts)
        g_x, = torch.autograd.grad((spikes ** 2).sum() + v_last.sum(), x, create_graph=True)
        wrt = [x, v_init] + ([k] if mode == "inv_tau" else [])
        return torch.autograd.grad((g_x ** 2).sum(), wrt, allow_unused=True)

    got, ref = second_order(backend), second_order("reference")
    for g, r in zip(got, ref):
        assert g is not None and r is not None and r.abs().max() > 0
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)

    def fn(x, v_init):
        return multistep_neuron(x, backend=backend, **{**opts, "v_init": v_init})

    assert torch.autograd.gradgradcheck(fn, (x, v_init), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_as_the_reference(backend, dtype):
    """Under torch.autocast the neuron runs as the reference does (elementwise ops are not autocast:
    outputs keep the input's dtype), forward and backward."""
    require_backend(backend)
    x = (torch.randn(4, 3, 33) + 0.5).to(dtype)
    results = {}
    for name in ("reference", backend):
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            spikes, v_last = multistep_neuron(xg, tau=2.0, backend=name)
            (spikes.float().sum() + v_last.float().sum()).backward()
        results[name] = (spikes, v_last, xg.grad)
    for got, ref in zip(results[backend], results["reference"]):
        assert got.dtype == ref.dtype == dtype
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("backend", FUSED)
def test_noncontiguous_and_broadcast_v_init(backend):
    require_backend(backend)
    x = torch.randn(4, 6, 5) + 0.5
    cases = [((5, 6), lambda v: v.t()),  # non-contiguous [6, 5]
             ((5,), lambda v: v),  # broadcast over the first axis
             ((6, 1), lambda v: v),  # broadcast over the last axis
             ((), lambda v: v.expand(6, 5)),  # stride-0 expand
             ((6, 5), lambda v: v.double())]  # another dtype
    for shape, view in cases:
        leaf = torch.randn(shape)
        results = {}
        for name in ("reference", backend):
            xg, v0 = x.clone().requires_grad_(True), leaf.clone().requires_grad_(True)
            spikes, v_last = multistep_neuron(xg, tau=2.0, v_init=view(v0), backend=name)
            (spikes.sum() + (v_last ** 2).sum()).backward()
            results[name] = (spikes, v_last, xg.grad, v0.grad)
        assert torch.equal(results[backend][0], results["reference"][0])
        for got, ref in zip(results[backend][1:], results["reference"][1:]):
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_channels_last_layout_kept(backend):
    """multistep_lif on [T, B, C, H, W] with channels-last steps: spikes with x's strides, v_last
    channels-last (from a v_init in the standard layout), values and gradients of a contiguous x."""
    require_backend(backend)
    x = torch.randn(3, 2, 4, 5, 6) * 1.5 + 0.4
    x_cl = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    v_init = torch.randn(2, 4, 5, 6) * 0.3
    g_s, g_v = torch.randn_like(x), torch.randn(2, 4, 5, 6)
    results = []
    for xs, name in ((x, "reference"), (x_cl, backend)):
        xg = xs.clone(memory_format=torch.preserve_format).requires_grad_(True)
        v0 = v_init.clone().requires_grad_(True)
        spikes, v_last = stars_fast.multistep_lif(xg, tau=2.0, v_init=v0, return_v=True, backend=name)
        ((spikes * g_s).sum() + (v_last * g_v).sum()).backward()
        results.append((spikes, v_last, xg.grad, v0.grad))
    spikes, v_last = results[1][:2]
    assert spikes.stride() == x_cl.stride() and v_last.is_contiguous(memory_format=torch.channels_last)
    assert results[1][2].stride() == x_cl.stride()
    assert torch.equal(spikes, results[0][0])
    for got, ref in zip(results[1][1:], results[0][1:]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_make_neuron_and_modules_share_defaults():
    assert isinstance(make_neuron("plif"), ParametricLIFNode)
    with pytest.raises(ValueError):
        make_neuron("hh")
    node = ParametricLIFNode(init_tau=2.0)
    assert node.inv_tau().item() == pytest.approx(0.5)
    assert math.isclose(LIFNode().tau, 2.0) and IFNode().v_reset == 0.0
