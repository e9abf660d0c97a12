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


def _run(backend, x, v_init=None, inv_tau=0.5, **opts):
    x = x.detach().clone().requires_grad_(True)
    v0 = None if v_init is None else v_init.detach().clone().requires_grad_(True)
    spikes, v_last = multistep_neuron(x, inv_tau, v_init=v0, backend=backend, **opts)
    return x, v0, spikes, v_last


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("opts", OPTION_GRID, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(backend, opts, dtype):
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
        xr, v0, spikes, v_last = _run(name, x, v_init, **opts)
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
    from stars_fast.ops.lif import _ext_neuron, _triton_neuron

    x = torch.randn(3, 20, requires_grad=True)
    v_init = torch.randn(20, requires_grad=True)
    inv_tau = torch.tensor([0.5], requires_grad=True)
    for args in [(x, v_init, inv_tau, True, 1.0, 0.0, True, 0, 4.0, True, False),
                 (x, None, inv_tau.detach(), False, 1.0, None, True, 1, 2.0, False, True)]:
        if backend == "triton" and triton_interpreter():
            # Under the interpreter a Triton launch reads real data pointers, so the AOT-dispatch
            # check (which traces with fake tensors) cannot run the kernel; on a GPU it runs it all.
            torch.library.opcheck(_triton_neuron, args, test_utils=(
                "test_schema", "test_autograd_registration", "test_faketensor"))
        else:
            torch.library.opcheck(_triton_neuron if backend == "triton" else _ext_neuron, args)


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


def test_make_neuron_and_modules_share_defaults():
    assert isinstance(make_neuron("plif"), ParametricLIFNode)
    with pytest.raises(ValueError):
        make_neuron("hh")
    node = ParametricLIFNode(init_tau=2.0)
    assert node.inv_tau().item() == pytest.approx(0.5)
    assert math.isclose(LIFNode().tau, 2.0) and IFNode().v_reset == 0.0
