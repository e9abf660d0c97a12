"""The seven surrogates of SpikingJelly 2.0's Triton backend (Sigmoid, ATan, PiecewiseQuadratic, PiecewiseExp,
SoftSign, SuperSpike, Erf) on every backend usable on the CPU, against SpikingJelly's own multi-step nodes
(step_mode='m', on the CPU its Torch implementation): given as SpikingJelly objects and as our strings,
spiking and through the primitive (spiking=False, where SpikingJelly defines one); float64 gradchecks of the
new primitives; NaN, 16-bit I/O and the refusals."""
import pytest
import torch

import stars_fast
from stars_fast import reference
from stars_fast.neurons import IFNode, LIFNode

from conftest import require_backend

sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
sj_surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")

BACKENDS = ["reference", "cpu", "triton"]
# SpikingJelly class -> (our string, our alpha from its alpha, an alpha other than its default). Written out
# here, not read from stars_fast.neurons, so that the mapping is under test too.
SURROGATES = {
    "Sigmoid": ("sigmoid", lambda a: a, 2.5),
    "ATan": ("atan", lambda a: a, 3.5),
    "PiecewiseQuadratic": ("triangle", lambda a: 1.0 / a, 2.0),
    "PiecewiseExp": ("piecewise_exp", lambda a: a, 3.0),
    "SoftSign": ("soft_sign", lambda a: a, 0.7),
    "SuperSpike": ("super_spike", lambda a: a, 2.5),
    "Erf": ("erf", lambda a: a, 1.3),
}
WITH_PRIMITIVE = [name for name in SURROGATES if name != "SuperSpike"]  # SpikingJelly's SuperSpike has none
NEW = ["piecewise_exp", "soft_sign", "super_spike", "erf"]
ALPHAS = ["default", "other"]
# (SpikingJelly node, our node, their common keyword arguments): a hard-reset LIF, a soft-reset IF, and a
# LIF without decay_input resetting to -0.5 with detach_reset.
NODES = [
    (sj_neuron.LIFNode, LIFNode, dict(tau=2.0)),
    (sj_neuron.IFNode, IFNode, dict(v_reset=None)),
    (sj_neuron.LIFNode, LIFNode, dict(tau=3.0, decay_input=False, v_reset=-0.5, detach_reset=True)),
]


def _make(name, which_alpha, spiking=True):
    """The SpikingJelly surrogate object, and our (string, alpha): alpha None for the default, so that our
    default alpha is checked against SpikingJelly's."""
    ours, to_ours, other = SURROGATES[name]
    cls = getattr(sj_surrogate, name)
    if which_alpha == "default":
        return cls(spiking=spiking), ours, None
    return cls(alpha=other, spiking=spiking), ours, to_ours(other)


def _input():
    # u = h - v_th spread over both tails and the middle of every surrogate
    return torch.randn(6, 3, 40) * 1.5 + 0.3


def _run(node, x, g):
    x = x.clone().requires_grad_(True)
    out = node(x)
    out.backward(g)
    return out.detach(), x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which_alpha", ALPHAS)
@pytest.mark.parametrize("name", list(SURROGATES))
def test_spiking_matches_spikingjelly(name, which_alpha, backend):
    """Spikes bit-identical to SpikingJelly's and its input gradients to fp32 tolerance, with the surrogate
    given as SpikingJelly's object and as our string."""
    require_backend(backend)
    x = _input()
    g = torch.randn_like(x)
    for sj_cls, our_cls, kwargs in NODES:
        sj_object, string, alpha = _make(name, which_alpha)
        theirs = _run(sj_cls(surrogate_function=sj_object, step_mode="m", **kwargs), x, g)
        as_object = our_cls(surrogate_function=_make(name, which_alpha)[0], backend=backend, **kwargs)
        as_string = our_cls(surrogate=string, alpha=alpha, backend=backend, **kwargs)
        assert (as_object.surrogate, as_object.alpha, as_object.spiking) == (as_string.surrogate, as_string.alpha,
                                                                             True)
        for ours in (as_object, as_string):
            spikes, grad_x = _run(ours, x, g)
            assert torch.equal(spikes, theirs[0]), f"{name} {kwargs}: spikes differ from SpikingJelly's"
            assert grad_x.abs().max() > 0, "the surrogate gradient reached x"
            torch.testing.assert_close(grad_x, theirs[1], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name} {kwargs} grad_x: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which_alpha", ALPHAS)
@pytest.mark.parametrize("name", WITH_PRIMITIVE)
def test_primitive_matches_spikingjelly(name, which_alpha, backend):
    """spiking=False: the neuron emits the surrogate's primitive, SpikingJelly's primitive_function; outputs
    and input gradients (autograd through the primitive there, the surrogate backward here) to fp32 tolerance."""
    require_backend(backend)
    x = _input()
    g = torch.randn_like(x)
    for sj_cls, our_cls, kwargs in NODES:
        sj_object, string, alpha = _make(name, which_alpha, spiking=False)
        theirs = _run(sj_cls(surrogate_function=sj_object, step_mode="m", **kwargs), x, g)
        ours = our_cls(surrogate_function=_make(name, which_alpha, spiking=False)[0], backend=backend, **kwargs)
        assert not ours.spiking
        neuron = "lif" if our_cls is LIFNode else "if"
        op_kwargs = {k: v for k, v in kwargs.items() if k != "tau"}
        results = [_run(ours, x, g),
                   _run(lambda x: stars_fast.multistep_lif(x, neuron=neuron, tau=kwargs.get("tau", 2.0),
                                                           surrogate=string, alpha=alpha, spiking=False,
                                                           backend=backend, **op_kwargs), x, g)]
        assert ((0 < theirs[0]) & (theirs[0] < 1)).any(), "smooth outputs, not spikes"
        for out, grad_x in results:
            torch.testing.assert_close(out, theirs[0], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {kwargs}: {m}")
            torch.testing.assert_close(grad_x, theirs[1], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name} {kwargs} grad_x: {m}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("surrogate", ["piecewise_exp", "soft_sign", "erf"])
@pytest.mark.parametrize("neuron,v_reset,alpha", [("lif", 0.0, None), ("if", None, 1.7)])
def test_gradcheck_primitive(backend, surrogate, neuron, v_reset, alpha):
    """With spiking=False the forward is the primitive, so the surrogate backward is its exact derivative:
    float64 gradcheck over x and v_init. (super_spike has no primitive; the parity tests above and
    test_spiking_float64_matches_reference cover its backward.)"""
    require_backend(backend)
    x = (torch.randn(3, 2, 5, dtype=torch.float64) * 0.8 + 0.5).requires_grad_(True)
    v_init = (torch.randn(2, 5, dtype=torch.float64) * 0.2).requires_grad_(True)

    def fn(x, v_init):
        return stars_fast.multistep_lif(x, neuron=neuron, tau=2.5, v_reset=v_reset, surrogate=surrogate, alpha=alpha,
                                        spiking=False, v_init=v_init, return_v=True, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, v_init), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("surrogate", NEW)
def test_spiking_float64_matches_reference(surrogate):
    """The C++ kernels in float64 against the reference's autograd: spikes equal, gradients to 1e-12."""
    require_backend("cpu")
    x = torch.randn(5, 2, 37, dtype=torch.float64) * 1.5 + 0.4
    g = torch.randn_like(x)
    results = {}
    for backend in ("reference", "cpu"):
        results[backend] = _run(lambda x: stars_fast.multistep_lif(x, tau=1.7, v_reset=None, surrogate=surrogate,
                                                                   alpha=1.3, backend=backend), x, g)
    assert torch.equal(results["cpu"][0], results["reference"][0])
    torch.testing.assert_close(results["cpu"][1], results["reference"][1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("surrogate", NEW)
def test_half_io_matches_reference(surrogate, dtype, backend):
    """16-bit I/O (fp32 inside): spikes equal to the reference's in the same dtype; smooth outputs and
    gradients within two ulps of the output type."""
    require_backend(backend)
    x = (torch.randn(5, 2, 64) * 1.5 + 0.4).to(dtype)
    g = torch.randn_like(x)
    tol = dict(rtol=2 * torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps)
    for spiking in (True, False) if surrogate != "super_spike" else (True,):
        results = {}
        for name in ("reference", backend):
            results[name] = _run(lambda x: stars_fast.multistep_lif(x, tau=1.7, surrogate=surrogate, spiking=spiking,
                                                                    backend=name), x, g)
        (out, grad_x), (ref_out, ref_grad) = results[backend], results["reference"]
        assert out.dtype == grad_x.dtype == dtype
        if spiking:
            assert torch.equal(out, ref_out)
        else:
            torch.testing.assert_close(out.float(), ref_out.float(), **tol)
        torch.testing.assert_close(grad_x.float(), ref_grad.float(), rtol=tol["rtol"],
                                   atol=tol["atol"] * ref_grad.float().abs().max().item())


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("surrogate", NEW)
def test_nan_like_the_reference(surrogate, backend):
    """A NaN input gives NaN outputs and NaN gradients exactly where the reference gives them."""
    require_backend(backend)
    x = torch.randn(4, 37) * 1.5 + 0.4
    x[1, 3] = x[0, 7] = x[3, 20] = float("nan")
    g = torch.randn_like(x)
    for spiking in (True, False) if surrogate != "super_spike" else (True,):
        (out, grad_x), (ref_out, ref_grad) = (
            _run(lambda x: stars_fast.multistep_lif(x, v_reset=None, surrogate=surrogate, spiking=spiking,
                                                    backend=name), x, g) for name in (backend, "reference"))
        assert ref_out.isnan().any() and ref_grad.isnan().any()
        assert torch.equal(out.isnan(), ref_out.isnan()) and torch.equal(grad_x.isnan(), ref_grad.isnan())


@pytest.mark.parametrize("backend", BACKENDS)
def test_super_spike_has_no_primitive(backend):
    """SpikingJelly's SuperSpike(spiking=False) raises (it defines no primitive); ours refuses it with a
    ValueError at construction, and the op refuses spiking=False with "super_spike"."""
    require_backend(backend)
    x = _input()
    with pytest.raises(NotImplementedError):
        sj_neuron.LIFNode(surrogate_function=sj_surrogate.SuperSpike(spiking=False), step_mode="m")(x)
    with pytest.raises(ValueError, match=r"SuperSpike\(spiking=False\) is not supported"):
        LIFNode(surrogate_function=sj_surrogate.SuperSpike(spiking=False), backend=backend)
    with pytest.raises(ValueError, match="'super_spike' has none"):
        stars_fast.multistep_lif(x, surrogate="super_spike", spiking=False, backend=backend)


def test_kernels_check_the_surrogate_id():
    """The second line of checks, in the launchers: ids 0..6, and no primitive for super_spike (5)."""
    x, k = torch.randn(3, 5), torch.tensor([0.5])
    launchers = []
    if stars_fast.available_backends("cpu")["cpu"] == "":
        launchers.append(torch.ops.stars_fast.lif_forward)
    if stars_fast.available_backends("cpu")["triton"] == "":
        from stars_fast.kernels import lif as triton_lif

        launchers.append(triton_lif.lif_forward)
    assert launchers
    for forward in launchers:
        for sid in range(7):
            forward(x, None, k, True, False, 1.0, 0.0, True, sid, 1.5, sid == 5, False)  # smooth but 5
        with pytest.raises((RuntimeError, ValueError), match="surrogate must be 0 .* 6 \\(erf\\)"):
            forward(x, None, k, True, False, 1.0, 0.0, True, 7, 1.5, True, False)
        with pytest.raises(ValueError, match="super_spike has no primitive"):
            forward(x, None, k, True, False, 1.0, 0.0, True, 5, 1.5, False, False)


def test_unknown_surrogate_names_list_the_valid_ones():
    valid = ["sigmoid", "atan", "triangle", "piecewise_exp", "soft_sign", "super_spike", "erf"]
    for call in (lambda: stars_fast.multistep_lif(torch.randn(2, 3), surrogate="relu"),
                 lambda: LIFNode(surrogate="relu")):
        with pytest.raises(ValueError, match="unknown surrogate 'relu'") as info:
            call()
        assert all(repr(name) in str(info.value) for name in valid), str(info.value)
    with pytest.raises(ValueError, match="Rect is not supported") as info:
        LIFNode(surrogate_function=sj_surrogate.Rect())
    assert all(name in str(info.value) for name in SURROGATES), str(info.value)


def test_default_alphas_are_spikingjelly_s():
    for name, (ours, to_ours, _) in SURROGATES.items():
        assert reference.SURROGATE_DEFAULT_ALPHA[ours] == to_ours(getattr(sj_surrogate, name)().alpha), name
