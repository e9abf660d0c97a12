"""Helpers of the neuron tests. `loop`: a plain-PyTorch neuron loop, SpikingJelly's LIF (dividing by tau) /
IF / PLIF (multiplying by k) step by step, with the threshold and k scalars or tensors broadcast over the
channels; it shares no code with the package, and the tests compare the fused ops with it. Also the
checks of a compiled node and of the Triton op's registration."""
import torch

ALPHA = 4.0  # the sigmoid surrogate's default sharpness


class SigmoidSpike(torch.autograd.Function):
    """Theta(u) forward, alpha sigmoid'(alpha u) backward."""

    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u)
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        s = torch.sigmoid(ALPHA * u)
        return grad * ALPHA * s * (1 - s)


def channel_view(p, x):
    """A number or a 0-dim tensor as it is, a tensor [C] broadcast over the channels (dim 2 of x[T, B, C, ...])."""
    if not isinstance(p, torch.Tensor):
        return p
    p = p.to(x.dtype)
    return p if p.dim() == 0 else p.reshape((1, -1) + (1,) * (x.dim() - 3))


def loop(x, v_threshold=1.0, k=None, *, neuron="plif", tau=2.5, decay_input=True, v_reset=0.0, detach_reset=False,
         spiking=True):
    """(spikes, v_last) of LIF (h divides by tau) / IF / PLIF (h multiplies by k) over x[T, ...]; half x is
    computed in fp32 and its outputs returned in x's dtype (their gradients arrive rounded to it)."""
    dtype = x.dtype
    x = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    theta, k = channel_view(v_threshold, x), channel_view(k, x)
    v_r = 0.0 if v_reset is None else v_reset
    v = torch.full_like(x[0], v_r)
    spikes = []
    for t in range(x.shape[0]):
        if neuron == "if":
            h = v + x[t]
        elif neuron == "lif":
            h = v + (x[t] - (v - v_r)) / tau if decay_input else v - (v - v_r) / tau + x[t]
        else:
            h = v + (x[t] - (v - v_r)) * k if decay_input else v - (v - v_r) * k + x[t]
        s = SigmoidSpike.apply(h - theta) if spiking else torch.sigmoid(ALPHA * (h - theta))
        s_reset = s.detach() if detach_reset else s
        v = h - theta * s_reset if v_reset is None else h * (1 - s_reset) + v_reset * s_reset
        spikes.append(s)
    return torch.stack(spikes).to(dtype), v.to(dtype)


def assert_compiled_matches_eager(node, x, parameter):
    """torch.compile(node, fullgraph=True) against the eager node on x: the same spikes, and the same
    gradients of x and of the node's `parameter`."""
    compiled = torch.compile(node, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (compiled, node):
        parameter.grad = None
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        y.sum().backward()
        outs.append((y, xi.grad, parameter.grad.clone()))
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1:], outs[1][1:]):
        torch.testing.assert_close(a, b)


def opcheck_triton_neuron(args):
    """torch.library.opcheck of the Triton neuron op (defined on the first triton call). Under the
    interpreter a launch reads real data pointers, so the fake-tensor dispatch check cannot run there."""
    from stars_fast import _backend
    from stars_fast.ops import lif

    lif.multistep_neuron(torch.zeros(1, 1), 0.5, backend="triton")
    tests = ("test_schema", "test_autograd_registration", "test_faketensor") if _backend.triton_interpreter() \
        else None
    torch.library.opcheck(lif._triton_neuron, args, **({"test_utils": tests} if tests else {}))
