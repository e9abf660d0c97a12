"""Triton kernels of the STARS loss and of its feature pooling (docs/design.md section 2.2).

Per layer l, teacher features zt [B, C] and student features zs [B, C'] (pooled, raw):

    normalize  shift = mean(zt), scale = 1 / s, s = max(std_pop(zt), tau_std rms(zt), eps) (1 where s = 0;
               tau_std = _NORMALIZE_STD_TOL), zn = (z - shift) scale (else zn = z)
    theta_m    fixed thresholds, or torch.quantile(zn_t.flatten(), q_m) ('linear'), by selection
    RCA  row i is silent on a side when ||z_i|| <= tau max_j ||z_j|| (tau = _RCA_SILENT_TOL; no row is
         silent where that max is NaN or inf); A = the rows silent on neither side, n_A = |A|
         u = z / ||z|| row-wise on A (u = 0 elsewhere),  G = u u^T,  D = G_S - G_T over A x A
         l_rca = sum_{i != j in A} D_ij^2 / (n_A (n_A - 1))   (0 when n_A < 2)
    TAR  p^m = mean_{b,c} sigmoid((zn - theta_m) / delta),  l_tar = mean_m (p_S^m - p_T^m)^2
    total = sum_l coef_rca[l] l_rca + coef_tar[l] l_tar

and the gradients of total for both inputs, computed in the same pass (the loss is the last node
of the graph, so a backward only scales them by grad_output). With E = 2 D (1 - I) / (n_A (n_A - 1))
over A x A (0 in every row or column of a silent row, and everywhere when n_A < 2):

    RCA  g_i = dl/du_i = 2 sum_j E_ij u_j (student; minus for the teacher),
         dz_i = (g_i - u_i (u_i . g_i)) / ||z_i|| for i in A, 0 for a silent row (its TAR part only),
         with u_i . g_i = 2 sum_j E_ij G_ij, so no second pass over the channels is needed
    TAR  dz_bc = +-(2 / M) sum_m (p_S^m - p_T^m) sigma'_m(bc) * scale / (delta B C)

Overflow and underflow safety: every row is scaled by a power of two 2^-e (2^e <= max_c |z_c| <
2^(e+1)) before the Gram and its norm are formed, which is exact, so rows at 1e30 keep a finite loss
and rows at 1e-20 (whose squares are subnormal) keep their exact norm, hence the scale-invariant
silent-row rule; the teacher's moments are taken the same way on the whole layer.

Exact quantiles without a sort: the fp32 values map to uint32 keys of the same order (negatives
bit-flipped, the sign bit set on the rest); the k-th smallest key is found by radix selection,
RADIX_BITS bits per pass from the top (a tl.histogram of the digit among the keys that share the
prefix found so far), and the next larger key by one min pass. (v_lo - shift) scale is then the
k-th smallest zn exactly (the affine map is monotone), and torch.quantile's lerp follows. NaN in
the teacher makes every theta NaN, as torch.quantile does.

Launch plan (all on the device: no .item(), no host sync, no host-to-device copy; quantiles or
fixed thresholds travel as a tuple of fp32 kernel scalars). Each launch takes up to _SLOTS layers
as separate arguments and program_id(0) picks one (no concatenation copies); more layers run as
further launch pairs, each adding its layers to the total.

  1. _stars_stats_kernel, grid (layers, M): program (l, m) computes layer l's shift and scale
     (every program of the layer the same way, so they agree bit for bit), theta_m by selection,
     and p_T^m, p_S^m, and the row norms of both sides for every M-th tile of rows (the M programs
     of a layer share that work). It writes them to small buffers; program (0, 0) zeroes the
     completion counter of launch 2.
  2. _stars_grad_kernel, grid (layers, row blocks of BI rows): first, from launch 1's row norms,
     both sides' silent thresholds, the rows of A and n_A (the rule needs every row of the layer;
     O(B) per program, and every program of the layer gets the same answer), then the Gram rows of
     both sides for its rows i against all rows j, in [BI, BJ] chunks (fp32 tl.dot,
     input_precision="ieee": no TF32), with the pairs outside A masked, E and u_i . g_i for those
     rows (E goes to a scratch buffer private to the program), its share of l_rca, then
     dz = coef_rca dz_rca + coef_tar dz_tar for its rows of both inputs. The last program to finish
     (an atomic counter) adds the per-block partials in a fixed order into parts [L, 2] and total,
     so the result does not depend on which program is last.
  3. the backward: one torch._foreach_mul of the stored gradients by grad_output (ops/stars.py).
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

_SLOTS = 4  # layers per launch pair
_BI = 16  # rows i per program of the gradient launch (the M of tl.dot, at least 16)
_BJ = 16  # rows j per chunk of the Gram
_BK = 16  # channels per tile
_BLOCK = 1024  # elements per step of the statistics passes
_RADIX_BITS = 4  # bits resolved per selection pass (16-bin histograms, 8 passes)
_STATS_WARPS = 8  # 8 elements of each [BLOCK] tensor per thread: about 40 registers, no spills
_GRAD_WARPS = 8  # with the tiles above: about 128 registers per thread on sm_80 / sm_90, no spills
_CONSTS = 2  # shift, scale, then theta[M] per layer in the constants buffer
_THETA = tl.constexpr(_CONSTS)  # offset of theta[0] in a layer's constants, as the kernels read it
_RCA_SILENT_TOL = 1e-3  # tau of the silent-row rule; must equal stars_fast.reference.RCA_SILENT_TOL
_NORMALIZE_STD_TOL = 1e-3  # normalize's std floor relative to rms(zt); must equal reference.NORMALIZE_STD_TOL
_NORM_ROWS = 8  # rows x channels of a tile of launch 1's row norms: one value per thread, so launch 1
_NORM_COLS = 32  # keeps its registers ([16, 64] tiles took twice as many)


@triton.jit
def _pick(slot, a0, a1, a2, a3):
    """The argument of layer `slot` among the _SLOTS per-layer arguments."""
    return tl.where(slot == 0, a0, tl.where(slot == 1, a1, tl.where(slot == 2, a2, a3)))


@triton.jit
def _pick_value(values, m):
    """values[m] for a tuple of scalars and a runtime index m."""
    out = values[0]
    for s in tl.static_range(1, len(values)):
        out = tl.where(m == s, values[s], out)
    return out


@triton.jit
def _pow2_scales(amax):
    """(2^-e, 2^e) with 2^e <= amax < 2^(e+1) (e clamped so that both stay normal floats): z 2^-e is exact."""
    biased = ((amax.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32)
    biased = tl.minimum(tl.maximum(biased, 1), 253)
    return ((254 - biased) << 23).to(tl.float32, bitcast=True), (biased << 23).to(tl.float32, bitcast=True)


@triton.jit
def _ordered_key(x):
    """uint32 key with the order of the fp32 x: negatives bit-flipped, sign bit set on the rest."""
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) == 1, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def _key_value(key):
    """The fp32 value of an _ordered_key."""
    return tl.where((key >> 31) == 1, key ^ 0x80000000, key ^ 0xFFFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _teacher_moments(Z, n, eps, STD_TOL: tl.constexpr, BLOCK: tl.constexpr):
    """(mean, 1 / s) of Z[0:n], s = max(std_pop, STD_TOL rms, eps) and 1 / s = 1 where s = 0, summed on
    z 2^-e (exact scaling, no overflow)."""
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], tl.float32)
    for s in range(0, n, BLOCK):
        idx = s + offs.to(tl.int64)
        x = tl.load(Z + idx, mask=idx < n, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
    p, inv_p = _pow2_scales(tl.max(amax, axis=0))
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(0, n, BLOCK):
        idx = s + offs.to(tl.int64)
        acc += tl.load(Z + idx, mask=idx < n, other=0.0).to(tl.float32) * p
    mean_p = tl.sum(acc, axis=0) / n
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(0, n, BLOCK):
        idx = s + offs.to(tl.int64)
        d = tl.load(Z + idx, mask=idx < n, other=0.0).to(tl.float32) * p - mean_p
        acc += tl.where(idx < n, d * d, 0.0)
    std_p = tl.sqrt(tl.sum(acc, axis=0) / n)
    rms_p = tl.sqrt(mean_p * mean_p + std_p * std_p)  # scaled values are at most 1: no overflow
    s = tl.maximum(tl.maximum(std_p, STD_TOL * rms_p, propagate_nan=tl.PropagateNan.ALL) * inv_p, eps,
                   propagate_nan=tl.PropagateNan.ALL)
    return mean_p * inv_p, 1.0 / tl.where(s == 0.0, 1.0, s)


@triton.jit
def _select_key(Z, n, k, BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr):
    """Radix selection: (key of the k-th smallest of Z[0:n], its rank among the equal keys, their count)."""
    NBINS: tl.constexpr = 1 << RADIX_BITS
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, NBINS)
    prefix = tl.full([], 0, tl.uint32)
    rank = k
    equal = k * 0
    for p in range(0, 32 // RADIX_BITS):
        shift = 32 - (p + 1) * RADIX_BITS
        hist = tl.zeros([NBINS], tl.int32)
        for s in range(0, n, BLOCK):
            idx = s + offs.to(tl.int64)
            key = _ordered_key(tl.load(Z + idx, mask=idx < n, other=0.0).to(tl.float32))
            # keys that share the digits found so far (all of them in the first pass)
            match = (idx < n) & ((p == 0) | ((key >> (shift + RADIX_BITS)) == prefix))
            hist += tl.histogram(((key >> shift) & (NBINS - 1)).to(tl.int32), NBINS, mask=match)
        digit = tl.sum((tl.cumsum(hist, axis=0) <= rank).to(tl.int32), axis=0)  # first bin holding rank
        rank -= tl.sum(tl.where(bins < digit, hist, 0), axis=0)
        equal = tl.sum(tl.where(bins == digit, hist, 0), axis=0)
        prefix = (prefix << RADIX_BITS) | digit.to(tl.uint32)
    return prefix, rank, equal


@triton.jit
def _quantile(Z, n, q, shift, scale, BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr):
    """torch.quantile(((Z[0:n] - shift) * scale), q) ('linear'): as torch, the rank q (n - 1) in fp64, the
    weight rank - floor(rank) in fp32, and lerp of the two neighbouring order statistics."""
    rank = q.to(tl.float64) * (n - 1).to(tl.float64)
    lo = rank.to(tl.int32)
    w = (rank - lo.to(tl.float64)).to(tl.float32)
    key_lo, rank_in_equal, equal = _select_key(Z, n, lo, BLOCK, RADIX_BITS)
    offs = tl.arange(0, BLOCK)
    succ = tl.full([BLOCK], 0xFFFFFFFF, tl.uint32)
    nan = tl.zeros([BLOCK], tl.int32)
    for s in range(0, n, BLOCK):
        idx = s + offs.to(tl.int64)
        x = tl.load(Z + idx, mask=idx < n, other=0.0).to(tl.float32)
        key = _ordered_key(x)
        succ = tl.minimum(succ, tl.where((idx < n) & (key > key_lo), key, 0xFFFFFFFF))
        nan += (x != x).to(tl.int32)
    # the element of rank lo + 1: another copy of v_lo, or the next larger key (unused when w == 0)
    key_hi = tl.where(rank_in_equal + 1 < equal, key_lo, tl.min(succ, axis=0))
    below = (_key_value(key_lo) - shift) * scale
    above = (_key_value(key_hi) - shift) * scale
    above = tl.where(w == 0.0, below, above)
    theta = tl.where(w < 0.5, below + w * (above - below), above - (above - below) * (1.0 - w))
    return tl.where(tl.sum(nan, axis=0) > 0, float("nan"), theta)


@triton.jit
def _exceedance(Z, n, theta, shift, scale, delta, BLOCK: tl.constexpr):
    """p = mean_{Z[0:n]} sigmoid(((z - shift) * scale - theta) / delta)."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(0, n, BLOCK):
        idx = s + offs.to(tl.int64)
        zn = (tl.load(Z + idx, mask=idx < n, other=0.0).to(tl.float32) - shift) * scale
        acc += tl.where(idx < n, 1.0 / (1.0 + tl.exp((theta - zn) / delta)), 0.0)
    return tl.sum(acc, axis=0) / n


@triton.jit
def _row_norms(Z, C, B, rows, BK: tl.constexpr):
    """Per row r: p = 2^-e (z p exact, |z p| < 2), ||z p|| and 2^e, so ||z|| = ||z p|| 2^e exactly up to
    the rounding of ||z p||: neither huge rows (squares of 1e20 overflow) nor tiny ones (squares of
    1e-20 are subnormal) lose their norm. Rows past B (and zero rows) give ||z p|| = 0."""
    base = rows[:, None].to(tl.int64) * C
    amax = tl.zeros([rows.shape[0], BK], tl.float32)
    for k0 in range(0, C, BK):
        cols = k0 + tl.arange(0, BK)
        x = tl.load(Z + base + cols[None, :], mask=(rows[:, None] < B) & (cols[None, :] < C), other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)), propagate_nan=tl.PropagateNan.ALL)
    p, inv_p = _pow2_scales(tl.max(amax, axis=1))
    sq = tl.zeros([rows.shape[0], BK], tl.float32)
    for k0 in range(0, C, BK):
        cols = k0 + tl.arange(0, BK)
        x = tl.load(Z + base + cols[None, :], mask=(rows[:, None] < B) & (cols[None, :] < C), other=0.0)
        s = x.to(tl.float32) * p[:, None]
        sq += s * s
    return p, tl.sqrt(tl.sum(sq, axis=1)), inv_p


@triton.jit
def _store_row_norms(Z, C, B, NORMS, first, step, ROWS: tl.constexpr, COLS: tl.constexpr):
    """NORMS[r] = ||z_r|| for the rows r of Z [B, C] in the row tiles first, first + step, ... (the
    tiles of one program of the layer)."""
    for r0 in range(first * ROWS, B, step * ROWS):
        rows = r0 + tl.arange(0, ROWS)
        _, norm_p, inv_p = _row_norms(Z, C, B, rows, COLS)
        tl.store(NORMS + rows, norm_p * inv_p, mask=rows < B)


@triton.jit(do_not_specialize=["B"])  # B only bounds rows here: one compile whether or not 16 divides it
def _stars_stats_kernel(
    zt0, zt1, zt2, zt3, zs0, zs1, zs2, zs3, nt0, nt1, nt2, nt3, ns0, ns1, ns2, ns3,
    VALUES, CONSTS, TAR, NORMS, COUNTER, B, delta, eps,
    NORMALIZE: tl.constexpr, FIXED: tl.constexpr, CSTRIDE: tl.constexpr, BLOCK: tl.constexpr,
    RADIX_BITS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, STD_TOL: tl.constexpr,
):
    """Program (layer, m): shift, scale, theta_m and p_S^m, p_T^m of one layer, and the row norms of
    both sides for every M-th tile of ROWS rows (the M programs of the layer share that work).

    VALUES: fixed thresholds (FIXED) or quantiles, one per m. CONSTS[layer] = shift, scale,
    theta[0:M]; TAR[layer, m] = p_S^m, p_T^m; NORMS[layer] = ||z_t||, ||z_s|| [2, B].
    """
    slot = tl.program_id(0)
    m = tl.program_id(1)
    zt = _pick(slot, zt0, zt1, zt2, zt3)
    zs = _pick(slot, zs0, zs1, zs2, zs3)
    n_t = _pick(slot, nt0, nt1, nt2, nt3)
    n_s = _pick(slot, ns0, ns1, ns2, ns3)
    shift = 0.0
    scale = 1.0
    if NORMALIZE:
        shift, scale = _teacher_moments(zt, n_t, eps, STD_TOL, BLOCK)
    value = _pick_value(VALUES, m)
    if FIXED:
        theta = value
    else:
        theta = _quantile(zt, n_t, value, shift, scale, BLOCK, RADIX_BITS)
    p_s = _exceedance(zs, n_s, theta, shift, scale, delta, BLOCK)
    p_t = _exceedance(zt, n_t, theta, shift, scale, delta, BLOCK)
    consts = CONSTS + slot * CSTRIDE
    tl.store(consts + _THETA + m, theta)
    tar = TAR + (slot * tl.num_programs(1) + m) * 2
    tl.store(tar, p_s)
    tl.store(tar + 1, p_t)
    norms = NORMS + slot.to(tl.int64) * 2 * B
    _store_row_norms(zt, n_t // B, B, norms, m, tl.num_programs(1), ROWS, COLS)
    _store_row_norms(zs, n_s // B, B, norms + B, m, tl.num_programs(1), ROWS, COLS)
    if m == 0:
        tl.store(consts, shift)
        tl.store(consts + 1, scale)
        if slot == 0:
            tl.store(COUNTER, 0)


@triton.jit
def _row_scales(Z, C, B, rows, active, BK: tl.constexpr):
    """Per row r: p = 2^-e (z p exact, |z p| < 2), 1 / ||z|| and a = 1 / ||z p|| (so u = z p a).

    Rows outside A (active False: silent, or past B) have a = 1 / ||z|| = 0, so u = 0 there; the
    1 / 0 of a zero row is not even formed (it would reach the Gram as 0 * inf).
    """
    p, norm_p, _ = _row_norms(Z, C, B, rows, BK)
    a = tl.where(active, 1.0 / tl.where(active, norm_p, 1.0), 0.0)
    return p, a * p, a


@triton.jit
def _gram_chunk(Z, C, B, i, j, p_i, p_j, BK: tl.constexpr):
    """(z_i p_i) . (z_j p_j) for rows i x j (fp32 tl.dot, no TF32)."""
    base_i = i[:, None].to(tl.int64) * C
    base_j = j[:, None].to(tl.int64) * C
    gram = tl.zeros([i.shape[0], j.shape[0]], tl.float32)
    for k0 in range(0, C, BK):
        cols = k0 + tl.arange(0, BK)
        zi = tl.load(Z + base_i + cols[None, :], mask=(i[:, None] < B) & (cols[None, :] < C), other=0.0)
        zj = tl.load(Z + base_j + cols[None, :], mask=(j[:, None] < B) & (cols[None, :] < C), other=0.0)
        gram += tl.dot(zi.to(tl.float32) * p_i[:, None], tl.trans(zj.to(tl.float32) * p_j[:, None]),
                       input_precision="ieee")
    return gram


@triton.jit
def _is_active(NORMS, B, rows, thr_t, thr_s):
    """Whether each of `rows` is in A: silent on neither side. A row is silent on a side when ||z_i|| <=
    that side's threshold; the test is written ~(norm <= threshold) so that a NaN norm (never <=
    anything) counts as active, as in the reference."""
    norm_t = tl.load(NORMS + rows, mask=rows < B, other=0.0)
    norm_s = tl.load(NORMS + B + rows, mask=rows < B, other=0.0)
    return (rows < B) & ~(norm_t <= thr_t) & ~(norm_s <= thr_s)


@triton.jit
def _silent_threshold(top, nan, TAU: tl.constexpr):
    """TAU max_i ||z_i||, at or below which a row is silent, from the lane maxima `top` (nan: how many
    lanes saw a NaN norm); -1 (no row is silent) where the max is NaN or inf, so that NaN and inf
    features reach the loss."""
    threshold = TAU * tl.max(top, axis=0)
    return tl.where((nan > 0) | (threshold == float("inf")), -1.0, threshold)


@triton.jit
def _silent_rows(NORMS, B, TAU: tl.constexpr, R: tl.constexpr):
    """(threshold of the teacher, of the student, n_A) of one layer from its row norms NORMS [2, B].

    Every program of the layer computes them from the same stored norms, so they all agree: the max
    and the count do not depend on the order of the rows."""
    top_t = tl.zeros([R], tl.float32)
    top_s = tl.zeros([R], tl.float32)
    for r0 in range(0, B, R):
        rows = r0 + tl.arange(0, R)
        top_t = tl.maximum(top_t, tl.load(NORMS + rows, mask=rows < B, other=0.0), propagate_nan=tl.PropagateNan.ALL)
        top_s = tl.maximum(top_s, tl.load(NORMS + B + rows, mask=rows < B, other=0.0),
                           propagate_nan=tl.PropagateNan.ALL)
    # tl.max drops NaN: the lanes that saw one are counted
    thr_t = _silent_threshold(top_t, tl.sum((top_t != top_t).to(tl.int32), axis=0), TAU)
    thr_s = _silent_threshold(top_s, tl.sum((top_s != top_s).to(tl.int32), axis=0), TAU)
    count = tl.zeros([R], tl.int32)
    for r0 in range(0, B, R):
        count += _is_active(NORMS, B, r0 + tl.arange(0, R), thr_t, thr_s).to(tl.int32)
    return thr_t, thr_s, tl.sum(count, axis=0)


@triton.jit
def _write_grad(Z, G, C, B, i, active_i, W, P, inv_norm_i, dot_i, coef_rca, tar_coef, CONSTS, TAR, n_m, shift,
                scale, delta, BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
    """G[i, :] = coef_rca (g - u_i (u_i . g)) / ||z_i|| + tar_coef sum_m diff_m sigma'_m, without the
    RCA part on rows outside A.

    g = sum_j W[i, j] (z_j P[j]) with W = 2 sign E a_j (a scratch row block of this program); P[j] = 0
    on the rows outside A, whose features are then not loaded, so that an inf in a silent row cannot
    reach g through 0 * inf.
    """
    base_i = i[:, None].to(tl.int64) * C
    for k0 in range(0, C, BK):
        cols = k0 + tl.arange(0, BK)
        g = tl.zeros([BI, BK], tl.float32)
        for j0 in range(0, B, BJ):
            j = j0 + tl.arange(0, BJ)
            w = tl.load(W + tl.arange(0, BI)[:, None] * B + j[None, :], mask=(i[:, None] < B) & (j[None, :] < B),
                        other=0.0)
            p_j = tl.load(P + j, mask=j < B, other=0.0)
            zj = tl.load(Z + j[:, None].to(tl.int64) * C + cols[None, :],
                         mask=(p_j[:, None] != 0.0) & (cols[None, :] < C), other=0.0).to(tl.float32)
            g += tl.dot(w, zj * p_j[:, None], input_precision="ieee")
        in_i = (i[:, None] < B) & (cols[None, :] < C)
        zi = tl.load(Z + base_i + cols[None, :], mask=in_i, other=0.0).to(tl.float32)
        # a silent row gets no RCA gradient: a where (not only inv_norm_i = 0), so that NaN / inf of
        # other rows, which reach its g as 0 * NaN, stay out
        d_rca = (g - zi * inv_norm_i[:, None] * dot_i[:, None]) * inv_norm_i[:, None]
        d_rca = tl.where(active_i[:, None], d_rca, 0.0)
        zn = (zi - shift) * scale
        d_tar = tl.zeros([BI, BK], tl.float32)
        for mm in range(n_m):
            diff = tl.load(TAR + 2 * mm) - tl.load(TAR + 2 * mm + 1)
            theta = tl.load(CONSTS + _THETA + mm)
            sig = 1.0 / (1.0 + tl.exp((theta - zn) / delta))  # sigmoid((zn - theta_m) / delta)
            d_tar += diff * (sig * (1.0 - sig))
        grad = coef_rca * d_rca + tar_coef * d_tar
        tl.store(G + base_i + cols[None, :], grad.to(G.dtype.element_ty), mask=in_i)


@triton.jit
def _stars_grad_kernel(
    zt0, zt1, zt2, zt3, zs0, zs1, zs2, zs3, gt0, gt1, gt2, gt3, gs0, gs1, gs2, gs3,
    ct0, ct1, ct2, ct3, cs0, cs1, cs2, cs3, cr0, cr1, cr2, cr3, ctar0, ctar1, ctar2, ctar3,
    CONSTS, TAR, NORMS, W, P, RCA_PART, COUNTER, PARTS, TOTAL, first_layer, num_layers, B, n_m, delta,
    ACCUMULATE: tl.constexpr, CSTRIDE: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr,
    MP: tl.constexpr, NBP: tl.constexpr, TAU: tl.constexpr,
):
    """Rows i of one layer: l_rca partial and both gradients; the last program also writes parts and total.

    This launch covers layers first_layer .. first_layer + num_layers - 1 of PARTS [L, 2]. With
    ACCUMULATE, TOTAL already holds the loss of the layers of earlier launches, and this launch adds
    its layers to it. From the row norms NORMS [slots, 2, B] of launch 1, each program finds the
    rows of A and n_A (the silent-row rule needs every row of the layer); pairs with a row outside A
    are left out. W [slots, row blocks, 2, BI, B] and P [slots, row blocks, 2, B] are scratch rows
    private to each program.
    """
    slot = tl.program_id(0)
    blk = tl.program_id(1)
    nb = tl.num_programs(1)
    i = blk * BI + tl.arange(0, BI)
    zt = _pick(slot, zt0, zt1, zt2, zt3)
    zs = _pick(slot, zs0, zs1, zs2, zs3)
    c_t = _pick(slot, ct0, ct1, ct2, ct3)
    c_s = _pick(slot, cs0, cs1, cs2, cs3)
    consts = CONSTS + slot * CSTRIDE
    tar = TAR + slot * n_m * 2
    norms = NORMS + slot.to(tl.int64) * 2 * B

    thr_t, thr_s, n_a = _silent_rows(norms, B, TAU, BI * BJ)
    active_i = _is_active(norms, B, i, thr_t, thr_s)
    p_is, inv_norm_is, a_is = _row_scales(zs, c_s, B, i, active_i, BK)
    p_it, inv_norm_it, a_it = _row_scales(zt, c_t, B, i, active_i, BK)
    prog = (slot * nb + blk).to(tl.int64)
    w_s = W + prog * 2 * BI * B
    w_t = w_s + BI * B
    p_s = P + prog * 2 * B
    p_t = p_s + B
    # fewer than two rows of A leave no pair: l_rca = 0 with zero RCA gradients
    n_a = n_a.to(tl.float32)
    c = tl.where(n_a >= 2.0, 1.0 / tl.maximum(n_a * (n_a - 1.0), 2.0), 0.0)
    dot_s = tl.zeros([BI], tl.float32)
    dot_t = tl.zeros([BI], tl.float32)
    rca = tl.zeros([BI], tl.float32)
    for j0 in range(0, B, BJ):
        j = j0 + tl.arange(0, BJ)
        active_j = _is_active(norms, B, j, thr_t, thr_s)
        p_js, _, a_js = _row_scales(zs, c_s, B, j, active_j, BK)
        p_jt, _, a_jt = _row_scales(zt, c_t, B, j, active_j, BK)
        cos_s = _gram_chunk(zs, c_s, B, i, j, p_is, p_js, BK) * a_is[:, None] * a_js[None, :]
        cos_t = _gram_chunk(zt, c_t, B, i, j, p_it, p_jt, BK) * a_it[:, None] * a_jt[None, :]
        # the pairs of A: a silent row's Gram entries (0 * inf when one of its features is inf) stay out
        pair = active_i[:, None] & active_j[None, :] & (i[:, None] != j[None, :])
        d = tl.where(pair, cos_s - cos_t, 0.0)
        e = 2.0 * c * d
        rca += tl.sum(d * d, axis=1)
        dot_s += tl.sum(tl.where(pair, e * cos_s, 0.0), axis=1)
        dot_t += tl.sum(tl.where(pair, e * cos_t, 0.0), axis=1)
        rows = tl.arange(0, BI)[:, None] * B + j[None, :]
        tl.store(w_s + rows, 2.0 * e * a_js[None, :], mask=j[None, :] < B)
        tl.store(w_t + rows, -2.0 * e * a_jt[None, :], mask=j[None, :] < B)
        # P = 0 marks the rows outside A for _write_grad, which then skips their features
        tl.store(p_s + j, tl.where(active_j, p_js, 0.0), mask=j < B)
        tl.store(p_t + j, tl.where(active_j, p_jt, 0.0), mask=j < B)
    tl.debug_barrier()  # the scratch rows are read back by other threads of this program

    tar_scale = _pick(slot, ctar0, ctar1, ctar2, ctar3) * 2.0 * tl.load(consts + 1) / (n_m * delta * B)
    coef_rca = _pick(slot, cr0, cr1, cr2, cr3)
    shift = tl.load(consts)
    scale = tl.load(consts + 1)
    _write_grad(zs, _pick(slot, gs0, gs1, gs2, gs3), c_s, B, i, active_i, w_s, p_s, inv_norm_is, 2.0 * dot_s,
                coef_rca, tar_scale / c_s, consts, tar, n_m, shift, scale, delta, BI, BJ, BK)
    _write_grad(zt, _pick(slot, gt0, gt1, gt2, gt3), c_t, B, i, active_i, w_t, p_t, inv_norm_it, -2.0 * dot_t,
                coef_rca, -tar_scale / c_t, consts, tar, n_m, shift, scale, delta, BI, BJ, BK)

    tl.store(RCA_PART + slot * nb + blk, c * tl.sum(rca, axis=0))
    tl.debug_barrier()
    finished = tl.atomic_add(COUNTER, 1, sem="acq_rel")
    if finished == num_layers * nb - 1:  # the last program: every partial is written
        total = tl.load(TOTAL) if ACCUMULATE else 0.0
        blks = tl.arange(0, NBP)
        m = tl.arange(0, MP)
        for s in tl.static_range(4):  # the _SLOTS layers of this launch
            if s < num_layers:
                rca_s = tl.sum(tl.load(RCA_PART + s * nb + blks, mask=blks < nb, other=0.0, cache_modifier=".cg"))
                tar_s = TAR + s * n_m * 2 + 2 * m
                diff = tl.load(tar_s, mask=m < n_m, other=0.0) - tl.load(tar_s + 1, mask=m < n_m, other=0.0)
                tar_loss = tl.sum(diff * diff, axis=0) / n_m
                tl.store(PARTS + 2 * (first_layer + s), rca_s)
                tl.store(PARTS + 2 * (first_layer + s) + 1, tar_loss)
                total += _pick(s, cr0, cr1, cr2, cr3) * rca_s + _pick(s, ctar0, ctar1, ctar2, ctar3) * tar_loss
        tl.store(TOTAL, total)


@triton.jit
def _pool_mean_kernel(X, OUT, T, R, S, count, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """OUT[r] = sum_{t, s} X[t, r, s] / count (count = T S), accumulated in fp32."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = r[:, None] * S
    plane = tl.cast(R, tl.int64) * S
    acc = tl.zeros([BLOCK_R, BLOCK_S], tl.float32)
    for t in range(T):
        for s0 in range(0, S, BLOCK_S):
            cols = s0 + tl.arange(0, BLOCK_S)
            mask = (r[:, None] < R) & (cols[None, :] < S)
            acc += tl.load(X + t * plane + rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + r, (tl.sum(acc, axis=1) / count).to(OUT.dtype.element_ty), mask=r < R)


def _device_guard(x: torch.Tensor):
    """Launch on x's device, whatever device is current."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def pool_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of x[T, R, S] over T and S -> [R] in x's dtype, accumulated in fp32 (Eq. 12 pooling)."""
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"pool_mean expects a floating [T, R, S] tensor, got {x.dtype} of shape {tuple(x.shape)}")
    T, R, S = x.shape
    if T == 0 or S == 0:
        raise ValueError(f"pool_mean cannot average over an empty T or S, got shape {tuple(x.shape)}")
    x = x.contiguous()
    out = torch.empty(R, dtype=x.dtype, device=x.device)
    if R == 0:
        return out
    block_s = min(triton.next_power_of_2(max(S, 1)), 256)
    # 16 elements per thread when the rows are 16-byte aligned (S % 16 == 0, or S == 1: vector loads), 8 when
    # the loads are scalar, each element with its own address registers: either fits 128 registers, so 16
    # warps per SM keep this memory-bound kernel's loads in flight. Only the rows per program change with
    # it: the sum over t and s of each row, and its layout, do not.
    block_r = max(1, (2048 if S % 16 == 0 or S == 1 else 1024) // block_s)
    with _device_guard(x):
        torch.library.wrap_triton(_pool_mean_kernel)[(triton.cdiv(R, block_r),)](
            x, out, T, R, S, float(T * S), BLOCK_R=block_r, BLOCK_S=block_s, num_warps=4)
    return out


def _check_layers(z_teacher, z_student, values, per_layer_floats) -> int:
    """Validates the layer lists and the quantiles / thresholds; returns the common batch size B."""
    n = len(z_teacher)
    if n == 0:
        raise ValueError("stars_loss_fused needs at least one layer")
    if len(z_student) != n or any(len(f) != n for f in per_layer_floats):
        raise ValueError("z_teacher, z_student, coef_rca and coef_tar must all have one entry per layer, got lengths "
                         f"{[len(z_teacher), len(z_student)] + [len(f) for f in per_layer_floats]}")
    for side, zs in (("z_teacher", z_teacher), ("z_student", z_student)):
        if any(z.dim() != 2 or z.shape[1] == 0 for z in zs):
            raise ValueError(f"{side} entries must be [B, C] with C >= 1, got {[tuple(z.shape) for z in zs]}")
        if len({z.dtype for z in zs}) != 1 or zs[0].dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{side} entries must share one dtype among float32/float16/bfloat16, got "
                             f"{[z.dtype for z in zs]}")
    if len({z.device for z in list(z_teacher) + list(z_student)}) != 1:
        raise ValueError("all features must be on one device")
    batch = {z.shape[0] for z in list(z_teacher) + list(z_student)}
    if len(batch) != 1:
        raise ValueError(f"all features must have the same batch size B, got {sorted(batch)}")
    b = batch.pop()
    if b < 2:
        raise ValueError(f"RCA needs a batch of at least 2 samples, got B = {b}")
    if len(values) == 0:
        raise ValueError("every layer needs at least one TAR threshold (quantiles or thresholds)")
    return b


def _slots(values: Sequence, first: int, pad=None) -> list:
    """values[first : first + _SLOTS], padded to _SLOTS entries with values[first] or pad()."""
    chunk = list(values[first:first + _SLOTS])
    return chunk + [pad() if pad else chunk[0] for _ in range(_SLOTS - len(chunk))]


def _launch_stats(z_args, zt, zs, first, layers, values, fixed, normalize, delta, eps, consts, tar, norms, counter):
    """Launch 1 for layers first .. first + layers - 1: consts[slot] = shift, scale, theta[M];
    tar[slot, m] = p_S, p_T; norms[slot] (fp32 [_SLOTS, 2, B]) = ||z_t||, ||z_s|| of each row."""
    torch.library.wrap_triton(_stars_stats_kernel)[(layers, len(values))](
        *z_args, *_slots([z.numel() for z in zt], first), *_slots([z.numel() for z in zs], first),
        tuple(values), consts, tar, norms, counter, norms.shape[2], float(delta), float(eps),
        NORMALIZE=bool(normalize), FIXED=bool(fixed), CSTRIDE=consts.shape[1], BLOCK=_BLOCK,
        RADIX_BITS=_RADIX_BITS, ROWS=_NORM_ROWS, COLS=_NORM_COLS, STD_TOL=_NORMALIZE_STD_TOL,
        num_warps=_STATS_WARPS)


def stars_loss_fused(
    z_teacher: Sequence[torch.Tensor], z_student: Sequence[torch.Tensor], quantiles: Sequence[float],
    thresholds: Optional[Sequence[float]], normalize: bool, coef_rca: Sequence[float], coef_tar: Sequence[float],
    delta: float, eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """Fused STARS loss over L layers -> (total 0-dim fp32, parts [L, 2] fp32 of raw (l_rca, l_tar),
    grad of total for each z_teacher[l], for each z_student[l]), grads in the inputs' dtypes.

    theta: `thresholds` (shared by all layers, in normalized coordinates) if given, else the
    quantiles of each layer's (normalized) teacher; coef_rca[l] / coef_tar[l] = lambda * w_l / sum(w).
    """
    values = [float(v) for v in (quantiles if thresholds is None else thresholds)]
    b = _check_layers(z_teacher, z_student, values, (coef_rca, coef_tar))
    if not (delta > 0 and eps >= 0):
        raise ValueError(f"delta must be > 0 and eps >= 0, got delta={delta}, eps={eps}")
    zt = [z.contiguous() for z in z_teacher]
    zs = [z.contiguous() for z in z_student]
    device = zt[0].device
    n_layers, n_m = len(zt), len(values)
    grad_t = [torch.empty_like(z) for z in zt]
    grad_s = [torch.empty_like(z) for z in zs]
    total = torch.empty((), dtype=torch.float32, device=device)
    parts = torch.empty(n_layers, 2, dtype=torch.float32, device=device)

    nb = triton.cdiv(b, _BI)
    cstride = _CONSTS + n_m
    f32 = dict(dtype=torch.float32, device=device)
    consts = torch.empty(_SLOTS, cstride, **f32)
    tar = torch.empty(_SLOTS, n_m, 2, **f32)
    norms = torch.empty(_SLOTS, 2, b, **f32)
    scratch_w = torch.empty(_SLOTS, nb, 2, _BI, b, **f32)
    scratch_p = torch.empty(_SLOTS, nb, 2, b, **f32)
    rca_part = torch.empty(_SLOTS, nb, **f32)
    counter = torch.empty(1, dtype=torch.int32, device=device)
    with _device_guard(zt[0]):
        for first in range(0, n_layers, _SLOTS):
            layers = min(_SLOTS, n_layers - first)
            z_args = _slots(zt, first) + _slots(zs, first)
            _launch_stats(z_args, zt, zs, first, layers, values, thresholds is not None, normalize, delta, eps,
                          consts, tar, norms, counter)
            # Outputs are padded with distinct dummies, never with a real output: a kernel argument
            # passed twice and stored to would confuse torch.compile's functionalization of the launch.
            grads = _slots(grad_t, first, pad=lambda: zt[0].new_empty(1))
            grads += _slots(grad_s, first, pad=lambda: zs[0].new_empty(1))
            channels = _slots([z.shape[1] for z in zt], first) + _slots([z.shape[1] for z in zs], first)
            coefs = _slots([float(v) for v in coef_rca], first) + _slots([float(v) for v in coef_tar], first)
            torch.library.wrap_triton(_stars_grad_kernel)[(layers, nb)](
                *z_args, *grads, *channels, *coefs, consts, tar, norms, scratch_w, scratch_p, rca_part, counter,
                parts, total, first, layers, b, n_m, float(delta),
                ACCUMULATE=first > 0, CSTRIDE=cstride, BI=_BI, BJ=_BJ, BK=_BK, MP=triton.next_power_of_2(n_m),
                NBP=triton.next_power_of_2(nb), TAU=_RCA_SILENT_TOL, num_warps=_GRAD_WARPS)
    return total, parts, grad_t, grad_s
