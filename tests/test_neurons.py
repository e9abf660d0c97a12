"""stars_fast.neurons with SpikingJelly habits: SpikingJelly's constructor arguments and surrogate objects
(compared with SpikingJelly 2.0's own nodes), checks at construction, refused inputs without a time
dimension, reset() and the stateful mode, LIF dividing by tau and PLIF multiplying by sigmoid(w)."""
import numpy as np
import pytest
import torch

from stars_fast.neurons import IFNode, LIFNode, ParametricLIFNode

from conftest import require_backend

sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")
functional = pytest.importorskip("spikingjelly.activation_based.functional")

BACKENDS = ["reference", "cpu", "triton"]


def _compare(ours, theirs, x, grad_params=()):
    """Same spikes (exactly) and the same input (and parameter) gradients as SpikingJelly."""
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    sa, sb = theirs(xa), ours(xb)
    assert torch.equal(sb, sa)
    g = torch.randn_like(sa)
    sa.backward(g)
    sb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)
    for mine, theirs_param in grad_params:
        torch.testing.assert_close(mine.grad, theirs_param.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spikingjelly_constructor_call_works_unchanged(backend):
    require_backend(backend)
    x = torch.randn(5, 3, 40) * 1.5 + 0.4
    ours = LIFNode(surrogate_function=surrogate.ATan(), step_mode="m", backend=backend)
    assert (ours.surrogate, ours.alpha) == ("atan", 2.0)
    _compare(ours, sj_neuron.LIFNode(surrogate_function=surrogate.ATan(), step_mode="m"), x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make_surrogate", [lambda: surrogate.Sigmoid(alpha=5.0), lambda: surrogate.ATan(alpha=3.0),
                                            lambda: surrogate.PiecewiseQuadratic(alpha=2.0),
                                            lambda: surrogate.PiecewiseQuadratic()],
                         ids=["sigmoid5", "atan3", "piecewise_quadratic2", "piecewise_quadratic1"])
def test_surrogate_objects_keep_their_alpha(backend, make_surrogate):
    require_backend(backend)
    x = torch.randn(4, 2, 64) * 1.2 + 0.5
    for ours, theirs in [
        (LIFNode(3.0, False, 1.0, None, make_surrogate(), True, "m", backend),  # SpikingJelly's positional order
         sj_neuron.LIFNode(3.0, False, 1.0, None, make_surrogate(), True, "m")),
        (IFNode(0.8, -0.2, make_surrogate(), backend=backend),
         sj_neuron.IFNode(0.8, -0.2, make_surrogate(), step_mode="m")),
    ]:
        _compare(ours, theirs, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plif_multiplies_by_sigmoid_w_as_spikingjelly(backend):
    require_backend(backend)
    x = torch.randn(6, 2, 30) + 0.5
    ours = ParametricLIFNode(init_tau=3.0, surrogate_function=surrogate.Sigmoid(), backend=backend)
    theirs = sj_neuron.ParametricLIFNode(init_tau=3.0, surrogate_function=surrogate.Sigmoid(), step_mode="m")
    assert torch.equal(ours.inv_tau(), theirs.w.sigmoid())
    _compare(ours, theirs, x, grad_params=[(ours.w, theirs.w)])


def test_non_spiking_surrogate_gives_the_primitive():
    """SpikingJelly's spiking=False (forward through the surrogate's primitive) is taken over."""
    x = torch.randn(4, 2, 16)
    ours = LIFNode(surrogate_function=surrogate.Sigmoid(spiking=False), backend="reference")
    theirs = sj_neuron.LIFNode(surrogate_function=surrogate.Sigmoid(spiking=False), step_mode="m")
    assert not ours.spiking
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [7.0, 1.7])
def test_lif_divides_by_tau(backend, tau):
    """Inputs just below tau * v_threshold where x / tau and x * (1 / tau) round to different sides of the
    threshold in fp32 (there is one for these tau): the spike follows the division (SpikingJelly's LIFNode)."""
    require_backend(backend)
    values = [np.float32(tau)]
    for _ in range(50):
        values.append(np.nextafter(values[-1], np.float32(0)))
    values = np.array(values, dtype=np.float32)
    by_division = values / np.float32(tau) >= 1
    by_multiplication = values * (np.float32(1) / np.float32(tau)) >= 1
    assert (by_division != by_multiplication).any(), "no discriminating input found"
    spikes = LIFNode(tau=tau, backend=backend)(torch.from_numpy(values).view(1, 1, -1))
    assert torch.equal(spikes.view(-1).bool(), torch.from_numpy(by_division))


@pytest.mark.parametrize("kwargs, match", [
    (dict(surrogate_function="atn"), "unknown surrogate 'atn'"),
    (dict(surrogate="relu"), "unknown surrogate 'relu'"),
    (dict(surrogate_function=torch.nn.ReLU()), "ReLU is not supported"),
    (dict(surrogate_function=surrogate.Rect()), "Rect is not supported"),
    (dict(surrogate_function=surrogate.ATan(), alpha=2.0), "alpha is given twice"),
    (dict(surrogate_function="atan", surrogate="atan"), "not both"),
    (dict(surrogate_function=surrogate.ATan(alpha=-1.0)), "alpha .* must be > 0"),
    (dict(alpha=0.0), "must be > 0"),
    (dict(alpha=float("nan")), "alpha must be finite"),
    (dict(tau=1.0), "tau must be > 1"),
    (dict(tau=float("inf")), "tau must be finite"),
    (dict(tau=float("nan")), "tau must be finite"),
    (dict(v_threshold=float("nan")), "v_threshold must be finite"),
    (dict(step_mode="multi"), "step_mode must be 's' .* or 'm'"),
    (dict(backend="tpu"), "unknown backend 'tpu'"),
])
def test_bad_arguments_are_refused_at_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LIFNode(**kwargs)


def test_plif_and_if_check_their_arguments():
    with pytest.raises(ValueError, match="init_tau must be > 1"):
        ParametricLIFNode(init_tau=0.5)
    with pytest.raises(ValueError, match="step_mode must be"):
        IFNode(step_mode="single")
    with pytest.raises(ValueError, match="unknown surrogate"):
        ParametricLIFNode(surrogate_function="bogus")


def test_spikingjelly_backend_names_map_to_ours():
    assert LIFNode(backend="torch").backend == "reference"
    assert LIFNode(backend="cupy").backend == "cuda"


@pytest.mark.parametrize("shape", [(8, 10), (10,), ()])
def test_input_without_time_dimension_is_refused(shape):
    node = LIFNode(backend="reference")
    with pytest.raises(ValueError, match=r"\[T, B, \.\.\.\].*unsqueeze"):
        node(torch.randn(shape))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v_reset", [0.0, -0.3, None])
def test_v_as_spikingjelly_and_each_multistep_forward_from_rest(backend, v_reset):
    """v: SpikingJelly's float rest value before any forward and after reset(), its last membrane potential
    after a multi-step forward (a detached readout); the next forward still starts from rest."""
    require_backend(backend)
    x = torch.randn(4, 2, 8) * 1.5 + 0.5
    ours = LIFNode(v_reset=v_reset, backend=backend)
    theirs = sj_neuron.LIFNode(v_reset=v_reset, step_mode="m")
    assert isinstance(ours.v, float) and ours.v == theirs.v
    first = ours(x)
    assert torch.equal(first, theirs(x))
    torch.testing.assert_close(ours.v, theirs.v)
    assert not ours.v.requires_grad
    assert torch.equal(ours(x), first)  # not continued from the v of the previous forward
    functional.reset_net(theirs)
    ours.v = theirs.v = torch.full((2, 8), 0.7)  # a v set from outside is a state, in 's' as SpikingJelly
    ours.step_mode = theirs.step_mode = "s"
    assert torch.equal(ours(x[0]), theirs(x[0]))
    ours.reset()
    assert isinstance(ours.v, float) and ours.v == (0.0 if v_reset is None else v_reset) and ours.v_seq is None
    ours.step_mode = "m"
    ours(x)
    ours.step_mode = "s"  # after a multi-step forward a single step starts from rest, not from the readout
    assert torch.equal(ours(x[0]), first[0])


def test_stateful_mode_continues_like_spikingjelly_until_reset():
    x = torch.randn(6, 2, 20) * 1.5 + 0.3
    theirs = sj_neuron.LIFNode(step_mode="m")
    whole = theirs(x)
    ours = LIFNode(backend="reference", stateful=True)
    net = torch.nn.Sequential(ours)
    chunks = torch.cat([ours(x[:2]), ours(x[2:5]), ours(x[5:])])
    assert torch.equal(chunks, whole)  # the state carried over between calls
    functional.reset_net(net)  # SpikingJelly's reset_net reaches our reset()
    assert ours.v == 0.0 and torch.equal(ours(x), whole)
    with pytest.raises(ValueError, match="call reset"):
        ours(x[:, :1])  # a state of another batch shape


def _twin_nets(backend, make_ours, make_theirs):
    """The same two-layer net with our neurons and with SpikingJelly's (weights copied)."""
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(8, 16), make_ours(backend), torch.nn.Linear(16, 4), make_ours(backend))
    with torch.no_grad():
        ours[2].weight.mul_(6.0)  # so that the second layer fires on the first one's sparse spikes
    theirs = torch.nn.Sequential(torch.nn.Linear(8, 16), make_theirs(), torch.nn.Linear(16, 4), make_theirs())
    theirs.load_state_dict(ours.state_dict(), strict=False)
    return ours, theirs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["lif", "plif", "if"])
def test_spikingjelly_single_step_loop(backend, kind):
    """functional.set_step_mode(net, 's') and the usual loop sum(net(x[t])) / T, state kept between the
    calls: the same outputs as SpikingJelly (exactly) and the same gradients through time."""
    make_ours = {"lif": lambda b: LIFNode(tau=2.0, backend=b), "if": lambda b: IFNode(backend=b),
                 "plif": lambda b: ParametricLIFNode(init_tau=2.0, backend=b)}[kind]
    make_theirs = {"lif": lambda: sj_neuron.LIFNode(tau=2.0), "if": lambda: sj_neuron.IFNode(),
                   "plif": lambda: sj_neuron.ParametricLIFNode(init_tau=2.0)}[kind]
    ours, theirs = _twin_nets(backend, make_ours, make_theirs)
    functional.set_step_mode(ours, "s")
    functional.set_step_mode(theirs, "s")
    assert all(m.step_mode == "s" for m in ours if hasattr(m, "step_mode"))
    x = torch.randn(5, 3, 8) * 2.0 + 0.5
    outputs = []
    for net in (theirs, ours):
        xs = x.clone().requires_grad_(True)
        out = sum(net(xs[t]) for t in range(x.shape[0])) / x.shape[0]
        out.backward(torch.linspace(-1.0, 1.0, out.numel()).view_as(out))
        outputs.append((out.detach(), xs.grad, net[0].weight.grad))
        functional.reset_net(net)
    (out_sj, gx_sj, gw_sj), (out_ours, gx_ours, gw_ours) = outputs
    assert torch.equal(out_ours, out_sj)
    assert out_sj.abs().sum() > 0  # the layers fire
    torch.testing.assert_close(gx_ours, gx_sj, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw_ours, gw_sj, rtol=1e-5, atol=1e-6)
    assert all(m.v == 0.0 for m in ours if hasattr(m, "v"))  # reset_net reached every neuron
    functional.set_step_mode(ours, "m")  # and back: the multi-step form gives the same spikes
    assert torch.equal(sum(ours(x)) / x.shape[0], out_sj)


def test_step_mode_is_checked_when_set_and_single_step_state_when_used():
    node = LIFNode(backend="reference")
    with pytest.raises(ValueError, match="step_mode must be"):
        node.step_mode = "S"
    node.step_mode = "s"
    node(torch.randn(2, 3))
    with pytest.raises(ValueError, match="call reset"):
        node(torch.randn(4, 3))
    node.reset()
    assert node(torch.randn(4, 3)).shape == (4, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["stateful", "single_step"])
@pytest.mark.parametrize("store_v_seq", [False, True])
def test_detach_net_truncates_backpropagation_through_time(backend, mode, store_v_seq):
    """SpikingJelly's truncated BPTT: backward per chunk, functional.detach_net between chunks; without it
    the second chunk's backward reaches the first chunk's freed graph. The chunks' weight gradients (with a
    loss on v_seq too when it is kept) are SpikingJelly's."""
    require_backend(backend)
    ours, theirs = _twin_nets(backend, lambda b: LIFNode(backend=b, stateful=True, store_v_seq=store_v_seq),
                              lambda: sj_neuron.LIFNode(step_mode="m", store_v_seq=store_v_seq))
    if mode == "single_step":
        functional.set_step_mode(ours, "s")
        functional.set_step_mode(theirs, "s")
    x = torch.randn(6, 3, 8) * 2.0 + 0.5

    def chunk(net, steps):
        out = sum(net(step) for step in steps) if mode == "single_step" else net(steps).sum(0)
        loss = (out * torch.linspace(-1.0, 1.0, out.numel()).view_as(out)).sum()
        if store_v_seq:  # in single-step mode v_seq runs on since reset: detach_net must cut it too
            loss = loss + 0.1 * (net[1].v_seq.sum() + net[3].v_seq.sum())
        loss.backward()

    chunk(ours, x[:3])
    with pytest.raises(RuntimeError, match="second time"):
        chunk(ours, x[3:])
    for net in (ours, theirs):
        functional.reset_net(net)
        net.zero_grad()
        chunk(net, x[:3])
        functional.detach_net(net)
        chunk(net, x[3:])
    assert theirs[0].weight.grad.abs().sum() > 0
    torch.testing.assert_close(ours[0].weight.grad, theirs[0].weight.grad, rtol=1e-5, atol=1e-6)


KINDS = {
    "lif": (lambda b, **kw: LIFNode(tau=2.0, backend=b, **kw), lambda **kw: sj_neuron.LIFNode(tau=2.0, **kw)),
    "if": (lambda b, **kw: IFNode(backend=b, **kw), lambda **kw: sj_neuron.IFNode(**kw)),
    "plif": (lambda b, **kw: ParametricLIFNode(init_tau=2.0, backend=b, **kw),
             lambda **kw: sj_neuron.ParametricLIFNode(init_tau=2.0, **kw)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("v_reset", [0.0, None])
def test_store_v_seq_as_spikingjelly(backend, kind, v_reset):
    """store_v_seq=True: v_seq [T, B, ...] is SpikingJelly's (v after each step's reset), the spikes are
    exactly its, and gradients through the spikes and v_seq are its; in 's' mode v_seq grows per step."""
    require_backend(backend)
    make_ours, make_theirs = KINDS[kind]
    ours = make_ours(backend, v_reset=v_reset, store_v_seq=True)
    theirs = make_theirs(v_reset=v_reset, step_mode="m", store_v_seq=True)
    x = torch.randn(5, 2, 3, 7) * 1.5 + 0.5
    g_spikes, g_v = torch.randn_like(x), torch.randn_like(x)
    grads = []
    for node in (theirs, ours):
        xg = x.clone().requires_grad_(True)
        spikes = node(xg)
        ((spikes * g_spikes).sum() + (node.v_seq * g_v).sum()).backward()
        grads.append((spikes, xg.grad, node.w.grad if kind == "plif" else None))
    assert torch.equal(grads[1][0], grads[0][0])
    assert ours.v_seq.shape == x.shape
    torch.testing.assert_close(ours.v_seq, theirs.v_seq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.v, theirs.v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-5)
    if kind == "plif":
        torch.testing.assert_close(grads[1][2], grads[0][2], rtol=1e-4, atol=1e-5)
    functional.reset_net(ours)
    functional.reset_net(theirs)
    assert ours.v_seq is None
    ours.step_mode = theirs.step_mode = "s"
    for t in range(x.shape[0]):
        assert torch.equal(ours(x[t]), theirs(x[t]))
        assert ours.v_seq.shape == (t + 1,) + x.shape[1:]
    torch.testing.assert_close(ours.v_seq, theirs.v_seq, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_v_seq_with_half_input_keeps_the_fused_spikes(backend):
    """The step-by-step run of store_v_seq chains the state in fp32, as the fused call does inside."""
    require_backend(backend)
    x = (torch.randn(6, 4, 33) * 1.5 + 0.5).to(torch.bfloat16)
    fused = LIFNode(tau=3.0, backend=backend)(x)
    node = LIFNode(tau=3.0, backend=backend, store_v_seq=True)
    assert torch.equal(node(x), fused)
    assert node.v_seq.dtype == x.dtype and node.v_seq.shape == x.shape


def test_spikingjelly_monitors_record_our_layers():
    """monitor.OutputMonitor / AttributeMonitor with our classes as the instance filter record what they
    record on SpikingJelly's own layers (SpikingJelly's neuron.BaseNode does not match ours)."""
    monitor = pytest.importorskip("spikingjelly.activation_based.monitor")
    from stars_fast.neurons import BaseNode

    ours, theirs = _twin_nets("reference", lambda b: LIFNode(backend=b, store_v_seq=True),
                              lambda: sj_neuron.LIFNode(step_mode="m", store_v_seq=True))
    x = torch.randn(4, 3, 8) * 2.0 + 0.5
    records = []
    for net, instance in ((theirs, sj_neuron.BaseNode), (ours, BaseNode)):
        monitors = [monitor.OutputMonitor(net, instance), monitor.AttributeMonitor("v", False, net, instance),
                    monitor.AttributeMonitor("v_seq", False, net, instance)]
        for _ in range(2):
            net(x)
            functional.reset_net(net)
        assert all(m.monitored_layers == ["1", "3"] for m in monitors)
        records.append([m.records for m in monitors])
    for mine, reference_records in zip(records[1], records[0]):
        assert len(mine) == len(reference_records) == 4
        for got, expected in zip(mine, reference_records):
            assert isinstance(got, torch.Tensor)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert monitor.OutputMonitor(ours, (LIFNode, IFNode)).monitored_layers == ["1", "3"]
    assert monitor.OutputMonitor(ours, sj_neuron.BaseNode).monitored_layers == []


def _channels_last_steps(x):
    """x [T, B, C, H, W] with every step [B, C, H, W] stored channels-last (time outermost)."""
    return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_channels_last_kept_in_both_step_modes(backend, kind):
    """Channels-last steps give spikes of x's layout ('m': x's strides; 's': channels-last [B, C, H, W]), the
    same spikes and gradients (PLIF's decay too) as a contiguous input and as SpikingJelly."""
    require_backend(backend)
    make_ours, make_theirs = KINDS[kind]
    x = torch.randn(4, 2, 3, 5, 6) * 1.5 + 0.5
    g = torch.randn_like(x)
    results = {}
    for name, node, layout in [("spikingjelly", make_theirs(step_mode="m"), torch.contiguous_format),
                               ("contiguous", make_ours(backend), torch.contiguous_format),
                               ("channels_last", make_ours(backend), torch.channels_last)]:
        for step_mode in ("m", "s"):
            node.step_mode = step_mode
            xg = (x if layout == torch.contiguous_format else _channels_last_steps(x)).clone(
                memory_format=torch.preserve_format).requires_grad_(True)
            if step_mode == "m":
                spikes = node(xg)
            else:
                steps = [node(xg[t]) for t in range(x.shape[0])]
                spikes = torch.stack(steps)
            (spikes * g).sum().backward()
            if name == "channels_last":
                assert xg.grad.stride() == xg.stride()
                if step_mode == "m":
                    assert spikes.stride() == xg.stride()
                    assert node.v.is_contiguous(memory_format=torch.channels_last)
                else:
                    assert all(s.is_contiguous(memory_format=torch.channels_last) for s in steps)
            decay_grad = node.w.grad.clone() if kind == "plif" else None
            results[name, step_mode] = (spikes.detach(), xg.grad, decay_grad)
            node.zero_grad()
            functional.reset_net(node)
    for step_mode in ("m", "s"):
        expected = results["spikingjelly", step_mode]
        for name in ("contiguous", "channels_last"):
            got = results[name, step_mode]
            assert torch.equal(got[0], expected[0]), (name, step_mode)
            torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)
            if kind == "plif":
                torch.testing.assert_close(got[2], expected[2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_input_gives_correct_values(backend):
    """A sliced (not dense) input, channels-last or not: the spikes of its contiguous copy."""
    require_backend(backend)
    x = torch.randn(4, 2, 3, 10, 6) * 1.5 + 0.5
    theirs = sj_neuron.LIFNode(step_mode="m")
    for sliced in (_channels_last_steps(x)[:, :, :, ::2], x[:, :, 1:, :, ::3], x.transpose(0, 1)):
        expected = theirs(sliced.contiguous())
        functional.reset_net(theirs)
        assert torch.equal(LIFNode(backend=backend)(sliced), expected)


class _RecordNeuronForward(torch.utils._python_dispatch.TorchDispatchMode):
    """The x the C++ forward kernel reads."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.stars_fast.lif_forward.default:
            self.inputs.append(args[0])
        return func(*args, **(kwargs or {}))


def test_channels_last_input_is_not_copied():
    """The cpu kernels read a channels-last x in place: the op gets x's own storage."""
    require_backend("cpu")
    x = _channels_last_steps(torch.randn(3, 2, 4, 5, 6))
    step = x[0].clone(memory_format=torch.channels_last)
    with _RecordNeuronForward() as record:
        LIFNode(backend="cpu")(x)
        LIFNode(backend="cpu", step_mode="s")(step)
    assert [t.data_ptr() for t in record.inputs] == [x.data_ptr(), step.data_ptr()]
