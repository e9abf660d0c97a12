"""Triton kernels of the STARS loss and of its feature pooling (shared/DESIGN.md section 2.2).

Per layer l, teacher features zt [B, C] and student features zs [B, C'] (pooled, raw):

    RCA  u = z / max(||z||, eps) row-wise,  G = u u^T,  D = G_S - G_T
         l_rca = sum_{i != j} D_ij^2 / (B (B - 1))
    TAR  zn = (z - shift) * scale,  p^m = mean_{b,c} sigmoid((zn - theta_m) / delta)
         l_tar = mean_m (p_S^m - p_T^m)^2
    total = sum_l coef_rca[l] l_rca + coef_tar[l] l_tar

and the gradients of total for both inputs, computed in the same pass (the loss is the last node
of the graph, so a backward only has to scale them by grad_output). With E = 2 D (1 - I) / (B (B - 1)):

    RCA  g_i = dl/du_i = 2 sum_j E_ij u_j (student; minus for the teacher),
         dz_i = (g_i - u_i (u_i . g_i)) / ||z_i||   (g_i / eps when ||z_i|| < eps),
         with u_i . g_i = 2 sum_j E_ij G_ij, so no second pass over the channels is needed
    TAR  dz_bc = +-(2 / M) sum_m (p_S^m - p_T^m) sigma'_m(bc) * scale / (delta B C)

Launches: two for up to _SLOTS layers, so forward + backward is 3 with the caller's scaling of the
gradients by grad_output. Each kernel takes _SLOTS layers as separate arguments and program_id(0)
picks one (the lists are not concatenated, which would cost a copy launch per list). More
layers run as further launch pairs, each adding its layers' loss to the total.

  1. _stars_stats_kernel, grid (layers, row blocks of BI rows): the Gram rows
     G[i, :] of both sides (an fp32 tl.dot over channel tiles), D and E for those rows, their
     share of l_rca, the row norms and u_i . g_i, and the rows' partial sums of the TAR
     exceedances. All of this goes to small fp32 scratch buffers.
  2. _stars_grad_kernel, same grid: adds up the exceedance partials into p^m (fixed order, so
     the result is deterministic), then writes dz = coef_rca dz_rca + coef_tar dz_tar for its
     rows of both inputs (g = E u for the rows is another tl.dot). Program (0, 0) also reduces
     the partials into parts [L, 2] and total.

Both run their dots with input_precision="ieee" (exact fp32, no TF32).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

_SLOTS = 4  # layers per launch pair
_BI = 16  # rows per program (the M of tl.dot, at least 16)


@triton.jit
def _pick(slot, a0, a1, a2, a3):
    """The argument of layer `slot` among the _SLOTS per-layer arguments."""
    return tl.where(slot == 0, a0, tl.where(slot == 1, a1, tl.where(slot == 2, a2, a3)))


@triton.jit
def _gram_rows(Z, C, B, i, j, TH, M, shift, scale, delta, BK: tl.constexpr, MP: tl.constexpr):
    """Raw Gram rows Z[i] Z[j]^T, squared norms of rows j and i, and the TAR partials of rows i.

    The TAR partial of threshold m is sum_{b in i, c} sigmoid(((z_bc - shift) * scale - theta_m) / delta).
    """
    m = tl.arange(0, MP)
    rows_i = i[:, None].to(tl.int64) * C
    rows_j = j[:, None].to(tl.int64) * C
    gram = tl.zeros([i.shape[0], j.shape[0]], tl.float32)
    sq_j = tl.zeros([j.shape[0]], tl.float32)
    sq_i = tl.zeros([i.shape[0]], tl.float32)
    tar = tl.zeros([MP], tl.float32)
    for k0 in range(0, C, BK):
        cols = k0 + tl.arange(0, BK)
        in_i = (i[:, None] < B) & (cols[None, :] < C)
        zi = tl.load(Z + rows_i + cols[None, :], mask=in_i, other=0.0).to(tl.float32)
        zj = tl.load(Z + rows_j + cols[None, :], mask=(j[:, None] < B) & (cols[None, :] < C), other=0.0).to(tl.float32)
        gram += tl.dot(zi, tl.trans(zj), input_precision="ieee")
        sq_j += tl.sum(zj * zj, axis=1)
        sq_i += tl.sum(zi * zi, axis=1)
        zn = (zi - shift) * scale
        for mm in range(M):
            sig = 1.0 / (1.0 + tl.exp((tl.load(TH + mm) - zn) / delta))  # sigmoid((zn - theta_m) / delta)
            tar = tl.where(m == mm, tar + tl.sum(tl.where(in_i, sig, 0.0)), tar)
    return gram, sq_j, sq_i, tar


@triton.jit
def _stars_stats_kernel(
    zt0, zt1, zt2, zt3, zs0, zs1, zs2, zs3, th0, th1, th2, th3,
    ct0, ct1, ct2, ct3, cs0, cs1, cs2, cs3, nm0, nm1, nm2, nm3,
    shift0, shift1, shift2, shift3, scale0, scale1, scale2, scale3,
    E, ROW_STATS, RCA_PART, TAR_PART, B, delta, eps,
    BI: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr, MP: tl.constexpr,
):
    """Pass 1 for rows i of one layer: E[i, :], norms, u_i . g_i, l_rca and TAR partial sums.

    ROW_STATS[layer] holds, per row: max(||z_S||, eps), max(||z_T||, eps), u_S.g_S and u_T.g_T
    (0 where ||z|| < eps, since the gradient then has no projection term).
    """
    slot = tl.program_id(0)
    blk = tl.program_id(1)
    i = blk * BI + tl.arange(0, BI)
    j = tl.arange(0, BP)
    shift = _pick(slot, shift0, shift1, shift2, shift3)
    scale = _pick(slot, scale0, scale1, scale2, scale3)
    th = _pick(slot, th0, th1, th2, th3)
    n_m = _pick(slot, nm0, nm1, nm2, nm3)
    gram_t, sqj_t, sqi_t, tar_t = _gram_rows(_pick(slot, zt0, zt1, zt2, zt3), _pick(slot, ct0, ct1, ct2, ct3), B,
                                             i, j, th, n_m, shift, scale, delta, BK, MP)
    gram_s, sqj_s, sqi_s, tar_s = _gram_rows(_pick(slot, zs0, zs1, zs2, zs3), _pick(slot, cs0, cs1, cs2, cs3), B,
                                             i, j, th, n_m, shift, scale, delta, BK, MP)
    norm_it = tl.sqrt(sqi_t)
    norm_is = tl.sqrt(sqi_s)
    m_it = tl.maximum(norm_it, eps, propagate_nan=tl.PropagateNan.ALL)
    m_is = tl.maximum(norm_is, eps, propagate_nan=tl.PropagateNan.ALL)
    m_jt = tl.maximum(tl.sqrt(sqj_t), eps, propagate_nan=tl.PropagateNan.ALL)
    m_js = tl.maximum(tl.sqrt(sqj_s), eps, propagate_nan=tl.PropagateNan.ALL)
    cos_t = gram_t / (m_it[:, None] * m_jt[None, :])
    cos_s = gram_s / (m_is[:, None] * m_js[None, :])
    off_diag = (i[:, None] < B) & (j[None, :] < B) & (i[:, None] != j[None, :])
    d = tl.where(off_diag, cos_s - cos_t, 0.0)
    c = 1.0 / (B * (B - 1.0))
    e = 2.0 * c * d
    dot_s = tl.where(norm_is >= eps, 2.0 * tl.sum(e * cos_s, axis=1), 0.0)
    dot_t = tl.where(norm_it >= eps, -2.0 * tl.sum(e * cos_t, axis=1), 0.0)

    layer = slot.to(tl.int64)
    tl.store(E + (layer * BP + i[:, None]) * BP + j[None, :], e, mask=(i[:, None] < B))
    stats = ROW_STATS + layer * 4 * BP + i
    tl.store(stats, m_is, mask=i < B)
    tl.store(stats + BP, m_it, mask=i < B)
    tl.store(stats + 2 * BP, dot_s, mask=i < B)
    tl.store(stats + 3 * BP, dot_t, mask=i < B)
    n_blk = tl.num_programs(1)
    tl.store(RCA_PART + slot * n_blk + blk, c * tl.sum(tl.sum(d * d, axis=1), axis=0))
    m = tl.arange(0, MP)
    tar_part = TAR_PART + ((slot * n_blk + blk) * 2) * MP + m
    tl.store(tar_part, tar_s)
    tl.store(tar_part + MP, tar_t)


@triton.jit
def _exceedance(TAR_PART, slot, side: tl.constexpr, count, NB, NBP: tl.constexpr, MP: tl.constexpr):
    """p^m of one side of one layer: its row-block partials added in a fixed order, over count = B C."""
    blk = tl.arange(0, NBP)
    m = tl.arange(0, MP)
    ptrs = TAR_PART + ((slot * NB + blk[:, None]) * 2 + side) * MP + m[None, :]
    return tl.sum(tl.load(ptrs, mask=blk[:, None] < NB, other=0.0), axis=0) / count


@triton.jit
def _write_grad(Z, G, C, B, i, j, e, m_j, m_i, dot_i, sign, coef_rca, tar_coef, diff, TH, M, shift, scale, delta,
                BK: tl.constexpr, MP: tl.constexpr):
    """G[i, :] = coef_rca dz_rca + dz_tar for rows i of one side (sign +1 student, -1 teacher).

    dz_rca = (g - u_i (u_i . g)) / m_i with g = sum_j (2 sign E_ij / m_j) z_j;
    dz_tar = tar_coef sum_m diff_m sigma'_m (tar_coef already holds coef_tar, the sign and the chain factor).
    """
    m = tl.arange(0, MP)
    w = e * (2.0 * sign / m_j)[None, :]
    rows_i = i[:, None].to(tl.int64) * C
    rows_j = j[:, None].to(tl.int64) * C
    for k0 in range(0, C, BK):
        cols = k0 + tl.arange(0, BK)
        in_i = (i[:, None] < B) & (cols[None, :] < C)
        zi = tl.load(Z + rows_i + cols[None, :], mask=in_i, other=0.0).to(tl.float32)
        zj = tl.load(Z + rows_j + cols[None, :], mask=(j[:, None] < B) & (cols[None, :] < C), other=0.0).to(tl.float32)
        g = tl.dot(w, zj, input_precision="ieee")
        d_rca = (g - zi / m_i[:, None] * dot_i[:, None]) / m_i[:, None]
        zn = (zi - shift) * scale
        d_tar = tl.zeros(zi.shape, tl.float32)
        for mm in range(M):
            sig = 1.0 / (1.0 + tl.exp((tl.load(TH + mm) - zn) / delta))  # sigmoid((zn - theta_m) / delta)
            d_tar += tl.sum(tl.where(m == mm, diff, 0.0)) * (sig * (1.0 - sig))
        grad = coef_rca * d_rca + tar_coef * d_tar
        tl.store(G + rows_i + cols[None, :], grad.to(G.dtype.element_ty), mask=in_i)


@triton.jit
def _stars_grad_kernel(
    zt0, zt1, zt2, zt3, zs0, zs1, zs2, zs3, th0, th1, th2, th3,
    gt0, gt1, gt2, gt3, gs0, gs1, gs2, gs3,
    ct0, ct1, ct2, ct3, cs0, cs1, cs2, cs3, nm0, nm1, nm2, nm3,
    shift0, shift1, shift2, shift3, scale0, scale1, scale2, scale3,
    cr0, cr1, cr2, cr3, ctar0, ctar1, ctar2, ctar3,
    E, ROW_STATS, RCA_PART, TAR_PART, PARTS, TOTAL, first_layer, num_layers, B, delta,
    ACCUMULATE: tl.constexpr, BI: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr, MP: tl.constexpr,
    NBP: tl.constexpr,
):
    """Pass 2 for rows i of one layer: both gradients; program (0, 0) also writes parts and total.

    This launch covers layers first_layer .. first_layer + num_layers - 1 of PARTS [L, 2]. With
    ACCUMULATE, TOTAL already holds the loss of the layers of earlier launches, and this launch adds
    its layers to it.
    """
    slot = tl.program_id(0)
    blk = tl.program_id(1)
    nb = tl.num_programs(1)
    i = blk * BI + tl.arange(0, BI)
    j = tl.arange(0, BP)
    m = tl.arange(0, MP)
    c_t = _pick(slot, ct0, ct1, ct2, ct3)
    c_s = _pick(slot, cs0, cs1, cs2, cs3)
    n_m = _pick(slot, nm0, nm1, nm2, nm3)
    shift = _pick(slot, shift0, shift1, shift2, shift3)
    scale = _pick(slot, scale0, scale1, scale2, scale3)
    coef_rca = _pick(slot, cr0, cr1, cr2, cr3)
    coef_tar = _pick(slot, ctar0, ctar1, ctar2, ctar3)
    th = _pick(slot, th0, th1, th2, th3)
    diff = _exceedance(TAR_PART, slot, 0, B * c_s, nb, NBP, MP) - _exceedance(TAR_PART, slot, 1, B * c_t, nb, NBP, MP)
    diff = tl.where(m < n_m, diff, 0.0)
    tar_coef = coef_tar * 2.0 * scale / (n_m * delta * B)

    layer = slot.to(tl.int64)
    e = tl.load(E + (layer * BP + i[:, None]) * BP + j[None, :], mask=i[:, None] < B, other=0.0)
    stats = ROW_STATS + layer * 4 * BP
    _write_grad(_pick(slot, zs0, zs1, zs2, zs3), _pick(slot, gs0, gs1, gs2, gs3), c_s, B, i, j, e,
                tl.load(stats + j, mask=j < B, other=1.0), tl.load(stats + i, mask=i < B, other=1.0),
                tl.load(stats + 2 * BP + i, mask=i < B, other=0.0), 1.0, coef_rca, tar_coef / c_s, diff, th, n_m,
                shift, scale, delta, BK, MP)
    _write_grad(_pick(slot, zt0, zt1, zt2, zt3), _pick(slot, gt0, gt1, gt2, gt3), c_t, B, i, j, e,
                tl.load(stats + BP + j, mask=j < B, other=1.0), tl.load(stats + BP + i, mask=i < B, other=1.0),
                tl.load(stats + 3 * BP + i, mask=i < B, other=0.0), -1.0, coef_rca, -tar_coef / c_t, diff, th, n_m,
                shift, scale, delta, BK, MP)

    if (slot == 0) & (blk == 0):
        total = tl.load(TOTAL) if ACCUMULATE else 0.0
        blks = tl.arange(0, NBP)
        for s in tl.static_range(4):  # the _SLOTS layers of this launch
            if s < num_layers:
                rca = tl.sum(tl.load(RCA_PART + s * nb + blks, mask=blks < nb, other=0.0), axis=0)
                n_m_s = _pick(s, nm0, nm1, nm2, nm3)
                d = _exceedance(TAR_PART, s, 0, B * _pick(s, cs0, cs1, cs2, cs3), nb, NBP, MP) \
                    - _exceedance(TAR_PART, s, 1, B * _pick(s, ct0, ct1, ct2, ct3), nb, NBP, MP)
                tar = tl.sum(tl.where(m < n_m_s, d * d, 0.0), axis=0) / n_m_s
                tl.store(PARTS + 2 * (first_layer + s), rca)
                tl.store(PARTS + 2 * (first_layer + s) + 1, tar)
                total += _pick(s, cr0, cr1, cr2, cr3) * rca + _pick(s, ctar0, ctar1, ctar2, ctar3) * tar
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
    block_r = max(1, 2048 // block_s)
    torch.library.wrap_triton(_pool_mean_kernel)[(triton.cdiv(R, block_r),)](
        x, out, T, R, S, float(T * S), BLOCK_R=block_r, BLOCK_S=block_s, num_warps=4)
    return out


def _check_layers(z_teacher, z_student, thresholds, per_layer_floats) -> int:
    """Validates the layer lists; returns the common batch size B."""
    n = len(z_teacher)
    if n == 0:
        raise ValueError("stars_loss_fused needs at least one layer")
    if len(z_student) != n or len(thresholds) != n or any(len(f) != n for f in per_layer_floats):
        raise ValueError("z_teacher, z_student, thresholds, shift, scale, coef_rca and coef_tar must all have "
                         f"one entry per layer, got lengths {[len(z_teacher), len(z_student), len(thresholds)]}"
                         f" and {[len(f) for f in per_layer_floats]}")
    for side, zs in (("z_teacher", z_teacher), ("z_student", z_student)):
        if any(z.dim() != 2 or z.shape[1] == 0 for z in zs):
            raise ValueError(f"{side} entries must be [B, C] with C >= 1, got {[tuple(z.shape) for z in zs]}")
        if len({z.dtype for z in zs}) != 1 or zs[0].dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{side} entries must share one dtype among float32/float16/bfloat16, got "
                             f"{[z.dtype for z in zs]}")
    batch = {z.shape[0] for z in list(z_teacher) + list(z_student)}
    if len(batch) != 1:
        raise ValueError(f"all features must have the same batch size B, got {sorted(batch)}")
    b = batch.pop()
    if b < 2:
        raise ValueError(f"RCA needs a batch of at least 2 samples, got B = {b}")
    if any(th.numel() == 0 for th in thresholds):
        raise ValueError("every layer needs at least one TAR threshold")
    return b


def _slots(values: Sequence, first: int, pad=None) -> list:
    """values[first : first + _SLOTS], padded to _SLOTS entries with values[first] or pad()."""
    chunk = list(values[first:first + _SLOTS])
    return chunk + [pad() if pad else chunk[0] for _ in range(_SLOTS - len(chunk))]


def stars_loss_fused(
    z_teacher: Sequence[torch.Tensor], z_student: Sequence[torch.Tensor], thresholds: Sequence[torch.Tensor],
    shift: Sequence[float], scale: Sequence[float], coef_rca: Sequence[float], coef_tar: Sequence[float],
    delta: float, eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """Fused STARS loss over L layers -> (total 0-dim fp32, parts [L, 2] fp32 of raw (l_rca, l_tar),
    grad of total for each z_teacher[l], for each z_student[l]), grads in the inputs' dtypes.

    thresholds[l] [M_l] are in normalized coordinates, where zn = (z - shift[l]) * scale[l];
    coef_rca[l] / coef_tar[l] = lambda * w_l / sum(w).
    """
    b = _check_layers(z_teacher, z_student, thresholds, (shift, scale, coef_rca, coef_tar))
    device = z_teacher[0].device
    zt = [z.contiguous() for z in z_teacher]
    zs = [z.contiguous() for z in z_student]
    th = [t.reshape(-1).to(device=device, dtype=torch.float32).contiguous() for t in thresholds]
    grad_t = [torch.empty_like(z) for z in zt]
    grad_s = [torch.empty_like(z) for z in zs]
    n_layers = len(zt)
    total = torch.empty((), dtype=torch.float32, device=device)
    parts = torch.empty(n_layers, 2, dtype=torch.float32, device=device)

    bp = max(16, triton.next_power_of_2(b))
    bk = max(16, min(64, 4096 // bp, triton.next_power_of_2(max(z.shape[1] for z in zt + zs))))
    mp = max(2, triton.next_power_of_2(max(t.numel() for t in th)))
    nb = triton.cdiv(b, _BI)
    num_warps = max(4, min(16, bp // 32))  # about 16 values of each [BI, BP] tensor per thread
    f32 = dict(dtype=torch.float32, device=device)
    e = torch.empty(_SLOTS, bp, bp, **f32)
    row_stats = torch.empty(_SLOTS, 4, bp, **f32)
    rca_part = torch.empty(_SLOTS, nb, **f32)
    tar_part = torch.empty(_SLOTS, nb, 2, mp, **f32)
    for first in range(0, n_layers, _SLOTS):
        layers = min(_SLOTS, n_layers - first)
        per_layer = dict(
            zt=_slots(zt, first), zs=_slots(zs, first), th=_slots(th, first),
            ct=_slots([z.shape[1] for z in zt], first), cs=_slots([z.shape[1] for z in zs], first),
            nm=_slots([t.numel() for t in th], first), shift=_slots([float(v) for v in shift], first),
            scale=_slots([float(v) for v in scale], first))
        stats_args = [a for key in ("zt", "zs", "th", "ct", "cs", "nm", "shift", "scale") for a in per_layer[key]]
        torch.library.wrap_triton(_stars_stats_kernel)[(layers, nb)](
            *stats_args, e, row_stats, rca_part, tar_part, b, float(delta), float(eps),
            BI=_BI, BP=bp, BK=bk, MP=mp, num_warps=num_warps)
        grad_args = [a for key in ("zt", "zs", "th") for a in per_layer[key]]
        # Outputs are padded with distinct dummies, never with a real output: a kernel argument
        # passed twice and stored to would confuse torch.compile's functionalization of the launch.
        grad_args += _slots(grad_t, first, pad=lambda: zt[0].new_empty(1))
        grad_args += _slots(grad_s, first, pad=lambda: zs[0].new_empty(1))
        grad_args += [a for key in ("ct", "cs", "nm", "shift", "scale") for a in per_layer[key]]
        grad_args += _slots([float(v) for v in coef_rca], first) + _slots([float(v) for v in coef_tar], first)
        torch.library.wrap_triton(_stars_grad_kernel)[(layers, nb)](
            *grad_args, e, row_stats, rca_part, tar_part, parts, total, first, layers, b, float(delta),
            ACCUMULATE=first > 0, BI=_BI, BP=bp, BK=bk, MP=mp, NBP=triton.next_power_of_2(nb), num_warps=num_warps)
    return total, parts, grad_t, grad_s
