"""Plain-PyTorch references of every op: the ground truth for tests and benchmarks.

Written straight from docs/design.md section 2 (paper Eqs. 1 and 12-17), with autograd doing
the differentiation, so they share no code with the fused kernels.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

# SpikingJelly's defaults (triangle is its PiecewiseQuadratic(alpha=1), whose a is 1/alpha).
SURROGATE_DEFAULT_ALPHA = {"sigmoid": 4.0, "atan": 2.0, "triangle": 1.0, "piecewise_exp": 1.0, "soft_sign": 2.0,
                           "super_spike": 1.0, "erf": 2.0}
# SpikingJelly's SuperSpike defines no primitive (its spiking=False raises), so neither do we.
SURROGATES_WITHOUT_PRIMITIVE = ("super_spike",)


def surrogate_grad(u: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
    """sg(u): sigmoid a*s(au)(1-s(au)); atan (a/2)/(1+(pi/2*a*u)^2); triangle max(0, a-|u|)/a^2;
    piecewise_exp (a/2) e^(-a|u|); soft_sign 1/(2a(1/a+|u|)^2); super_spike a/(1+|u|)^2;
    erf (a/sqrt(pi)) e^(-(au)^2) (SpikingJelly's PiecewiseExp, SoftSign, SuperSpike, Erf)."""
    if surrogate == "sigmoid":
        s = torch.sigmoid(alpha * u)
        return alpha * s * (1.0 - s)
    if surrogate == "atan":
        return (alpha / 2.0) / (1.0 + (math.pi / 2.0 * alpha * u) ** 2)
    if surrogate == "triangle":
        return torch.clamp(alpha - u.abs(), min=0.0) / (alpha * alpha)
    if surrogate == "piecewise_exp":
        return alpha / 2.0 * torch.exp(-alpha * u.abs())
    if surrogate == "soft_sign":
        return 1.0 / (2.0 * alpha * (1.0 / alpha + u.abs()) ** 2)
    if surrogate == "super_spike":
        return alpha / (u.abs() + 1.0) ** 2
    if surrogate == "erf":
        return torch.exp(-(alpha * u) ** 2) * (alpha / math.sqrt(math.pi))
    raise ValueError(f"unknown surrogate {surrogate!r}")


def surrogate_primitive(u: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
    """The smooth 'spike' whose derivative is surrogate_grad (SpikingJelly's spiking=False)."""
    if surrogate == "sigmoid":
        return torch.sigmoid(alpha * u)
    if surrogate == "atan":
        return torch.atan(math.pi / 2.0 * alpha * u) / math.pi + 0.5
    if surrogate == "triangle":
        a = alpha
        left = (u + a) ** 2 / (2 * a * a)
        right = 1.0 - (a - u) ** 2 / (2 * a * a)
        mid = torch.where(u < 0, left, right)
        return torch.where(u < -a, torch.zeros_like(u), torch.where(u >= a, torch.ones_like(u), mid))
    if surrogate == "piecewise_exp":  # Theta(u) - sign(u) e^(-a|u|)/2, the sign a constant: exact at u = 0
        sign = torch.where(u >= 0, 1.0, -1.0).to(u.dtype)
        half_tail = torch.exp(-alpha * sign * u) / 2.0
        return torch.where(u >= 0, 1.0 - half_tail, half_tail)
    if surrogate == "soft_sign":
        return (torch.nn.functional.softsign(alpha * u) + 1.0) / 2.0
    if surrogate == "erf":  # erfc keeps the far negative tail accurate, where 1 + erf(au) cancels
        return torch.erfc(-alpha * u) / 2.0
    if surrogate in SURROGATES_WITHOUT_PRIMITIVE:
        raise ValueError(f"surrogate {surrogate!r} has no primitive (SpikingJelly defines none): spiking=False "
                         f"is not supported with it")
    raise ValueError(f"unknown surrogate {surrogate!r}")


class _HeavisideSurrogate(torch.autograd.Function):
    """Forward Theta(u) (Theta(0) = 1, NaN stays NaN); backward grad * surrogate'(u). In the
    setup_context form, with its vmap rule generated, so that torch.func transforms can run it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(u, surrogate, alpha):
        spike = (u >= 0).to(u.dtype)
        return torch.where(torch.isnan(u), u, spike)

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, ctx.surrogate, ctx.alpha = inputs
        ctx.save_for_backward(u)

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        return grad * surrogate_grad(u, ctx.surrogate, ctx.alpha), None, None


def multistep_neuron(
    x: torch.Tensor,
    inv_tau: Union[float, torch.Tensor, None] = None,
    *,
    tau: Optional[float] = None,
    leaky: bool = True,
    v_threshold: Union[float, torch.Tensor] = 1.0,
    v_reset: Optional[float] = 0.0,
    decay_input: bool = True,
    detach_reset: bool = False,
    surrogate: str = "sigmoid",
    alpha: Optional[float] = None,
    spiking: bool = True,
    v_init: Optional[torch.Tensor] = None,
):
    """Reference multi-step LIF (leaky=True) / IF neuron over x[T, ...]; returns (spikes, v_last).

    charge  LIF decay_input:  h = v + (x[t] - (v - v_r)) / tau      (tau given: SpikingJelly's LIFNode)
                              h = v + (x[t] - (v - v_r)) * k        (k = inv_tau given: ParametricLIFNode)
            LIF otherwise:    h = v - (v - v_r) / tau + x[t]   |   h = v - (v - v_r) * k + x[t]
            IF:               h = v + x[t]                          (tau / inv_tau ignored)
    fire    s = Theta(h - v_th)          (spiking=False: the surrogate's primitive)
    reset   hard: v = h (1 - s) + v_reset s      soft (v_reset None): v = h - v_th s, v_r = 0
    v_th may be a tensor that broadcasts to one step (a learnable threshold; autograd gives its gradient).
    State and arithmetic in fp32 for half inputs, in the input dtype otherwise.
    """
    if leaky and (inv_tau is None) == (tau is None):
        raise ValueError("a LIF neuron needs exactly one of inv_tau (multiply by 1/tau) or tau (divide by tau)")
    if alpha is None:
        alpha = SURROGATE_DEFAULT_ALPHA[surrogate]
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xs = x.to(compute)
    v_r = 0.0 if v_reset is None else v_reset
    step_shape = xs.shape[1:]
    if v_init is None:
        v = xs.new_full(step_shape, v_r)
    else:
        v = v_init.to(compute).expand(step_shape)
    if isinstance(inv_tau, torch.Tensor):
        inv_tau = inv_tau.to(compute)
    if isinstance(v_threshold, torch.Tensor):  # a learnable threshold, broadcast to one step
        v_threshold = v_threshold.to(compute)
    spikes = []
    for t in range(xs.shape[0]):
        if not leaky:
            h = v + xs[t]
        elif decay_input:
            h = v + ((xs[t] - (v - v_r)) / tau if tau is not None else (xs[t] - (v - v_r)) * inv_tau)
        else:
            h = v - ((v - v_r) / tau if tau is not None else (v - v_r) * inv_tau) + xs[t]
        u = h - v_threshold
        if spiking:
            s = _HeavisideSurrogate.apply(u, surrogate, alpha)
        else:
            s = surrogate_primitive(u, surrogate, alpha)
        s_reset = s.detach() if detach_reset else s
        if v_reset is None:
            v = h - v_threshold * s_reset
        else:
            v = h * (1.0 - s_reset) + v_reset * s_reset
        spikes.append(s)
    # T = 0: an empty result that is still a function of x (it carries a grad_fn when x needs grad).
    spikes = torch.stack(spikes) if spikes else xs * 0.0
    return spikes.to(x.dtype), v.to(x.dtype)


def pool_features(f: torch.Tensor) -> torch.Tensor:
    """Eq. 12: [B, C, *S] -> mean over S; [T, B, C, *S] (student, time first) -> mean over T and S."""
    if f.dim() == 4:
        return f.mean(dim=(2, 3))
    if f.dim() == 5:
        return f.mean(dim=(0, 3, 4))
    raise ValueError(f"pool_features expects [B, C, H, W] or [T, B, C, H, W], got shape {tuple(f.shape)}")


RCA_SILENT_TOL = 1e-3  # tau of docs/design.md section 2.2: a row is silent when ||z_i|| <= tau max_j ||z_j||
# normalize="teacher" divides by s = max(std(zT), tau_std rms(zT), eps) (docs/design.md 2.2): a constant
# teacher layer at c is standardized by 1e-3 |c|, not by eps (which gave ~1e9 gradients).
NORMALIZE_STD_TOL = 1e-3


def teacher_std_floored(zt: torch.Tensor, eps: float) -> torch.Tensor:
    """s = max(std_pop(zT), tau_std rms(zT), eps), rms(zT)^2 = mean(zT)^2 + std_pop(zT)^2; 1 where s = 0
    (an all-zero teacher layer has nothing to standardize by); NaN stays NaN."""
    std, mean = zt.std(correction=0), zt.mean()
    s = torch.maximum(std, NORMALIZE_STD_TOL * torch.hypot(mean, std)).clamp_min(eps)
    return torch.where(s == 0, torch.ones_like(s), s)


def _row_norms(z: torch.Tensor) -> torch.Tensor:
    """||z_i|| [B, 1], taken as m ||z_i / m|| with m = max_c |z_ic|, so that neither huge rows (squares of
    1e20 overflow float) nor tiny ones (squares of 1e-20 are subnormal) lose the norm. A zero row has
    norm 0; a row with an infinite element keeps the norm inf; NaN stays NaN."""
    m = z.abs().amax(dim=1, keepdim=True)
    rescale = (m > 0) & torch.isfinite(m)
    m_safe = torch.where(rescale, m, torch.ones_like(m))  # no 0 / 0 in the branch where() drops
    return torch.where(rescale, m_safe * (z / m_safe).norm(dim=1, keepdim=True), z.norm(dim=1, keepdim=True))


def rca_active_rows(norms: torch.Tensor) -> torch.Tensor:
    """Rows of one side of one layer that have a direction: not ||z_i|| <= tau max_j ||z_j|| [B] (bool).

    Where the layer's largest norm is not finite (NaN or inf features) no row is silent, so that NaN
    and inf reach the loss as they would without the rule."""
    norms = norms.detach().reshape(-1)
    threshold = RCA_SILENT_TOL * norms.amax()
    return ~((norms <= threshold) & torch.isfinite(threshold))


def _pairwise_rca(zt: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
    """Eq. 14 over the rows active on both sides: mean over their pairs i<j of (cos_S(i, j) - cos_T(i, j))^2.

    Fewer than two active rows leave no pair: the loss is 0 with zero gradients (still a function of
    both inputs, so that NaN reaches it). Written with masks, not data-dependent shapes, so that
    torch.func.vmap runs it; silent rows are replaced by ones before any norm is taken, so that nothing
    of theirs (not even 0 * the derivative of a zero row's norm) reaches the gradient."""
    with torch.no_grad():  # which rows take part is a constant of the loss
        active = rca_active_rows(_row_norms(zt)) & rca_active_rows(_row_norms(zs))
    rows = active[:, None]
    ut, us = ((z_safe := torch.where(rows, z, torch.ones_like(z))) / _row_norms(z_safe) for z in (zt, zs))
    ut, us = torch.where(rows, ut, torch.zeros_like(ut)), torch.where(rows, us, torch.zeros_like(us))
    i, j = torch.triu_indices(zt.shape[0], zt.shape[0], offset=1, device=zt.device)
    pairs = active[i] & active[j]
    count = pairs.sum()
    squares = torch.where(pairs, ((us[i] * us[j]).sum(dim=1) - (ut[i] * ut[j]).sum(dim=1)) ** 2, 0.0)
    no_pair = (zt * 0).sum() + (zs * 0).sum()
    return torch.where(count > 0, squares.sum() / count.clamp_min(1), no_pair)


def _soft_exceedance(z: torch.Tensor, theta: torch.Tensor, delta: float) -> torch.Tensor:
    """Eq. 16: p^m = mean_{b,c} sigmoid((z_bc - theta_m) / delta), one value per threshold."""
    return torch.sigmoid((z.unsqueeze(-1) - theta) / delta).mean(dim=(0, 1))


def stars_loss(
    z_teacher: Sequence[torch.Tensor],
    z_student: Sequence[torch.Tensor],
    *,
    quantiles: Sequence[float] = (0.6, 0.7, 0.8, 0.9, 0.95),
    thresholds: Optional[Sequence[float]] = None,
    delta: float = 0.5,
    weights: Optional[Sequence[float]] = None,
    lambda_rca: float = 1.0,
    lambda_tar: float = 1.0,
    normalize: Optional[str] = None,
    eps: float = 0.0,
):
    """Reference STARS loss (Eqs. 14-17); returns (total, L_RCA, L_TAR), all differentiable.

    normalize="teacher": z <- (z - mean(zT)) / s on both sides, s = teacher_std_floored(zT, eps) (constants).
    Thresholds: torch.quantile of the (normalized) teacher features, detached, or fixed values.
    """
    weights = [1.0] * len(z_teacher) if weights is None else list(weights)
    rca_terms, tar_terms = [], []
    for zt, zs in zip(z_teacher, z_student):
        # half features are computed in fp32, as the fused kernels do (torch.quantile takes no half)
        zt, zs = (z.float() if z.dtype in (torch.float16, torch.bfloat16) else z for z in (zt, zs))
        rca_terms.append(_pairwise_rca(zt, zs))
        if normalize == "teacher":
            mu = zt.detach().mean()
            sd = teacher_std_floored(zt.detach(), eps)
            zt, zs = (zt - mu) / sd, (zs - mu) / sd
        if thresholds is None:
            q = torch.tensor(list(quantiles), dtype=zt.dtype, device=zt.device)
            theta = torch.quantile(zt.detach().flatten(), q)
        else:
            theta = torch.tensor(list(thresholds), dtype=zt.dtype, device=zt.device)
        p_t = _soft_exceedance(zt, theta, delta)
        p_s = _soft_exceedance(zs, theta, delta)
        tar_terms.append(((p_s - p_t) ** 2).mean())
    w_sum = sum(weights)
    rca = sum(w * r for w, r in zip(weights, rca_terms)) / w_sum
    tar = sum(w * t for w, t in zip(weights, tar_terms)) / w_sum
    return lambda_rca * rca + lambda_tar * tar, rca, tar
