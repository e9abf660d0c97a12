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
    (dict(surrogate_function=surrogate.Erf()), "Erf is not supported"),
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
    (dict(store_v_seq=True), "store_v_seq"),
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


def test_stateless_by_default_and_reset_exists():
    x = torch.randn(4, 2, 8) + 0.5
    node = LIFNode(backend="reference")
    first = node(x)
    assert torch.equal(node(x), first) and node.v is None  # every forward starts at rest
    node.reset()
    assert torch.equal(node(x), first)


def test_stateful_mode_continues_like_spikingjelly_until_reset():
    x = torch.randn(6, 2, 20) * 1.5 + 0.3
    theirs = sj_neuron.LIFNode(step_mode="m")
    whole = theirs(x)
    ours = LIFNode(backend="reference", stateful=True)
    net = torch.nn.Sequential(ours)
    chunks = torch.cat([ours(x[:2]), ours(x[2:5]), ours(x[5:])])
    assert torch.equal(chunks, whole)  # the state carried over between calls
    functional.reset_net(net)  # SpikingJelly's reset_net reaches our reset()
    assert ours.v is None and torch.equal(ours(x), whole)
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
    assert all(m.v is None for m in ours if hasattr(m, "v"))  # reset_net reached every neuron
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


def test_detach_net_truncates_backpropagation_through_time():
    """SpikingJelly's truncated BPTT: backward per chunk, functional.detach_net between chunks."""
    x = torch.randn(6, 2, 8) + 0.5
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), LIFNode(backend="reference", stateful=True))
    net(x[:3]).sum().backward()
    with pytest.raises(RuntimeError, match="second time"):
        net(x[3:]).sum().backward()
    functional.reset_net(net)
    net(x[:3]).sum().backward()
    functional.detach_net(net)
    net(x[3:]).sum().backward()
