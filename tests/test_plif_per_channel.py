"""PLIF with one time constant per channel: ParametricLIFNode(per_channel=True, channels=C) and
multistep_neuron(x, inv_tau=k) with k of shape [C] (the channels at dim 2 of x[T, B, C, ...]), on
every backend, against the plain-PyTorch loop of tests/neuron_helpers.py (no code shared with the package)."""
import pytest
import torch

from stars_fast.neurons import ParametricLIFNode
from stars_fast.ops.lif import multistep_neuron

from conftest import require_backend
from neuron_helpers import assert_compiled_matches_eager, loop, opcheck_triton_neuron

BACKENDS = ["reference", "cpu", "triton"]  # triton runs under TRITON_INTERPRET=1 without a GPU


def _loop(x, k, *, v_threshold=1.0, **opts):
    """SpikingJelly's ParametricLIFNode, step by step, with k [C] broadcast over the channels (dim 2 of x)."""
    return loop(x, v_threshold, k, neuron="plif", **opts)


def _grads(fn, x, w, seed=1):
    """(spikes, v_last, dL/dx, dL/dw) for a loss weighting every output by fixed random numbers."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    spikes, v_last = fn(x, torch.sigmoid(w))
    gen = torch.Generator().manual_seed(seed)
    loss = (spikes.float() * torch.randn(spikes.shape, generator=gen)).sum() \
        + (v_last.float() * torch.randn(v_last.shape, generator=gen)).sum()
    loss.backward()
    return spikes.detach(), v_last.detach(), x.grad, w.grad


def _assert_matches_loop(backend, x, w, tol, **opts):
    """The fused op against _loop on the same x (the loop on x's contiguous copy): spikes exact, v_last and
    the gradients of x and w within tol (rtol, atol)."""
    got = _grads(lambda x, k: multistep_neuron(x, k, backend=backend, **opts), x, w)
    want = _grads(lambda x, k: _loop(x, k, **opts), x.contiguous(), w)
    assert torch.equal(got[0], want[0])
    for g, r in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, r, rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decay_input,v_reset,detach_reset", [(True, 0.0, False), (False, -0.3, True),
                                                              (True, None, False), (False, None, True)])
def test_matches_the_loop(backend, decay_input, v_reset, detach_reset):
    """N = 2 * 5 * 49 = 490: whole vector groups and a tail on the CPU, several Triton blocks' worth of lanes."""
    require_backend(backend)
    x = torch.randn(6, 2, 5, 7, 7) * 0.8 + 0.4
    w = torch.randn(5) * 1.5
    opts = dict(decay_input=decay_input, v_reset=v_reset, detach_reset=detach_reset)
    _assert_matches_loop(backend, x, w, (1e-5, 1e-5), **opts)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_half_input_matches_the_loop(backend):
    require_backend(backend)
    x = (torch.randn(4, 3, 6, 5) * 0.8 + 0.4).to(torch.bfloat16)
    w = torch.randn(6)
    _assert_matches_loop(backend, x, w, (1e-2, 1e-3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_and_no_spatial_dims(backend):
    """The kernels run on x's storage in memory order: channels last puts C innermost, so a neuron's
    channel is not the one of a [T, B, C, H, W]-contiguous x. Also x [T, B, C] without spatial dims."""
    require_backend(backend)
    x = (torch.randn(5, 2, 4, 3, 6) * 0.8 + 0.4).permute(0, 1, 4, 2, 3)  # [T, B, C=6, H, W], C innermost
    w = torch.randn(6)
    _assert_matches_loop(backend, x, w, (1e-5, 1e-5))
    x3 = torch.randn(7, 3, 11) * 0.8 + 0.4
    w3 = torch.randn(11)
    _assert_matches_loop(backend, x3, w3, (1e-5, 1e-5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_channel_is_the_scalar_plif_exactly(backend):
    require_backend(backend)
    x = torch.randn(4, 3, 1, 5, 5) + 0.4
    outs = []
    for per_channel in (False, True):
        node = ParametricLIFNode(init_tau=2.7, backend=backend, per_channel=per_channel,
                                 channels=1 if per_channel else None)
        xi = x.clone().requires_grad_(True)
        spikes = node(xi)
        (spikes * torch.arange(spikes.numel()).reshape(spikes.shape).sin()).sum().backward()
        outs.append((spikes, node.v, xi.grad, node.w.grad.reshape(())))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decay_input", [True, False])
def test_equal_channels_are_the_scalar_bit_for_bit(backend, decay_input):
    """Every channel at the scalar's k: the per-neuron kernels do the scalar's arithmetic lane for lane."""
    require_backend(backend)
    x = torch.randn(5, 3, 8, 37) + 0.4
    k = torch.sigmoid(torch.tensor(0.3))
    scalar = _grads(lambda x, k: multistep_neuron(x, k, decay_input=decay_input, backend=backend), x, k.logit())
    channels = _grads(lambda x, k: multistep_neuron(x, k, decay_input=decay_input, backend=backend), x,
                      k.logit().expand(8))
    for a, b in zip(scalar[:3], channels[:3]):
        assert torch.equal(a, b)
    torch.testing.assert_close(channels[3].sum(), scalar[3], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_node_trains_each_channel_and_steps_single(backend):
    """The module's w [C] gets each channel's gradient; step_mode='s' over [B, C, ...] gives the
    multi-step result; a channel's w gets no gradient from the other channels' inputs."""
    require_backend(backend)
    x = torch.randn(5, 2, 3, 4) + 0.5
    node = ParametricLIFNode(init_tau=3.0, backend=backend, per_channel=True, channels=3)
    with torch.no_grad():
        node.w.copy_(torch.tensor([-1.0, 0.0, 2.0]))
    spikes = node(x)
    single = ParametricLIFNode(init_tau=3.0, backend=backend, per_channel=True, channels=3, step_mode="s")
    single.load_state_dict(node.state_dict())
    stepped = torch.stack([single(x[t]) for t in range(x.shape[0])])
    assert torch.equal(spikes, stepped)
    torch.testing.assert_close(single.v, node.v)
    xg = x.clone().requires_grad_(True)
    node(xg)[:, :, 1].sum().backward()  # only channel 1 reaches the loss
    assert node.w.grad[1] != 0 and node.w.grad[0] == 0 and node.w.grad[2] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_is_deterministic(backend):
    require_backend(backend)
    x = torch.randn(4, 8, 16, 9) + 0.5
    w = torch.randn(16)
    first = _grads(lambda x, k: multistep_neuron(x, k, backend=backend), x, w)
    second = _grads(lambda x, k: multistep_neuron(x, k, backend=backend), x, w)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("decay_input,v_reset", [(True, 0.0), (False, None)])
def test_gradcheck(backend, decay_input, v_reset):
    """spiking=False makes the forward the surrogate's primitive, so the backward is its exact
    derivative: float64 gradcheck of x and w (channels last included)."""
    require_backend(backend)
    x = (torch.randn(3, 2, 2, 3, 4, dtype=torch.float64) * 0.8 + 0.5).permute(0, 1, 4, 2, 3)
    x = x.detach().requires_grad_(True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    opts = dict(decay_input=decay_input, v_reset=v_reset, spiking=False, surrogate="sigmoid", backend=backend)

    def fn(x, w):
        return multistep_neuron(x, torch.sigmoid(w), **opts)

    assert torch.autograd.gradcheck(fn, (x, w), eps=1e-6, atol=1e-7)
    want = _loop(x, torch.sigmoid(w), decay_input=decay_input, v_reset=v_reset, spiking=False)
    for g, r in zip(fn(x, w), want):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_shapes_are_clear_errors(backend):
    require_backend(backend)
    with pytest.raises(ValueError, match="one k per channel"):
        multistep_neuron(torch.randn(3, 2, 4), torch.full((5,), 0.5), backend=backend)
    with pytest.raises(ValueError, match="one k per channel"):
        multistep_neuron(torch.randn(3, 4), torch.full((4,), 0.5), backend=backend)
    with pytest.raises(ValueError, match="one k per channel"):
        multistep_neuron(torch.randn(3, 2, 4), torch.full((4, 1), 0.5), backend=backend)
    node = ParametricLIFNode(per_channel=True, channels=4, backend=backend)
    with pytest.raises(ValueError, match=r"4 channels at dim 2 of a multi-step input \[T, B, C, \.\.\.\]"):
        node(torch.randn(3, 2, 5, 2))
    node.step_mode = "s"
    with pytest.raises(ValueError, match=r"dim 1 of a single step \[B, C, \.\.\.\], got shape \(2, 5\)"):
        node(torch.randn(2, 5))


def test_constructor_errors():
    with pytest.raises(ValueError, match="per_channel=True needs channels"):
        ParametricLIFNode(per_channel=True)
    with pytest.raises(ValueError, match="per_channel=True needs channels"):
        ParametricLIFNode(per_channel=True, channels=0)
    with pytest.raises(ValueError, match="only used with per_channel=True"):
        ParametricLIFNode(channels=3)
    node = ParametricLIFNode(init_tau=3.0, per_channel=True, channels=3)
    assert node.w.shape == (3,)
    torch.testing.assert_close(node.inv_tau(), torch.full((3,), 1 / 3.0))
    assert "channels=3" in repr(node)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck_with_one_k_per_neuron(backend):
    """The ops' schemas, fake kernels and autograd registration with decay [N] (one k per neuron)."""
    require_backend(backend)
    x, v_init, k = torch.randn(3, 20, requires_grad=True), torch.randn(20), torch.rand(20) * 0.8 + 0.1
    args = (x, v_init, k.requires_grad_(True), True, False, 1.0, 0.0, True, 0, 4.0, True, False, True)
    if backend == "triton":
        opcheck_triton_neuron(args)
    else:
        plain = (x.detach(), v_init, k.detach(), *args[3:11])
        torch.library.opcheck(torch.ops.stars_fast.lif_forward, (*plain, True))
        torch.library.opcheck(torch.ops.stars_fast.lif_backward,
                              (torch.randn(3, 20), torch.randn(20), *plain, False, True, True))


def test_torch_compile_fullgraph():
    require_backend("cpu")
    node = ParametricLIFNode(per_channel=True, channels=6, backend="cpu")
    with torch.no_grad():
        node.w.copy_(torch.linspace(-1, 2, 6))
    x = (torch.randn(4, 2, 6, 3, 3) + 0.5).to(memory_format=torch.channels_last_3d)
    assert_compiled_matches_eager(node, x, node.w)
