"""Triton kernels of the multi-step LIF / IF neuron (shared/DESIGN.md section 2.1).

x is viewed as [T, N] (time first, N neurons, contiguous). One program owns BLOCK neurons and
scans t = 0..T-1 over them, with the membrane state and all arithmetic in fp32 whatever the I/O
dtype. Per element and step (k = 1/tau, v_r = v_reset, or 0 for soft reset):

    charge  LIF, decay_input:  h = v + (x[t] - (v - v_r)) * k
            LIF otherwise:     h = v - (v - v_r) * k + x[t]
            IF:                h = v + x[t]
    fire    u = h - v_th;  s[t] = Theta(u) (Theta(0) = 1, NaN stays NaN), or with spiking=False
            the surrogate's primitive: sigmoid(a u) | atan(pi/2 a u)/pi + 1/2 | C1 piecewise quadratic
    reset   hard: v = h (1 - s) + v_reset s        soft: v = h - v_th s

Backward is the reverse scan of section 2.1 (gv = dL/dv, sg = surrogate'(u), D = detach_reset):

    dv/dh = (1 - s) + (v_reset - h) sg (1 - D)  (hard)  |  1 - v_th sg (1 - D)  (soft)
    gh    = gs[t] sg + gv dv/dh
    gx[t] = gh k (LIF, decay_input) | gh;   gv <- gh (1 - k) (LIF) | gh (IF);   dL/dv_init = final gv
    dL/dk = sum_t gh (x[t] - (v_prev - v_r))  (decay_input)  |  sum_t gh (-(v_prev - v_r))

Recompute choice: the backward keeps h in registers instead of reading a stored h or using grad_x
as scratch. Each program recomputes its chunk of up to _MAX_STEPS_IN_REGISTERS time steps into a
compile-time tuple of [BLOCK] tensors (the loop over the chunk is unrolled, so the tuple lives in
registers, in the same layout as the loads: no shared-memory traffic), then runs the reverse scan
over it. For T <= 32, every T a spiking network uses in practice, this reads x and grad_spikes once
and writes grad_x once: the minimal traffic, with no T x N scratch buffer. It also stays exact for
fp16/bf16 I/O, where a scratch h in grad_x's dtype would lose bits and could flip a spike. The cost
is one compilation per T (up to 32), and a BLOCK that shrinks as T grows, to keep register use
bounded. For T > 32 the scan is cut into chunks of 32 steps, taken last to first. The state v at
the start of a chunk is found by running the forward again from v_init, which costs O(T^2 / 32)
extra reads of x.

All launches use enable_fp_fusion=False: a multiply-add fused on the GPU would round differently
from the reference (and from the C++ kernels, built with -ffp-contract=off), and a spike exactly at
threshold could flip.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

SIGMOID, ATAN, TRIANGLE = 0, 1, 2
_MAX_STEPS_IN_REGISTERS = 32
_NUM_WARPS = 4
_FWD_BLOCK = 1024


@triton.jit
def _atan(x):
    """arctan(x), Cephes atanf: reduce |x| to [0, tan(pi/8)], then an odd degree-9 polynomial."""
    ax = tl.abs(x)
    big = ax > 2.414213562373095  # tan(3 pi / 8): atan(x) = pi/2 + atan(-1/x)
    mid = ax > 0.4142135623730950  # tan(pi / 8): atan(x) = pi/4 + atan((x - 1) / (x + 1))
    r = tl.where(big, -1.0 / ax, tl.where(mid, (ax - 1.0) / (ax + 1.0), ax))
    y0 = tl.where(big, 1.5707963267948966, tl.where(mid, 0.7853981633974483, 0.0))
    z = r * r
    p = (((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z - 3.33329491539e-1) * z * r + r
    y = y0 + p
    return tl.where(x < 0.0, -y, y)


@triton.jit
def _surrogate_primitive(u, alpha, SURROGATE: tl.constexpr):
    """The smooth spike of spiking=False: sigmoid(a u) | atan(pi/2 a u)/pi + 1/2 | C1 quadratic."""
    if SURROGATE == 0:
        s = tl.sigmoid(alpha * u)
    elif SURROGATE == 1:
        s = _atan(1.5707963267948966 * alpha * u) / 3.141592653589793 + 0.5
    else:
        left = (u + alpha) * (u + alpha) / (2.0 * alpha * alpha)
        right = 1.0 - (alpha - u) * (alpha - u) / (2.0 * alpha * alpha)
        mid = tl.where(u < 0.0, left, right)
        s = tl.where(u < -alpha, 0.0, tl.where(u >= alpha, 1.0, mid))
    return s


@triton.jit
def _surrogate_grad(u, alpha, SURROGATE: tl.constexpr):
    """sg(u): a sigmoid(au)(1 - sigmoid(au)) | (a/2) / (1 + (pi/2 a u)^2) | max(0, a - |u|) / a^2."""
    if SURROGATE == 0:
        sig = tl.sigmoid(alpha * u)
        sg = alpha * sig * (1.0 - sig)
    elif SURROGATE == 1:
        w = 1.5707963267948966 * alpha * u
        sg = (alpha / 2.0) / (1.0 + w * w)
    else:
        sg = tl.maximum(alpha - tl.abs(u), 0.0, propagate_nan=tl.PropagateNan.ALL) / (alpha * alpha)
    return sg


@triton.jit
def _fire(u, alpha, SURROGATE: tl.constexpr, SPIKING: tl.constexpr):
    """s = Theta(u) with Theta(0) = 1 and NaN kept, or the surrogate primitive when not SPIKING."""
    if SPIKING:
        s = tl.where(u >= 0.0, 1.0, 0.0)
        s = tl.where(u != u, u, s)
    else:
        s = _surrogate_primitive(u, alpha, SURROGATE)
    return s


@triton.jit
def _charge(v, x, k, v_rest, LEAKY: tl.constexpr, DECAY_INPUT: tl.constexpr):
    """h from v and x[t], in the reference's order of operations."""
    if LEAKY:
        if DECAY_INPUT:
            h = v + (x - (v - v_rest)) * k
        else:
            h = v - (v - v_rest) * k + x
    else:
        h = v + x
    return h


@triton.jit
def _reset(h, s, v_threshold, v_rest, HARD_RESET: tl.constexpr):
    """v after the spike: h (1 - s) + v_reset s (hard) or h - v_th s (soft)."""
    if HARD_RESET:
        v = h * (1.0 - s) + v_rest * s
    else:
        v = h - v_threshold * s
    return v


@triton.jit
def _step(v, x, k, v_threshold, v_rest, alpha, LEAKY: tl.constexpr, HARD_RESET: tl.constexpr,
          DECAY_INPUT: tl.constexpr, SURROGATE: tl.constexpr, SPIKING: tl.constexpr):
    """One time step: returns (h, s, v_next). Forward and backward recompute both call this."""
    h = _charge(v, x, k, v_rest, LEAKY, DECAY_INPUT)
    s = _fire(h - v_threshold, alpha, SURROGATE, SPIKING)
    return h, s, _reset(h, s, v_threshold, v_rest, HARD_RESET)


@triton.jit
def _initial_v(V_INIT, offs, mask, v_rest, HAS_V_INIT: tl.constexpr):
    """v before t = 0: v_init, or v_reset (0 for soft reset)."""
    if HAS_V_INIT:
        v = tl.load(V_INIT + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        v = tl.zeros(offs.shape, tl.float32) + v_rest
    return v


@triton.jit
def _lif_fwd_kernel(
    X, V_INIT, INV_TAU, SPIKES, V_LAST,
    T, N, v_threshold, v_rest, alpha,
    HAS_V_INIT: tl.constexpr, LEAKY: tl.constexpr, HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr,
    SURROGATE: tl.constexpr, SPIKING: tl.constexpr, STEPS: tl.constexpr, BLOCK: tl.constexpr,
):
    """spikes[t] and v_last for BLOCK neurons: the charge/fire/reset scan over t = 0..T-1."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    n = tl.cast(N, tl.int64)
    k = tl.load(INV_TAU).to(tl.float32)
    v = _initial_v(V_INIT, offs, mask, v_rest, HAS_V_INIT)
    for t0 in range(0, T, STEPS):
        for i in tl.static_range(STEPS):  # unrolled, so the loads of the chunk are all in flight
            t = t0 + i
            live = mask & (t < T)
            x = tl.load(X + t * n + offs, mask=live, other=0.0).to(tl.float32)
            h, s, v_next = _step(v, x, k, v_threshold, v_rest, alpha, LEAKY, HARD_RESET, DECAY_INPUT,
                                 SURROGATE, SPIKING)
            tl.store(SPIKES + t * n + offs, s.to(SPIKES.dtype.element_ty), mask=live)
            v = tl.where(t < T, v_next, v)
    tl.store(V_LAST + offs, v.to(V_LAST.dtype.element_ty), mask=mask)


@triton.jit
def _lif_bwd_kernel(
    GRAD_SPIKES, GRAD_V_LAST, X, V_INIT, INV_TAU, GRAD_X, GRAD_V_INIT, GRAD_INV_TAU,
    T, N, v_threshold, v_rest, alpha,
    HAS_GRAD_V_LAST: tl.constexpr, HAS_V_INIT: tl.constexpr, LEAKY: tl.constexpr, HARD_RESET: tl.constexpr,
    DECAY_INPUT: tl.constexpr, SURROGATE: tl.constexpr, SPIKING: tl.constexpr, DETACH_RESET: tl.constexpr,
    NEED_INV_TAU_GRAD: tl.constexpr, STEPS: tl.constexpr, BLOCK: tl.constexpr,
):
    """grad_x[t], dL/dv_init and the per-neuron dL/dk for BLOCK neurons: recompute, then reverse scan.

    Chunks of STEPS time steps are taken last to first. For each chunk, v at its start is found by
    running the forward again from v_init. The chunk's h (and dh/dk, for dL/dk) are then recomputed
    into a compile-time tuple of [BLOCK] tensors, which stay in registers, and the reverse scan
    reads them back.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    n = tl.cast(N, tl.int64)
    k = tl.load(INV_TAU).to(tl.float32)
    v_start = _initial_v(V_INIT, offs, mask, v_rest, HAS_V_INIT)
    if HAS_GRAD_V_LAST:
        gv = tl.load(GRAD_V_LAST + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        gv = tl.zeros([BLOCK], tl.float32)
    grad_k = tl.zeros([BLOCK], tl.float32)
    num_chunks = tl.cdiv(T, STEPS)
    for chunk in range(num_chunks):
        t0 = (num_chunks - 1 - chunk) * STEPS
        v = v_start
        for t in range(t0):  # empty unless T > STEPS
            x = tl.load(X + t * n + offs, mask=mask, other=0.0).to(tl.float32)
            h, s, v = _step(v, x, k, v_threshold, v_rest, alpha, LEAKY, HARD_RESET, DECAY_INPUT,
                            SURROGATE, SPIKING)
        hs = ()  # h[t0 + i] for the chunk (a compile-time tuple: the values stay in registers)
        qs = ()  # dh/dk at fixed v, for dL/dk
        for i in tl.static_range(STEPS):
            t = t0 + i
            x = tl.load(X + t * n + offs, mask=mask & (t < T), other=0.0).to(tl.float32)
            h, s, v_next = _step(v, x, k, v_threshold, v_rest, alpha, LEAKY, HARD_RESET, DECAY_INPUT,
                                 SURROGATE, SPIKING)
            hs = hs + (h,)
            if NEED_INV_TAU_GRAD and LEAKY:
                qs = qs + (x - (v - v_rest) if DECAY_INPUT else -(v - v_rest),)
            v = v_next
        for i in tl.static_range(STEPS - 1, -1, -1):
            t = t0 + i
            live = t < T
            h = hs[i]
            u = h - v_threshold
            s = _fire(u, alpha, SURROGATE, SPIKING)
            sg = _surrogate_grad(u, alpha, SURROGATE)
            if DETACH_RESET:
                dv_dh = 1.0 - s if HARD_RESET else 1.0
            elif HARD_RESET:
                dv_dh = (1.0 - s) + (v_rest - h) * sg
            else:
                dv_dh = 1.0 - v_threshold * sg
            gs = tl.load(GRAD_SPIKES + t * n + offs, mask=mask & live, other=0.0).to(tl.float32)
            gh = gs * sg + gv * dv_dh
            gx = gh * k if (LEAKY and DECAY_INPUT) else gh
            tl.store(GRAD_X + t * n + offs, gx.to(GRAD_X.dtype.element_ty), mask=mask & live)
            if NEED_INV_TAU_GRAD and LEAKY:
                grad_k += tl.where(live, gh * qs[i], 0.0)
            gv = tl.where(live, gh * (1.0 - k) if LEAKY else gh, gv)
    tl.store(GRAD_V_INIT + offs, gv.to(GRAD_V_INIT.dtype.element_ty), mask=mask)
    if NEED_INV_TAU_GRAD:
        tl.store(GRAD_INV_TAU + offs, grad_k, mask=mask)


def _check(x: torch.Tensor, v_init: Optional[torch.Tensor], inv_tau: torch.Tensor, surrogate: int) -> int:
    """Validates the arguments shared by both launchers; returns N, the number of neurons."""
    if x.dim() < 1 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be a [T, N] float32/float16/bfloat16 tensor, got {x.dtype} of shape {tuple(x.shape)}")
    n = math.prod(x.shape[1:])
    if v_init is not None and v_init.numel() != n:
        raise ValueError(f"v_init must have {n} elements (one per neuron), got shape {tuple(v_init.shape)}")
    if inv_tau.numel() != 1:
        raise ValueError(f"inv_tau must be a 1-element tensor, got shape {tuple(inv_tau.shape)}")
    if surrogate not in (SIGMOID, ATAN, TRIANGLE):
        raise ValueError(f"surrogate must be 0 (sigmoid), 1 (atan) or 2 (triangle), got {surrogate}")
    return n


def _steps(T: int) -> Tuple[int, int]:
    """(STEPS, BLOCK) of the backward: STEPS time steps of BLOCK neurons are held in registers."""
    steps = max(1, min(T, _MAX_STEPS_IN_REGISTERS))
    per_thread = max(1, min(4, 16 // steps))  # neurons per thread, about 16 held values of h per thread
    return steps, 32 * _NUM_WARPS * per_thread


def lif_forward(
    x: torch.Tensor, v_init: Optional[torch.Tensor], inv_tau: torch.Tensor, leaky: bool, v_threshold: float,
    v_reset: Optional[float], decay_input: bool, surrogate: int, alpha: float, spiking: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Multi-step neuron over x[T, N] -> (spikes [T, N] in x's dtype, v_last [N] in x's dtype)."""
    N = _check(x, v_init, inv_tau, surrogate)
    x = x.contiguous()
    T = x.shape[0]
    spikes = torch.empty_like(x)
    v_last = torch.empty(x.shape[1:], dtype=x.dtype, device=x.device)
    if N == 0:
        return spikes, v_last
    v_init = v_init.contiguous() if v_init is not None else None
    grid = (triton.cdiv(N, _FWD_BLOCK),)
    torch.library.wrap_triton(_lif_fwd_kernel)[grid](
        x, v_init, inv_tau, spikes, v_last,
        T, N, float(v_threshold), 0.0 if v_reset is None else float(v_reset), float(alpha),
        HAS_V_INIT=v_init is not None, LEAKY=bool(leaky), HARD_RESET=v_reset is not None,
        DECAY_INPUT=bool(decay_input), SURROGATE=int(surrogate), SPIKING=bool(spiking),
        STEPS=_steps(T)[0], BLOCK=_FWD_BLOCK,
        num_warps=_NUM_WARPS, enable_fp_fusion=False,
    )
    return spikes, v_last


def lif_backward(
    grad_spikes: torch.Tensor, grad_v_last: Optional[torch.Tensor], x: torch.Tensor, v_init: Optional[torch.Tensor],
    inv_tau: torch.Tensor, leaky: bool, v_threshold: float, v_reset: Optional[float], decay_input: bool,
    surrogate: int, alpha: float, spiking: bool, detach_reset: bool, need_inv_tau_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Surrogate-gradient backward -> (grad_x [T, N], grad_v_init [N] in x's dtype, grad_inv_tau).

    grad_inv_tau is the per-neuron partial sum [N] fp32 of dL/d(1/tau) when need_inv_tau_grad (the
    caller reduces it, deterministically), else an empty tensor.
    """
    N = _check(x, v_init, inv_tau, surrogate)
    x = x.contiguous()
    grad_spikes = grad_spikes.contiguous()  # autograd may hand over expanded (stride-0) gradients
    T = x.shape[0]
    grad_x = torch.empty_like(x)
    grad_v_init = torch.empty(x.shape[1:], dtype=x.dtype, device=x.device)
    shape_tau = x.shape[1:] if need_inv_tau_grad else (0,)
    grad_inv_tau = torch.empty(shape_tau, dtype=torch.float32, device=x.device)
    if N == 0:
        return grad_x, grad_v_init, grad_inv_tau
    grad_v_last = grad_v_last.contiguous() if grad_v_last is not None else None
    v_init = v_init.contiguous() if v_init is not None else None
    steps, block = _steps(T)
    torch.library.wrap_triton(_lif_bwd_kernel)[(triton.cdiv(N, block),)](
        grad_spikes, grad_v_last, x, v_init, inv_tau, grad_x, grad_v_init, grad_inv_tau if need_inv_tau_grad else None,
        T, N, float(v_threshold), 0.0 if v_reset is None else float(v_reset), float(alpha),
        HAS_GRAD_V_LAST=grad_v_last is not None, HAS_V_INIT=v_init is not None, LEAKY=bool(leaky),
        HARD_RESET=v_reset is not None, DECAY_INPUT=bool(decay_input), SURROGATE=int(surrogate),
        SPIKING=bool(spiking), DETACH_RESET=bool(detach_reset), NEED_INV_TAU_GRAD=bool(need_inv_tau_grad),
        STEPS=steps, BLOCK=block, num_warps=_NUM_WARPS, enable_fp_fusion=False,
    )
    return grad_x, grad_v_init, grad_inv_tau
