"""A learnable threshold: multistep_neuron(x, v_threshold=theta) with theta a tensor of one element or one
value per channel [C] (dim 2 of x[T, B, C, ...]), and the nodes' `learnable_threshold=True`, on every
backend, against the plain-PyTorch loop of tests/neuron_helpers.py (no code shared with the package), against closed
forms of dL/dv_th, and against finite differences (float64 gradcheck of the smooth neuron)."""
import pytest
import torch

from stars_fast.neurons import IFNode, LIFNode, ParametricLIFNode
from stars_fast.ops.lif import multistep_neuron

from conftest import require_backend
from neuron_helpers import ALPHA, assert_compiled_matches_eager, loop, opcheck_triton_neuron

BACKENDS = ["reference", "cpu", "triton"]  # triton runs under TRITON_INTERPRET=1 without a GPU


def _op(backend, neuron, **opts):
    """fn(x, theta, k) of the op under test, as the loop's signature."""
    def fn(x, theta, k=None):
        decay = {"lif": {"tau": 2.5}, "if": {}, "plif": {"inv_tau": k}}[neuron]
        return multistep_neuron(x, **decay, neuron="if" if neuron == "if" else "lif", v_threshold=theta,
                                backend=backend, **opts)
    return fn


def _grads(fn, x, theta, k=None, seed=1):
    """(spikes, v_last, dL/dx, dL/dtheta[, dL/dk]) for a loss weighting every output by fixed random numbers."""
    x = x.detach().clone().requires_grad_(True)
    theta = theta.detach().clone().requires_grad_(True)
    k = None if k is None else k.detach().clone().requires_grad_(True)
    spikes, v_last = fn(x, theta, k)
    gen = torch.Generator().manual_seed(seed)
    loss = (spikes.float() * torch.randn(spikes.shape, generator=gen)).sum() \
        + (v_last.float() * torch.randn(v_last.shape, generator=gen)).sum()
    loss.backward()
    return (spikes.detach(), v_last.detach(), x.grad, theta.grad) + (() if k is None else (k.grad,))


def _assert_matches_loop(backend, x, theta, tol, neuron="lif", k=None, **opts):
    """Spikes exact, v_last and every gradient within tol (rtol, atol); the loop runs on x's contiguous copy."""
    got = _grads(_op(backend, neuron, **opts), x, theta, k)
    want = _grads(lambda x, theta, k: loop(x, theta, k, neuron=neuron, **opts), x.contiguous(), theta, k)
    assert torch.equal(got[0], want[0])
    for g, r in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, r, rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("neuron", ["lif", "if", "plif"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("decay_input,v_reset,detach_reset", [(True, 0.0, False), (False, -0.3, True),
                                                              (True, None, False), (False, None, True)])
def test_matches_the_loop(backend, neuron, per_channel, decay_input, v_reset, detach_reset):
    """N = 2 * 5 * 49 = 490: whole vector groups and a tail on the CPU, several Triton blocks' worth."""
    require_backend(backend)
    x = torch.randn(6, 2, 5, 7, 7) * 0.8 + 0.4
    theta = torch.rand(5) * 0.8 + 0.4 if per_channel else torch.tensor(0.7)
    k = torch.rand(5) * 0.6 + 0.2 if neuron == "plif" else None
    opts = dict(decay_input=decay_input, v_reset=v_reset, detach_reset=detach_reset)
    _assert_matches_loop(backend, x, theta, (1e-5, 1e-5), neuron=neuron, k=k, **opts)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_half_input_and_channels_last(backend):
    require_backend(backend)
    x = (torch.randn(4, 3, 6, 5) * 0.8 + 0.4).to(torch.bfloat16)
    _assert_matches_loop(backend, x, torch.rand(6) + 0.3, (1e-2, 1e-3))
    x = (torch.randn(5, 2, 4, 3, 6) * 0.8 + 0.4).permute(0, 1, 4, 2, 3)  # [T, B, C=6, H, W], C innermost
    _assert_matches_loop(backend, x, torch.rand(6) + 0.3, (1e-5, 1e-5), v_reset=None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v_reset", [0.0, None])
def test_threshold_gradient_of_one_step_in_closed_form(backend, v_reset):
    """IF, T = 1, from rest: h = x, u = x - th, s = Theta(u), L = sum(a s + b v). Hard reset (v = h (1 - s)):
    dL/dth = -a sg + b h sg. Soft reset (v = h - th s): dL/dth = -a sg + b (th sg - s). sg = alpha
    sigmoid'(alpha u), the sigmoid surrogate. Per neuron here (one channel each), so nothing is summed."""
    require_backend(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64  # the Triton kernels have no fp64
    x = torch.linspace(-1.5, 2.5, 40, dtype=dtype).reshape(1, 2, 20)
    th = (torch.rand(20, dtype=dtype) + 0.2).requires_grad_(True)
    a, b = torch.randn(2, 20, dtype=dtype), torch.randn(2, 20, dtype=dtype)
    spikes, v_last = multistep_neuron(x, neuron="if", v_threshold=th, v_reset=v_reset, backend=backend)
    ((a * spikes[0]).sum() + (b * v_last).sum()).backward()
    u = x[0] - th.detach()
    sg = ALPHA * torch.sigmoid(ALPHA * u) * (1 - torch.sigmoid(ALPHA * u))
    s = (u >= 0).to(dtype)
    want = -a * sg + (b * x[0] * sg if v_reset is not None else b * (th.detach() * sg - s))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(th.grad, want.sum(0), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_silent_layer_gets_the_surrogates_gradient(backend):
    """Far below threshold nothing fires: the threshold's gradient is -sum gh, the surrogate's tail
    (tiny, negative for a positive loss on the spikes), never NaN, and exactly zero where sg underflows."""
    require_backend(backend)
    x = torch.full((4, 2, 3, 5), -0.5)
    th = torch.tensor([1.0, 3.0, 60.0], requires_grad=True)
    spikes, _ = multistep_neuron(x, tau=2.0, v_threshold=th, backend=backend)
    assert spikes.sum() == 0
    spikes.sum().backward()
    assert torch.isfinite(th.grad).all()
    assert th.grad[0] < th.grad[1] < 0 and th.grad[2] == 0


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("neuron", ["lif", "if", "plif"])
@pytest.mark.parametrize("v_reset", [0.0, None, -0.2])
def test_gradcheck(backend, neuron, v_reset):
    """spiking=False makes the forward the surrogate's primitive, so the backward is its exact derivative
    (without detach_reset, which drops a path on purpose): float64 gradcheck of x and the per-channel
    threshold against finite differences (channels last)."""
    require_backend(backend)
    x = (torch.randn(3, 2, 2, 3, 4, dtype=torch.float64) * 0.8 + 0.5).permute(0, 1, 4, 2, 3)
    x = x.detach().requires_grad_(True)
    th = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_(True)
    k = torch.rand(4, dtype=torch.float64) * 0.6 + 0.2 if neuron == "plif" else None
    fn = _op(backend, neuron, v_reset=v_reset, spiking=False)
    assert torch.autograd.gradcheck(lambda x, th: fn(x, th, k), (x, th), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_threshold_tensor_fires_as_the_float(backend):
    """theta given as a tensor (one value, or C equal values) takes the per-neuron path of the kernels;
    spikes, v_last and dL/dx equal the float threshold's bit for bit."""
    require_backend(backend)
    x = torch.randn(5, 3, 8, 37) + 0.4
    want = _grads(lambda x, th, k: multistep_neuron(x, tau=3.0, v_threshold=0.9, backend=backend), x,
                  torch.tensor(0.9))
    for theta in (torch.tensor(0.9), torch.full((8,), 0.9)):
        got = _grads(lambda x, th, k: multistep_neuron(x, tau=3.0, v_threshold=th, backend=backend), x, theta)
        for a, b in zip(got[:3], want[:3]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_is_deterministic(backend):
    require_backend(backend)
    x = torch.randn(4, 8, 16, 9) + 0.5
    theta = torch.rand(16) + 0.4
    first = _grads(_op(backend, "lif"), x, theta)
    second = _grads(_op(backend, "lif"), x, theta)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("node_class", [LIFNode, IFNode, ParametricLIFNode])
def test_nodes_learn_their_threshold(backend, node_class):
    """learnable_threshold=True: v_threshold is a Parameter (in state_dict), gets the loop's gradient and
    moves with an optimizer step; step_mode='s' gives the multi-step result; per channel, a channel's
    threshold gets no gradient from the other channels."""
    require_backend(backend)
    x = torch.randn(5, 2, 3, 4) + 0.5
    node = node_class(backend=backend, learnable_threshold=True, per_channel_threshold=True, channels=3)
    assert isinstance(node.v_threshold, torch.nn.Parameter) and "v_threshold" in node.state_dict()
    with torch.no_grad():
        node.v_threshold.copy_(torch.tensor([0.6, 1.0, 1.4]))
    xg = x.clone().requires_grad_(True)
    node(xg)[:, :, 1].sum().backward()  # only channel 1 reaches the loss
    assert node.v_threshold.grad[1] != 0 and node.v_threshold.grad[0] == 0 and node.v_threshold.grad[2] == 0
    before = node.v_threshold.detach().clone()
    torch.optim.SGD(node.parameters(), lr=0.1).step()
    assert not torch.equal(node.v_threshold.detach(), before)
    single = node_class(backend=backend, learnable_threshold=True, per_channel_threshold=True, channels=3,
                        step_mode="s")
    single.load_state_dict(node.state_dict())
    assert torch.equal(torch.stack([single(x[t]) for t in range(x.shape[0])]), node(x))
    scalar = node_class(backend=backend, v_threshold=0.8, learnable_threshold=True)
    assert scalar.v_threshold.shape == () and scalar.v_threshold.item() == pytest.approx(0.8)
    scalar(x).sum().backward()
    assert scalar.v_threshold.grad.shape == () and scalar.v_threshold.grad != 0
    assert "learnable" in repr(scalar) and "learnable [3]" in repr(node)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_thresholds_are_clear_errors(backend):
    require_backend(backend)
    with pytest.raises(ValueError, match="one value per channel"):
        multistep_neuron(torch.randn(3, 2, 4), tau=2.0, v_threshold=torch.ones(5), backend=backend)
    with pytest.raises(ValueError, match="one value per channel"):
        multistep_neuron(torch.randn(3, 4), tau=2.0, v_threshold=torch.ones(4), backend=backend)
    with pytest.raises(ValueError, match="floating-point"):
        multistep_neuron(torch.randn(3, 2, 4), tau=2.0, v_threshold=torch.ones(4, dtype=torch.int64),
                         backend=backend)
    node = LIFNode(backend=backend, learnable_threshold=True, per_channel_threshold=True, channels=4)
    with pytest.raises(ValueError, match="one value per channel"):
        node(torch.randn(3, 2, 5, 2))


def test_the_compiled_ops_refuse_a_bad_threshold_operand():
    """The C++ ops' own checks (the second line behind the Python op's): threshold [N] in the state dtype,
    and a threshold gradient only with a threshold."""
    require_backend("cpu")
    x, decay = torch.randn(3, 20), torch.tensor([0.4])
    options = (True, False, 1.0, 0.0, True, 0, 4.0, True)
    with pytest.raises(RuntimeError, match=r"threshold must have shape \[N\] = \[20\]"):
        torch.ops.stars_fast.lif_forward(x, None, decay, *options, False, torch.ones(5))
    with pytest.raises(RuntimeError, match="threshold must be Float for Float x, got Double"):
        torch.ops.stars_fast.lif_forward(x, None, decay, *options, False, torch.ones(20, dtype=torch.float64))
    with pytest.raises(ValueError, match="need_threshold_grad requires a threshold tensor"):
        torch.ops.stars_fast.lif_backward(torch.ones_like(x), None, x, None, decay, *options, False, False, False,
                                          None, True)


def test_constructor_errors():
    with pytest.raises(ValueError, match="needs learnable_threshold=True"):
        LIFNode(per_channel_threshold=True, channels=3)
    with pytest.raises(ValueError, match="needs channels"):
        IFNode(learnable_threshold=True, per_channel_threshold=True)
    with pytest.raises(ValueError, match="only used with per_channel_threshold=True"):
        LIFNode(channels=3)
    with pytest.raises(ValueError, match="only used with per_channel=True or per_channel_threshold=True"):
        ParametricLIFNode(channels=3)
    node = ParametricLIFNode(per_channel=True, channels=3, learnable_threshold=True, per_channel_threshold=True)
    assert node.w.shape == (3,) and node.v_threshold.shape == (3,)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck_with_a_threshold_per_neuron(backend):
    """The ops' schemas, fake kernels and autograd registration with threshold [N]."""
    require_backend(backend)
    x, v_init, th = torch.randn(3, 20, requires_grad=True), torch.randn(20), torch.rand(20) + 0.5
    decay = torch.tensor([0.4])
    args = (x, v_init, decay, True, False, 0.0, None, True, 0, 4.0, True, False, True, th.requires_grad_(True))
    if backend == "triton":
        opcheck_triton_neuron(args)
    else:
        plain = (x.detach(), v_init, decay, *args[3:11])
        torch.library.opcheck(torch.ops.stars_fast.lif_forward, (*plain, True, th.detach()))
        torch.library.opcheck(torch.ops.stars_fast.lif_backward,
                              (torch.randn(3, 20), torch.randn(20), *plain, False, False, True, th.detach(), True))


def test_torch_compile_fullgraph():
    require_backend("cpu")
    node = LIFNode(backend="cpu", learnable_threshold=True, per_channel_threshold=True, channels=6)
    with torch.no_grad():
        node.v_threshold.copy_(torch.linspace(0.5, 1.5, 6))
    x = (torch.randn(4, 2, 6, 3, 3) + 0.5).to(memory_format=torch.channels_last_3d)
    assert_compiled_matches_eager(node, x, node.v_threshold)
