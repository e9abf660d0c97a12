"""A plain-PyTorch neuron loop for the tests: SpikingJelly's LIF (dividing by tau) / IF / PLIF (multiplying
by k) step by step, with the threshold and k scalars or tensors broadcast over the channels. It shares no
code with the package: the tests compare the fused ops with it."""
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
