"""What a user would run instead of stars_fast: the speed baselines of the benchmarks.

These are deliberately NOT the test oracles of stars_fast/reference.py (the pair-by-pair RCA there
is written for clarity, not speed). Each baseline computes the same values as our op; the
benchmarks assert that on one call before timing.

- LIF: the plain T-step loop (charge, Heaviside with a sigmoid-surrogate autograd.Function, hard
  reset), eager or under torch.compile; SpikingJelly 2.0's LIFNode(step_mode='m').
- STARS: a vectorized implementation in Gram form (u = z/||z||, u u^T, torch.quantile, sigmoid),
  eager or under torch.compile; and its GEMMs alone (the floor of any implementation).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

TAU, V_THRESHOLD, V_RESET, SIGMOID_ALPHA = 2.0, 1.0, 0.0, 4.0
DEFAULT_QUANTILES = (0.6, 0.7, 0.8, 0.9, 0.95)


class SigmoidSurrogateSpike(torch.autograd.Function):
    """Forward Heaviside(u) (1 at u >= 0); backward grad * a * sigmoid(a u) * (1 - sigmoid(a u))."""

    @staticmethod
    def forward(ctx, u, alpha):
        ctx.save_for_backward(u)
        ctx.alpha = alpha
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        s = torch.sigmoid(ctx.alpha * u)
        return grad * (ctx.alpha * s * (1.0 - s)), None


def lif_loop(x: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """Multi-step LIF over x[T, ...] as SpikingJelly's LIFNode (decay_input, hard reset to 0):
    h = v + (x[t] - v) / tau;  s = H(h - v_th);  v = h (1 - s). State in fp32 (half inputs upcast)."""
    xs = x.float()
    v = torch.full_like(xs[0], V_RESET)
    spikes = []
    for t in range(xs.shape[0]):
        h = v + (xs[t] - (v - V_RESET)) / tau
        s = SigmoidSurrogateSpike.apply(h - V_THRESHOLD, SIGMOID_ALPHA)
        v = h * (1.0 - s) + V_RESET * s
        spikes.append(s)
    return torch.stack(spikes).to(x.dtype)


def spikingjelly_lif(tau: float = TAU) -> Tuple[Optional[Callable[[torch.Tensor], torch.Tensor]], str]:
    """(x -> spikes, "") with SpikingJelly 2.0's multi-step LIF, or (None, why it cannot run).

    fp32 x: LIFNode(step_mode='m'), reset before every call (it keeps v between calls otherwise);
    2.0's LIFNode takes no backend argument: it picks its CUDA/Triton/torch implementation itself.
    fp16/bf16 x: LIFNode would keep its state in x's dtype, which sends it to its torch reference
    in half arithmetic (other values than ours, which keeps fp32 state); so the same node's
    functional form, functional.lif_multi_step, with an fp32 initial state (its fused kernels)."""
    try:
        import spikingjelly
        from spikingjelly.activation_based import functional, neuron, surrogate
    except ImportError as error:
        return None, f"spikingjelly is not installed ({error})"
    version = getattr(spikingjelly, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("spikingjelly")
    if not version.startswith("2."):
        return None, f"spikingjelly {version} installed; the baseline is SpikingJelly 2.0"
    spike_fn = surrogate.Sigmoid(alpha=SIGMOID_ALPHA)
    node = neuron.LIFNode(tau=tau, decay_input=True, v_threshold=V_THRESHOLD, v_reset=V_RESET,
                          surrogate_function=spike_fn, detach_reset=False, step_mode="m")

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            node.reset()
            return node(x)
        v = torch.full(x.shape[1:], V_RESET, dtype=torch.float32, device=x.device)
        spikes, _, _ = functional.lif_multi_step(x, v, tau, True, V_THRESHOLD, V_RESET, spike_fn, False)
        return spikes

    return run, ""


def spikingjelly_implementation(x: torch.Tensor) -> str:
    """Which SpikingJelly entry point and implementation ran for x (after one call), for the tables."""
    entry = "LIFNode" if x.dtype == torch.float32 else "lif_multi_step, fp32 state"
    return f"{entry}, {_spikingjelly_dispatch(x.device)}"


def _spikingjelly_dispatch(device: torch.device) -> str:
    """Read from SpikingJelly's private per-device selection cache (None there: its torch reference)."""
    if device.type != "cuda":
        return "torch (its CPU path)"
    try:
        from spikingjelly._ops.lif import _selection
    except ImportError:
        return "unknown"
    chosen = getattr(_selection, "_selections", {}).values()
    names = sorted({"torch-reference" if c is None else getattr(c, "name", "unknown") for c in chosen})
    return "/".join(names) if names else "unknown"


def stars_loss_gram(z_teacher: Sequence[torch.Tensor], z_student: Sequence[torch.Tensor],
                    quantiles: Sequence[float] = DEFAULT_QUANTILES, delta: float = 0.5,
                    eps: float = 1e-12) -> torch.Tensor:
    """STARS total loss, vectorized (stars_fast.stars_loss defaults: equal weights, lambda = 1):
    RCA  u = z / max(||z||, eps);  D = u_S u_S^T - u_T u_T^T;  mean of D_ij^2 over i != j
    TAR  theta = quantile(z_T, q);  p = mean sigmoid((z - theta) / delta);  mean_m (p_S - p_T)^2
    Both averaged over the layers; autograd differentiates."""
    q = torch.tensor(list(quantiles), dtype=z_teacher[0].dtype, device=z_teacher[0].device)
    rca, tar = 0.0, 0.0
    for zt, zs in zip(z_teacher, z_student):
        batch = zt.shape[0]
        ut = zt / zt.norm(dim=1, keepdim=True).clamp_min(eps)
        us = zs / zs.norm(dim=1, keepdim=True).clamp_min(eps)
        d = us @ us.T - ut @ ut.T
        rca = rca + (d.square().sum() - d.diagonal().square().sum()) / (batch * (batch - 1))
        theta = torch.quantile(zt.detach().flatten(), q)
        p_t = torch.sigmoid((zt.unsqueeze(-1) - theta) / delta).mean(dim=(0, 1))
        p_s = torch.sigmoid((zs.unsqueeze(-1) - theta) / delta).mean(dim=(0, 1))
        tar = tar + (p_s - p_t).square().mean()
    return (rca + tar) / len(z_teacher)


def stars_gemm_operands(z_teacher: Sequence[torch.Tensor], z_student: Sequence[torch.Tensor]) -> List[tuple]:
    """Per layer (u_T, u_S, E [B, B], Gram outputs, gradient outputs): inputs of stars_gemm_floor."""
    layers = []
    for zt, zs in zip(z_teacher, z_student):
        ut = torch.nn.functional.normalize(zt.detach(), dim=1)
        us = torch.nn.functional.normalize(zs.detach(), dim=1)
        e = torch.randn(zt.shape[0], zt.shape[0], dtype=zt.dtype, device=zt.device)
        grams = (ut.new_empty(ut.shape[0], ut.shape[0]), us.new_empty(us.shape[0], us.shape[0]))
        grads = (torch.empty_like(ut), torch.empty_like(us))
        layers.append((ut, us, e, grams, grads))
    return layers


def stars_gemm_floor(layers: List[tuple]) -> None:
    """The GEMMs any STARS implementation does: u u^T per side (forward) and E u per side (gradient)."""
    for ut, us, e, (gram_t, gram_s), (grad_t, grad_s) in layers:
        torch.mm(ut, ut.T, out=gram_t)
        torch.mm(us, us.T, out=gram_s)
        torch.mm(e, ut, out=grad_t)
        torch.mm(e, us, out=grad_s)
