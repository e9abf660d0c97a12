"""Triton kernels of the multi-step LIF / IF / PLIF neuron (docs/design.md section 2.1).

x is viewed as [T, N] (time first, N neurons, contiguous). One program owns BLOCK neurons and
scans t = 0..T-1 over them, with the membrane state and all arithmetic in fp32 whatever the I/O
dtype. Per element and step (v_r = v_reset, or 0 for soft reset; "/ tau" is correctly rounded
IEEE division, as SpikingJelly's LIFNode, bit-equal to tl.div_rn (_leak says how); "* k" is
PLIF's multiply by k = sigmoid(w)):

    charge  LIF, decay_input:  h = v + (x[t] - (v - v_r)) / tau   |   h = v + (x[t] - (v - v_r)) * k
            LIF otherwise:     h = v - (v - v_r) / tau + x[t]     |   h = v - (v - v_r) * k + x[t]
            IF:                h = v + x[t]
    fire    u = h - v_th;  s[t] = Theta(u) (Theta(0) = 1, NaN stays NaN), or with spiking=False
            the surrogate's primitive: sigmoid(a u) | atan(pi/2 a u)/pi + 1/2 | C1 piecewise quadratic
            | Theta(u) - sign(u) e^(-a|u|)/2 | (softsign(a u) + 1)/2 | (1 + erf(a u))/2 (super_spike has none)
    reset   hard: v = h (1 - s) + v_reset s        soft: v = h - v_th s

Backward is the reverse scan of section 2.1 (gv = dL/dv, sg = surrogate'(u), D = detach_reset):

    dv/dh = (1 - s) + (v_reset - h) sg (1 - D)  (hard)  |  1 - v_th sg (1 - D)  (soft)
    gh    = gs[t] sg + gv dv/dh
    gx[t] = gh / tau | gh k (LIF, decay_input) | gh;   gv <- gh - gh / tau | gh - gh k (LIF) | gh (IF)
    dL/dv_init = final gv;   dL/dk = sum_t gh (x[t] - (v_prev - v_r)) (decay_input) | sum_t gh (v_r - v_prev)
    dL/dv_th = sum_t gv (1 - s) - gh   (a learnable threshold: gv before its update; docs/design.md 2.1)

Memory traffic. Each thread owns a few contiguous neurons of every [N] row it touches; when
N % 16 == 0 (rows 16-byte aligned; Triton specializes on it) their elements are one vector access
per row: in the forward 4 neurons (16 B of fp32: ld/st.global.v4, 8 B of fp16/bf16: v2), in the
backward 8 B (2 fp32 or 4 fp16/bf16 neurons: v2; 2 fp16/bf16 neurons, one 32-bit access, with dL/dk,
which also holds dh/dk per step). Otherwise the accesses are scalar, each neuron with its own address
registers, and a thread owns 2 neurons in the forward, 1 in the backward. These splits keep every
variant within 128 registers per thread, so with 4 warps per program 16 warps are resident per SM
(25% occupancy, the floor of tests/compile_gate.py for these memory-bound kernels): 8 B per thread
at 16 warps keep as many bytes in flight as 16 B at 8. With b bytes per element, per neuron (S = 4
backward steps per chunk, see below):

    minimal   forward  2 T b (read x, write spikes)
              backward 3 T b (read x and grad_spikes, write grad_x)
    moved     forward  2 T b, + b for v_init when given, + b for v_last only when asked
              backward 3 T b + (T - S) b for T > S (x is read again for every chunk but the last)
                       + 8 B (ceil(T / S) - 2) of fp32 v checkpoints (written, read back) for T > 2 S
                       + b each for v_init, grad_v_last (when given), grad_v_init (when asked)
                       + 4 B of per-neuron dL/dk partial sums for PLIF
              both      + 4 B of k per neuron for PLIF per channel (read once per program)
    e.g. T = 4: forward and backward minimal; T = 32 fp32: backward 3 T b + 28 b + 48 B (1.42x)

The backward cannot hold all T steps in registers (nor compile in reasonable time: Triton's
coalescing pass grows with the cube of an unrolled chunk), so it works in chunks of S = 4 time
steps, for every T (a partial last chunk is masked): at T <= 4 it reads x and grad_spikes once. A
first pass runs the forward over chunks 0..C-2, storing the state v at the start of each chunk
1..C-2 (fp32, a scratch [C - 2, N]). Then, chunk by chunk from the last, it loads the chunk's x and
grad_spikes (all loads issued before any store), recomputes the coefficients of gh = cs[t] + gv
bs[t] (cs = grad_spikes sg, bs = dv/dh) into a compile-time tuple (the loop is unrolled, so the
tuple lives in registers), and runs the reverse scan over them, storing grad_x: no load waits on a
store. No T x N scratch, and h is exact for fp16/bf16 I/O (a scratch h in grad_x's dtype would lose
bits and could flip a spike). The forward loads chunks of 4 (T <= 4) or 8 steps of x before storing
their spikes.

All launches use enable_fp_fusion=False: a multiply-add fused on the GPU would round differently
from the reference (and from the C++ kernels, built with -ffp-contract=off), and a spike exactly at
threshold could flip. Only the surrogate, spiking, dL/dk, dL/dv_th, one k per neuron (PLIF per
channel), one v_th per neuron (a learnable threshold; the scalars' code stays as it was) and the chunk
size are compile-time constants; the neuron options (LIF/IF, divide/multiply, reset, decay_input,
detach_reset) are runtime flags selected per element, and v_init, v_last, grad_v_last, grad_v_init
runtime flags too, so the variants stay few (tests/compile_gate.py compiles every one for sm_80 and
sm_90).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

SIGMOID, ATAN, TRIANGLE, PIECEWISE_EXP, SOFT_SIGN, SUPER_SPIKE, ERF = range(7)  # stars_fast.ops.lif.SURROGATE_IDS
_NUM_WARPS = 4
_FWD_MAX_STEPS = 8  # x of a forward chunk, loaded before its spikes are stored
_BWD_STEPS = 4  # steps of a backward chunk held in registers (every T; masked past T)
# Registers per thread: at most 128 keeps 16 warps per SM (25% occupancy) at 4 warps per program. The
# neurons per thread (_fwd_block, _bwd_block) fit every variant in it; with the limit, ptxas cannot
# exceed it: a variant that needs more spills, which the compile gate fails.
_MAX_REGISTERS = 128


@triton.jit
def _atan(x):
    """arctan(x), Cephes atanf: reduce |x| to [0, tan(pi/8)] (one division), then an odd polynomial."""
    ax = tl.abs(x)
    big = ax > 2.414213562373095  # tan(3 pi / 8): atan(x) = pi/2 + atan(-1/x)
    mid = ax > 0.4142135623730950  # tan(pi / 8): atan(x) = pi/4 + atan((x - 1) / (x + 1))
    num = tl.where(big, -1.0, tl.where(mid, ax - 1.0, ax))
    den = tl.where(big, ax, tl.where(mid, ax + 1.0, 1.0))
    r = tl.fdiv(num, den)
    y0 = tl.where(big, 1.5707963267948966, tl.where(mid, 0.7853981633974483, 0.0))
    z = r * r
    p = (((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z - 3.33329491539e-1) * z * r + r
    y = y0 + p
    return tl.where(x < 0.0, -y, y)


@triton.jit
def _surrogate_primitive(u, alpha, inv_alpha2, SURROGATE: tl.constexpr):
    """The smooth spike of spiking=False: sigmoid(a u) | atan(pi/2 a u)/pi + 1/2 | C1 quadratic |
    Theta(u) - sign(u) e^(-a|u|)/2 | (softsign(a u) + 1)/2 | (1 + erf(a u))/2."""
    tl.static_assert(SURROGATE != 5, "super_spike has no primitive (the launchers refuse spiking=False)")
    if SURROGATE == 0:
        s = tl.fdiv(1.0, 1.0 + tl.exp(-alpha * u))
    elif SURROGATE == 1:
        s = _atan(1.5707963267948966 * alpha * u) * 0.3183098861837907 + 0.5
    elif SURROGATE == 2:
        left = (u + alpha) * (u + alpha) * (0.5 * inv_alpha2)
        right = 1.0 - (alpha - u) * (alpha - u) * (0.5 * inv_alpha2)
        mid = tl.where(u < 0.0, left, right)
        s = tl.where(u < -alpha, 0.0, tl.where(u >= alpha, 1.0, mid))
    elif SURROGATE == 3:  # NaN u: a NaN tail, not 1 - tail
        half_tail = tl.exp(-alpha * tl.abs(u)) * 0.5
        s = tl.where(u >= 0.0, 1.0 - half_tail, half_tail)
    elif SURROGATE == 4:
        y = alpha * u
        s = (tl.fdiv(y, 1.0 + tl.abs(y)) + 1.0) * 0.5
    else:  # 1 + erf (no erfc in tl, nor in the interpreter): within 2^-25 + erf's error of erfc(-a u)/2
        s = 0.5 + 0.5 * tl.erf(alpha * u)
    return s


@triton.jit
def _surrogate_grad(u, alpha, inv_alpha2, SURROGATE: tl.constexpr):
    """sg(u): a sigmoid(au)(1 - sigmoid(au)) | (a/2) / (1 + (pi/2 a u)^2) | max(0, a - |u|) / a^2 |
    (a/2) e^(-a|u|) | 1 / (2a (1/a + |u|)^2) | a / (1 + |u|)^2 | (a/sqrt(pi)) e^(-(a u)^2)."""
    if SURROGATE == 0:
        sig = tl.fdiv(1.0, 1.0 + tl.exp(-alpha * u))
        sg = alpha * sig * (1.0 - sig)
    elif SURROGATE == 1:
        w = 1.5707963267948966 * alpha * u
        sg = tl.fdiv(alpha * 0.5, 1.0 + w * w)
    elif SURROGATE == 2:  # NaN u gives NaN, as torch.clamp in the reference
        sg = tl.maximum(alpha - tl.abs(u), 0.0, propagate_nan=tl.PropagateNan.ALL) * inv_alpha2
    elif SURROGATE == 3:
        sg = (alpha * 0.5) * tl.exp(-alpha * tl.abs(u))
    elif SURROGATE == 4:  # as (a/2) / (1 + a|u|)^2: no 1/a needed
        w = 1.0 + alpha * tl.abs(u)
        sg = tl.fdiv(alpha * 0.5, w * w)
    elif SURROGATE == 5:
        w = 1.0 + tl.abs(u)
        sg = tl.fdiv(alpha, w * w)
    else:
        z = alpha * u
        sg = (alpha * 0.5641895835477563) * tl.exp(-(z * z))  # 1/sqrt(pi)
    return sg


@triton.jit
def _fire(u, alpha, inv_alpha2, SURROGATE: tl.constexpr, SPIKING: tl.constexpr):
    """s = Theta(u) with Theta(0) = 1 and NaN kept, or the surrogate primitive when not SPIKING."""
    if SPIKING:
        s = tl.where(u >= 0.0, 1.0, 0.0)
        s = tl.where(u != u, u, s)
    else:
        s = _surrogate_primitive(u, alpha, inv_alpha2, SURROGATE)
    return s


@triton.jit
def _leak(a, decay, inv_tau, divide):
    """a / tau, correctly rounded (IEEE division), when divide, else a * k (decay holds tau or k).

    The quotient is fp32(a * RN64(1 / tau)) in fp64, which equals RN32(a / tau) for every fp32 a and
    tau: the fp64 product is within 2^-52 (relative) of a / tau, and a quotient of two 24-bit
    significands is never within 2^-49 of a midpoint between two fp32 numbers (nor on one). Unlike
    div.rn.f32, it needs no slow-path subroutine call, whose calling convention makes ptxas spill.
    """
    return tl.where(divide, (a.to(tl.float64) * inv_tau).to(tl.float32), a * decay)


@triton.jit
def _reciprocal_f64(d):
    """1 / d in fp64 to within a few ulp without a division (whose slow path is a subroutine call):
    two Newton steps from fp32's approximate reciprocal, for normal |d| < 2^126 (and d = inf)."""
    r0 = tl.fdiv(1.0, d)
    r = r0.to(tl.float64)
    d64 = d.to(tl.float64)
    r = r * (2.0 - d64 * r)
    r = r * (2.0 - d64 * r)
    return tl.where(r0 == 0.0, 0.0, r)


@triton.jit
def _step(v, x, decay, inv_tau, v_threshold, v_rest, alpha, inv_alpha2, leaky, divide, hard_reset, decay_input,
          SURROGATE: tl.constexpr, SPIKING: tl.constexpr):
    """One time step, in the reference's order of operations: returns (h, s, v_next)."""
    leaked = _leak(tl.where(decay_input, x - (v - v_rest), v - v_rest), decay, inv_tau, divide)
    h = tl.where(leaky, tl.where(decay_input, v + leaked, v - leaked + x), v + x)
    s = _fire(h - v_threshold, alpha, inv_alpha2, SURROGATE, SPIKING)
    v_next = tl.where(hard_reset, h * (1.0 - s) + v_rest * s, h - v_threshold * s)
    return h, s, v_next


@triton.jit
def _decays(DECAY, offs, mask, PER_NEURON_DECAY: tl.constexpr):
    """(k or tau, 1/tau in fp64): the block's own k per neuron (multiply mode only) when PER_NEURON_DECAY,
    else the one value. The reciprocal serves divide mode, whose tau is always one value."""
    decay = tl.load(DECAY).to(tl.float32)
    inv_tau = _reciprocal_f64(decay)
    if PER_NEURON_DECAY:
        decay = tl.load(DECAY + offs, mask=mask, other=1.0).to(tl.float32)
    return decay, inv_tau


@triton.jit
def _thresholds(THRESHOLD, offs, mask, v_threshold, PER_NEURON_THRESHOLD: tl.constexpr):
    """v_th: the block's own threshold per neuron when PER_NEURON_THRESHOLD (a learnable threshold), else
    the one value, so that the float threshold's code is what it was."""
    if PER_NEURON_THRESHOLD:
        v_th = tl.load(THRESHOLD + offs, mask=mask, other=1.0).to(tl.float32)
    else:
        v_th = v_threshold
    return v_th


@triton.jit
def _initial_v(V_INIT, offs, mask, v_rest, has_v_init):
    """v before t = 0: v_init, or v_reset (0 for soft reset)."""
    v = tl.zeros(offs.shape, tl.float32) + v_rest
    if has_v_init:
        v = tl.load(V_INIT + offs, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit(do_not_specialize=["T"])
def _lif_fwd_kernel(
    X, V_INIT, DECAY, THRESHOLD, SPIKES, V_LAST,
    T, N, v_threshold, v_rest, alpha, inv_alpha2, leaky, divide, hard_reset, decay_input, has_v_init, need_v_last,
    SURROGATE: tl.constexpr, SPIKING: tl.constexpr, PER_NEURON_DECAY: tl.constexpr,
    PER_NEURON_THRESHOLD: tl.constexpr, STEPS: tl.constexpr, BLOCK: tl.constexpr,
):
    """spikes[t] (and v_last when asked) for BLOCK neurons: the charge/fire/reset scan over t.

    Chunks of STEPS steps: the chunk's x is loaded into registers before its spikes are stored, so
    the loads of a chunk are all in flight at once (a store may alias a later load otherwise).
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    n = tl.cast(N, tl.int64)
    decay, inv_tau = _decays(DECAY, offs, mask, PER_NEURON_DECAY)
    v_th = _thresholds(THRESHOLD, offs, mask, v_threshold, PER_NEURON_THRESHOLD)
    v = _initial_v(V_INIT, offs, mask, v_rest, has_v_init)
    for t0 in range(0, T, STEPS):
        xs = ()
        for i in tl.static_range(STEPS):
            xs = xs + (tl.load(X + (t0 + i) * n + offs, mask=mask & (t0 + i < T), other=0.0),)
        for i in tl.static_range(STEPS):
            t = t0 + i
            h, s, v_next = _step(v, xs[i].to(tl.float32), decay, inv_tau, v_th, v_rest, alpha, inv_alpha2, leaky,
                                 divide, hard_reset, decay_input, SURROGATE, SPIKING)
            tl.store(SPIKES + t * n + offs, s.to(SPIKES.dtype.element_ty), mask=mask & (t < T))
            v = tl.where(t < T, v_next, v)
    if need_v_last:
        tl.store(V_LAST + offs, v.to(V_LAST.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T"])
def _lif_bwd_kernel(
    GRAD_SPIKES, GRAD_V_LAST, X, V_INIT, DECAY, THRESHOLD, GRAD_X, GRAD_V_INIT, GRAD_DECAY, GRAD_THRESHOLD,
    V_CHECKPOINTS,
    T, N, v_threshold, v_rest, alpha, inv_alpha2, leaky, divide, hard_reset, decay_input, detach_reset,
    has_grad_v_last, has_v_init, need_grad_v_init,
    SURROGATE: tl.constexpr, SPIKING: tl.constexpr, NEED_DECAY_GRAD: tl.constexpr, PER_NEURON_DECAY: tl.constexpr,
    PER_NEURON_THRESHOLD: tl.constexpr, NEED_THRESHOLD_GRAD: tl.constexpr, STEPS: tl.constexpr, BLOCK: tl.constexpr,
):
    """grad_x[t], dL/dv_init and the per-neuron dL/dk and dL/dv_th for BLOCK neurons: checkpoint, recompute,
    reverse scan.

    Pass 1 runs the forward over chunks 0..C-2 and stores v at the start of chunks 1..C-2 in
    V_CHECKPOINTS[c - 1]. Pass 2 takes chunks last to first: v at the chunk's start (from pass 1,
    a checkpoint, or v_init); the chunk's loads, then the recompute of gh's coefficients into
    registers (gh = cs[i] + gv bs[i]: cs = grad_spikes sg, bs = dv/dh, independent of gv); then the
    reverse scan over the registers, which only stores.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    n = tl.cast(N, tl.int64)
    decay, inv_tau = _decays(DECAY, offs, mask, PER_NEURON_DECAY)
    v_th = _thresholds(THRESHOLD, offs, mask, v_threshold, PER_NEURON_THRESHOLD)
    v_init = _initial_v(V_INIT, offs, mask, v_rest, has_v_init)
    num_chunks = tl.cdiv(T, STEPS)
    v = v_init
    for c in range(num_chunks - 1):
        for i in tl.static_range(STEPS):
            x = tl.load(X + (c * STEPS + i) * n + offs, mask=mask, other=0.0).to(tl.float32)
            h, s, v = _step(v, x, decay, inv_tau, v_th, v_rest, alpha, inv_alpha2, leaky, divide, hard_reset,
                            decay_input, SURROGATE, SPIKING)
        if c + 2 < num_chunks:
            tl.store(V_CHECKPOINTS + c * n + offs, v, mask=mask)
    gv = tl.zeros([BLOCK], tl.float32)
    if has_grad_v_last:
        gv = tl.load(GRAD_V_LAST + offs, mask=mask, other=0.0).to(tl.float32)
    grad_decay = tl.zeros([BLOCK], tl.float32)
    grad_threshold = tl.zeros([BLOCK], tl.float32)
    for chunk in range(num_chunks):
        c = num_chunks - 1 - chunk
        t0 = c * STEPS
        if chunk > 0:
            checkpoint = tl.load(V_CHECKPOINTS + (c - 1) * n + offs, mask=mask & (c > 0), other=0.0)
            v = tl.where(c > 0, checkpoint, v_init)
        xs = ()
        gss = ()
        for i in tl.static_range(STEPS):
            live = mask & (t0 + i < T)
            xs = xs + (tl.load(X + (t0 + i) * n + offs, mask=live, other=0.0),)
            gss = gss + (tl.load(GRAD_SPIKES + (t0 + i) * n + offs, mask=live, other=0.0),)
        cs = ()
        bs = ()
        qs = ()  # dh/dk at fixed v, for dL/dk
        keeps = ()  # 1 - s, for dL/dv_th
        for i in tl.static_range(STEPS):
            x = xs[i].to(tl.float32)
            h, s, v_next = _step(v, x, decay, inv_tau, v_th, v_rest, alpha, inv_alpha2, leaky, divide,
                                 hard_reset, decay_input, SURROGATE, SPIKING)
            sg = _surrogate_grad(h - v_th, alpha, inv_alpha2, SURROGATE)
            keep = 1.0 - s
            dv_dh_hard = tl.where(detach_reset, keep, keep + (v_rest - h) * sg)
            dv_dh_soft = tl.where(detach_reset, 1.0, 1.0 - v_th * sg)
            cs = cs + (gss[i].to(tl.float32) * sg,)
            bs = bs + (tl.where(hard_reset, dv_dh_hard, dv_dh_soft),)
            if NEED_DECAY_GRAD:
                qs = qs + (tl.where(decay_input, x - (v - v_rest), v_rest - v),)
            if NEED_THRESHOLD_GRAD:
                keeps = keeps + (keep,)
            v = v_next
        for i in tl.static_range(STEPS - 1, -1, -1):
            t = t0 + i
            gh = cs[i] + gv * bs[i]
            leaked = _leak(gh, decay, inv_tau, divide)  # the part of gh that flows through the leak
            gx = tl.where(leaky & decay_input, leaked, gh)
            tl.store(GRAD_X + t * n + offs, gx.to(GRAD_X.dtype.element_ty), mask=mask & (t < T))
            if NEED_DECAY_GRAD:
                grad_decay += tl.where(t < T, gh * qs[i], 0.0)
            if NEED_THRESHOLD_GRAD:
                grad_threshold += tl.where(t < T, gv * keeps[i] - gh, 0.0)
            gv = tl.where(t < T, tl.where(leaky, gh - leaked, gh), gv)
    if need_grad_v_init:
        tl.store(GRAD_V_INIT + offs, gv.to(GRAD_V_INIT.dtype.element_ty), mask=mask)
    if NEED_DECAY_GRAD:
        tl.store(GRAD_DECAY + offs, grad_decay, mask=mask)
    if NEED_THRESHOLD_GRAD:
        tl.store(GRAD_THRESHOLD + offs, grad_threshold, mask=mask)


def _check(x: torch.Tensor, v_init: Optional[torch.Tensor], decay: torch.Tensor, surrogate: int, spiking: bool,
           threshold: Optional[torch.Tensor]) -> int:
    """Validates the arguments shared by both launchers; returns N, the number of neurons."""
    if x.dim() < 1 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be a [T, N] float32/float16/bfloat16 tensor, got {x.dtype} of shape {tuple(x.shape)}")
    n = math.prod(x.shape[1:])
    if v_init is not None and v_init.numel() != n:
        raise ValueError(f"v_init must have {n} elements (one per neuron), got shape {tuple(v_init.shape)}")
    if v_init is not None and v_init.device != x.device:
        raise ValueError(f"v_init is on {v_init.device} but x is on {x.device}")
    if decay.numel() not in (1, n) or not decay.is_floating_point():
        raise ValueError(f"decay must be a float tensor of 1 or N = {n} elements (one k per neuron), got "
                         f"{decay.dtype} of shape {tuple(decay.shape)}")
    if surrogate not in range(SIGMOID, ERF + 1):
        raise ValueError(f"surrogate must be 0 (sigmoid), 1 (atan), 2 (triangle), 3 (piecewise_exp), 4 (soft_sign), "
                         f"5 (super_spike) or 6 (erf), got {surrogate}")
    if not spiking and surrogate == SUPER_SPIKE:
        raise ValueError("super_spike has no primitive: spiking=False is not supported with it")
    if threshold is not None and (threshold.numel() != n or threshold.dtype != torch.float32
                                  or threshold.device != x.device):
        raise ValueError(f"threshold must be a float32 tensor of N = {n} elements (one v_th per neuron) on "
                         f"{x.device}, got {threshold.dtype} of shape {tuple(threshold.shape)} on {threshold.device}")
    return n


def _fwd_block(N: int) -> int:
    """Neurons per forward program: 4 per thread when N % 16 == 0 (one 16 B fp32 or 8 B fp16/bf16 vector
    access per row), else 2 (scalar accesses, each neuron with its own address registers)."""
    return (4 if N % 16 == 0 else 2) * 32 * _NUM_WARPS


def _bwd_block(dtype: torch.dtype, N: int, need_parameter_grad: bool) -> int:
    """Neurons per backward program, which holds S steps of coefficients per neuron: 8 bytes per thread
    and row when N % 16 == 0 (one v2 access), but 2 fp16/bf16 neurons (4 bytes) when dh/dk or 1 - s is
    held too (dL/dk, dL/dv_th); else 1 neuron per thread (scalar accesses, each neuron with its own
    address registers)."""
    if N % 16 != 0:
        per_thread = 1
    elif torch.empty((), dtype=dtype).element_size() == 2:
        per_thread = 2 if need_parameter_grad else 4
    else:
        per_thread = 2
    return per_thread * 32 * _NUM_WARPS


def _fwd_steps(T: int) -> int:
    """Forward steps per chunk: 4 up to T = 4 (the common T), else 8 (more loads in flight). Few
    distinct values keep the compiled variants few; the masked steps of a partial chunk cost
    arithmetic only, no memory traffic."""
    return 4 if T <= 4 else _FWD_MAX_STEPS


def _device_guard(x: torch.Tensor):
    """Launch on x's device, whatever device is current."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _decay_operand(decay: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return decay.reshape(-1).to(device=x.device, dtype=torch.float32).contiguous()


def _is_per_neuron_decay(decay: torch.Tensor, decay_is_tau: bool) -> bool:
    """Whether decay holds one k per neuron (N > 1 entries; multiply mode only)."""
    if decay.numel() == 1:
        return False
    if decay_is_tau:
        raise ValueError("a per-neuron decay holds k = 1/tau: decay_is_tau must be False")
    return True


def lif_forward(
    x: torch.Tensor, v_init: Optional[torch.Tensor], decay: torch.Tensor, leaky: bool, decay_is_tau: bool,
    v_threshold: float, v_reset: Optional[float], decay_input: bool, surrogate: int, alpha: float, spiking: bool,
    need_v_last: bool, threshold: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Multi-step neuron over x[T, N] -> (spikes [T, N], v_last [N] if need_v_last else [0]), x's dtype.

    decay holds tau (divided by) when decay_is_tau, else k = 1/tau (multiplied by): one value, or one k
    per neuron (N values); IF ignores it. threshold: one v_th per neuron (fp32 [N]) in place of v_threshold.
    """
    N = _check(x, v_init, decay, surrogate, spiking, threshold)
    per_neuron_decay = bool(leaky) and _is_per_neuron_decay(decay, decay_is_tau)
    x = x.contiguous()
    T = x.shape[0]
    spikes = torch.empty_like(x)
    v_last = torch.empty(x.shape[1:] if need_v_last else (0,), dtype=x.dtype, device=x.device)
    if N == 0:
        return spikes, v_last
    v_init = v_init.contiguous() if v_init is not None else None
    leaky = bool(leaky)
    block = _fwd_block(N)
    with _device_guard(x):
        torch.library.wrap_triton(_lif_fwd_kernel)[(triton.cdiv(N, block),)](
            x, v_init if v_init is not None else x, _decay_operand(decay, x), threshold, spikes,
            v_last if need_v_last else spikes,
            T, N, float(v_threshold), 0.0 if v_reset is None else float(v_reset), float(alpha), 1.0 / (alpha * alpha),
            leaky, bool(decay_is_tau), v_reset is not None, bool(decay_input), v_init is not None,
            bool(need_v_last), SURROGATE=0 if spiking else int(surrogate), SPIKING=bool(spiking),
            PER_NEURON_DECAY=per_neuron_decay, PER_NEURON_THRESHOLD=threshold is not None, STEPS=_fwd_steps(T),
            BLOCK=block, num_warps=_NUM_WARPS, num_stages=1, maxnreg=_MAX_REGISTERS, enable_fp_fusion=False,
        )
    return spikes, v_last


def lif_backward(
    grad_spikes: torch.Tensor, grad_v_last: Optional[torch.Tensor], x: torch.Tensor, v_init: Optional[torch.Tensor],
    decay: torch.Tensor, leaky: bool, decay_is_tau: bool, v_threshold: float, v_reset: Optional[float],
    decay_input: bool, surrogate: int, alpha: float, spiking: bool, detach_reset: bool, need_decay_grad: bool,
    need_grad_v_init: bool, threshold: Optional[torch.Tensor] = None, need_threshold_grad: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Surrogate-gradient backward -> (grad_x [T, N], grad_v_init [N] or [0], grad_decay [N] or [0],
    grad_threshold [N] or [0]).

    grad_v_last None is zero (never read). grad_decay and grad_threshold are the per-neuron partial sums
    (fp32) of dL/dk when need_decay_grad (multiply mode only) and of dL/dv_th when need_threshold_grad
    (threshold given); the caller reduces them. Else empty.
    """
    N = _check(x, v_init, decay, surrogate, spiking, threshold)
    if need_threshold_grad and threshold is None:
        raise ValueError("need_threshold_grad requires a threshold tensor")
    leaky = bool(leaky)
    per_neuron_decay = leaky and _is_per_neuron_decay(decay, decay_is_tau)
    need_decay_grad = bool(need_decay_grad) and leaky
    if need_decay_grad and decay_is_tau:
        raise ValueError("need_decay_grad requires decay_is_tau=False (the gradient is taken with respect to k)")
    if grad_spikes.shape != x.shape:
        raise ValueError(f"grad_spikes must have x's shape {tuple(x.shape)}, got {tuple(grad_spikes.shape)}")
    x = x.contiguous()
    grad_spikes = grad_spikes.to(x.dtype).contiguous()  # autograd may hand over expanded (stride-0) gradients
    T = x.shape[0]
    grad_x = torch.empty_like(x)
    grad_v_init = torch.empty(x.shape[1:] if need_grad_v_init else (0,), dtype=x.dtype, device=x.device)
    grad_decay = torch.empty(x.shape[1:] if need_decay_grad else (0,), dtype=torch.float32, device=x.device)
    grad_threshold = torch.empty(x.shape[1:] if need_threshold_grad else (0,), dtype=torch.float32, device=x.device)
    if N == 0:
        return grad_x, grad_v_init, grad_decay, grad_threshold
    if grad_v_last is not None:
        grad_v_last = grad_v_last.to(x.dtype).contiguous()
    v_init = v_init.contiguous() if v_init is not None else None
    checkpoints = torch.empty((max(triton.cdiv(T, _BWD_STEPS) - 2, 1), N if T > 2 * _BWD_STEPS else 1),
                              dtype=torch.float32, device=x.device)
    block = _bwd_block(x.dtype, N, need_decay_grad or bool(need_threshold_grad))
    with _device_guard(x):
        torch.library.wrap_triton(_lif_bwd_kernel)[(triton.cdiv(N, block),)](
            grad_spikes, grad_v_last if grad_v_last is not None else grad_spikes, x,
            v_init if v_init is not None else x, _decay_operand(decay, x), threshold, grad_x,
            grad_v_init if need_grad_v_init else grad_x, grad_decay if need_decay_grad else None,
            grad_threshold if need_threshold_grad else None, checkpoints,
            T, N, float(v_threshold), 0.0 if v_reset is None else float(v_reset), float(alpha), 1.0 / (alpha * alpha),
            leaky, bool(decay_is_tau), v_reset is not None, bool(decay_input), bool(detach_reset),
            grad_v_last is not None, v_init is not None, bool(need_grad_v_init),
            SURROGATE=int(surrogate), SPIKING=bool(spiking), NEED_DECAY_GRAD=need_decay_grad,
            PER_NEURON_DECAY=per_neuron_decay, PER_NEURON_THRESHOLD=threshold is not None,
            NEED_THRESHOLD_GRAD=bool(need_threshold_grad), STEPS=_BWD_STEPS, BLOCK=block, num_warps=_NUM_WARPS,
            num_stages=1, maxnreg=_MAX_REGISTERS, enable_fp_fusion=False,
        )
    return grad_x, grad_v_init, grad_decay, grad_threshold
