"""STARS loss (RCA + TAR, paper Eqs. 12-17; docs/design.md section 2.2) and feature pooling.

The fused backends ("cpu": torch.ops.stars_fast.stars_loss_fused; "triton":
stars_fast.kernels.stars.stars_loss_fused, same signature) compute the loss and the gradients for
both inputs in one call, normalization statistics and quantile thresholds included; the backward is
one fused scale of the stored gradients by grad_output (the loss is the last node of the graph).

Policies shared by every backend:
- Arguments are checked once, here (_check_stars_args), before any backend runs; the C++ and
  Triton launchers repeat the checks as a second line.
- Second derivatives: under create_graph=True the fused backends' backward takes the gradient
  through stars_fast.reference instead of the stored one, so double backward (Hessian-vector
  products, gradient penalties) is exact, at the reference's speed; plain backward stays fused.
- Autocast: the loss is computed in the features' own dtypes (fp32 accumulation) whatever autocast
  says, as the reference, none of whose ops autocast casts; the fused op runs with autocast off.
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _backend, reference
from .lif import is_finite_number

DEFAULT_QUANTILES = (0.6, 0.7, 0.8, 0.9, 0.95)
NORMALIZE_CHOICES = (None, False, True, "teacher")  # True and "teacher": teacher-centric; None and False: none


def _fused_impl(backend: str):
    if backend == "triton":
        from ..kernels import stars as triton_stars

        return triton_stars.stars_loss_fused
    return torch.ops.stars_fast.stars_loss_fused


@torch.library.custom_op("stars_fast::stars_loss", mutates_args=())
def _stars_loss_triton(z_teacher: List[Tensor], z_student: List[Tensor], quantiles: List[float],
                   thresholds: Optional[List[float]], delta: float, coef_rca: List[float], coef_tar: List[float],
                   normalize: bool, eps: float, backend: str
                   ) -> Tuple[Tensor, Tensor, List[Tensor], List[Tensor]]:
    """The Triton kernels as an op that torch.compile keeps whole: (total, parts [L, 2] = raw (l_rca,
    l_tar) per layer, d total/d z_teacher, d total/d z_student)."""
    return _run_fused(z_teacher, z_student, quantiles, thresholds, delta, coef_rca, coef_tar, normalize, eps,
                      backend)


def _run_fused(z_teacher, z_student, quantiles, thresholds, delta, coef_rca, coef_tar, normalize, eps, backend):
    with torch.autocast(z_teacher[0].device.type, enabled=False):
        total, parts, grad_t, grad_s = _fused_impl(backend)(
            z_teacher, z_student, quantiles, thresholds, normalize, coef_rca, coef_tar, delta, eps)
    return total, parts, list(grad_t), list(grad_s)


def _fake_fused(z_teacher, z_student, *options):
    any_fp64 = any(z.dtype == torch.float64 for z in list(z_teacher) + list(z_student))
    acc = torch.float64 if any_fp64 else torch.float32  # the kernels accumulate fp64 inputs in fp64
    total = z_teacher[0].new_empty((), dtype=acc)
    parts = z_teacher[0].new_empty((len(z_teacher), 2), dtype=acc)
    return total, parts, [torch.empty_like(z) for z in z_teacher], [torch.empty_like(z) for z in z_student]


_stars_loss_triton.register_fake(_fake_fused)
if _backend.extension_built():  # the C++ op's fake kernel, for torch.compile and FakeTensor
    torch.library.register_fake("stars_fast::stars_loss_fused")(_fake_fused)


def _stars_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled grads for parts and the gradient outputs
    ctx.num_layers = len(inputs[0])
    ctx.options = inputs[2:]  # quantiles, thresholds, delta, coef_rca, coef_tar, normalize, eps, backend
    ctx.save_for_backward(*output[2], *output[3], *inputs[0], *inputs[1])


def _reference_total(z_teacher, z_student, quantiles, thresholds, delta, coef_rca, coef_tar, normalize, eps):
    """total = sum_l coef_rca[l] l_rca + coef_tar[l] l_tar through stars_fast.reference (differentiable)."""
    total = 0.0
    for zt, zs, c_rca, c_tar in zip(z_teacher, z_student, coef_rca, coef_tar):
        _, rca, tar = reference.stars_loss([zt], [zs], quantiles=quantiles, thresholds=thresholds, delta=delta,
                                           normalize="teacher" if normalize else None, eps=eps)
        total = total + c_rca * rca + c_tar * tar
    return total


def _stars_backward(ctx, grad_total, grad_parts, grad_teacher_unused, grad_student_unused):
    """d L/d z = grad_total * (stored d total/d z): one fused multiply of all the stored gradients.

    Under create_graph=True the gradient is instead taken through the reference, so that it is itself
    differentiable (true second derivatives, at the reference's speed)."""
    n = ctx.num_layers
    if grad_total is None:  # only the detached parts were used: no gradient flows
        return [None] * n, [None] * n, None, None, None, None, None, None, None, None
    saved = ctx.saved_tensors
    if torch.is_grad_enabled():
        features = saved[2 * n:]
        wanted = [z for z in features if z.requires_grad]
        with torch.enable_grad():
            total = _reference_total(features[:n], features[n:], *ctx.options[:-1])
        grads = iter(torch.autograd.grad(total, wanted, grad_total, create_graph=True, allow_unused=True))
        scaled = [next(grads) if z.requires_grad else None for z in features]
    else:
        scaled = torch._foreach_mul(list(saved[:2 * n]), grad_total)
    return list(scaled[:n]), list(scaled[n:2 * n]), None, None, None, None, None, None, None, None


_stars_loss_triton.register_autograd(_stars_backward, setup_context=_stars_setup_context)


class _ExtStarsLoss(torch.autograd.Function):
    """The C++/CUDA op (torch.ops.stars_fast.stars_loss_fused) under autograd, through the same
    _stars_setup_context / _stars_backward as the Triton op. A plain autograd.Function over the
    features as separate arguments, not a custom_op over lists (whose pytree handling cost 0.7 ms
    more per forward + backward at B=16, measured): apply(options, n, *z_teacher, *z_student), options
    as _stars_loss_triton's arguments after the features. Returns (total, parts)."""

    @staticmethod
    def forward(ctx, options, num_layers, *features):
        inputs = (list(features[:num_layers]), list(features[num_layers:]), *options)
        output = _run_fused(*inputs)
        _stars_setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])
        return output[0], output[1]

    @staticmethod
    def backward(ctx, grad_total, grad_parts):
        if (grad_total is not None and grad_total.device.type == "cpu" and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and grad_total.item() == 1.0):
            # The loss backpropagated as is (or summed with others; on the CPU reading it costs no
            # device sync): the stored gradients themselves. They are not outputs of this Function, so
            # a retained graph keeps its own reference to them and autograd copies instead of taking
            # them over (unlike the custom op's saved outputs, which always take the multiply).
            return (None, None, *ctx.saved_tensors[:2 * ctx.num_layers])
        grad_t, grad_s, *_ = _stars_backward(ctx, grad_total, grad_parts, None, None)
        return (None, None, *grad_t, *grad_s)


def _finite(name: str, value) -> float:
    value = value if isinstance(value, torch.SymFloat) else float(value)
    if not is_finite_number(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def _check_stars_args(z_teacher, z_student, quantiles, thresholds, delta, weights, lambda_rca, lambda_tar,
                      normalize, eps):
    """Every argument check of stars_loss, for every backend (the fused launchers repeat them)."""
    if isinstance(z_teacher, Tensor) or isinstance(z_student, Tensor):
        raise TypeError("z_teacher and z_student must be lists of tensors, one [B, C_l] entry per layer")
    if len(z_teacher) != len(z_student):
        raise ValueError(f"z_teacher has {len(z_teacher)} layers but z_student has {len(z_student)}")
    if len(z_teacher) == 0:
        raise ValueError("stars_loss needs at least one layer")
    for layer, (zt, zs) in enumerate(zip(z_teacher, z_student)):
        for side, z in (("z_teacher", zt), ("z_student", zs)):
            if not isinstance(z, Tensor) or z.dim() != 2:
                raise ValueError(f"{side}[{layer}] must be a 2-D [B, C] tensor (pool_features first), "
                                 f"got {getattr(z, 'shape', type(z).__name__)}")
            if not z.is_floating_point():
                raise TypeError(f"{side}[{layer}] must be floating point, got {z.dtype}")
            if z.shape[1] == 0:
                raise ValueError(f"{side}[{layer}] has no channels")
        if zt.shape[0] != zs.shape[0]:
            raise ValueError(f"layer {layer}: teacher batch {zt.shape[0]} != student batch {zs.shape[0]}")
        if zt.shape[0] < 2:
            raise ValueError(f"layer {layer}: RCA needs a batch of at least 2 samples, got {zt.shape[0]}")
        if zt.shape[0] != z_teacher[0].shape[0]:
            raise ValueError(f"every layer must have the same batch size B: layer 0 has {z_teacher[0].shape[0]}, "
                             f"layer {layer} has {zt.shape[0]}")
        if zt.device != z_teacher[0].device or zs.device != z_teacher[0].device:
            raise ValueError(f"layer {layer}: features on {zt.device} (teacher) and {zs.device} (student); "
                             f"every feature must be on {z_teacher[0].device}")
    if thresholds is None:
        if len(quantiles) == 0 or not all(0.0 <= q <= 1.0 for q in quantiles):
            raise ValueError(f"quantiles must be a non-empty list of values in [0, 1], got {quantiles}")
    elif len(thresholds) == 0 or not all(is_finite_number(t) for t in thresholds):
        raise ValueError(f"thresholds must be a non-empty list of finite values, got {thresholds}")
    if not (is_finite_number(delta) and delta > 0):
        raise ValueError(f"delta must be a finite number > 0, got {delta}")
    if not (is_finite_number(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    _finite("lambda_rca", lambda_rca)
    _finite("lambda_tar", lambda_tar)
    if weights is not None:
        if len(weights) != len(z_teacher):
            raise ValueError(f"{len(weights)} weights for {len(z_teacher)} layers")
        if not all(is_finite_number(w) and w >= 0 for w in weights) or not sum(weights) > 0:
            raise ValueError(f"weights must be finite, non-negative and of positive sum, got {weights}")
    if normalize not in NORMALIZE_CHOICES:
        raise ValueError(f"normalize must be None, False, True or 'teacher', got {normalize!r}")


def stars_loss(
    z_teacher: Sequence[Tensor],
    z_student: Sequence[Tensor],
    *,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    thresholds: Optional[Sequence[float]] = None,
    delta: float = 0.5,
    weights: Optional[Sequence[float]] = None,
    lambda_rca: float = 1.0,
    lambda_tar: float = 1.0,
    normalize: Optional[str] = None,
    return_parts: bool = False,
    backend: str = "auto",
    eps: float = 0.0,
):
    """L = lambda_rca * L_RCA + lambda_tar * L_TAR over the selected layers (Eqs. 14-17; docs/design.md 2.2).

    z_teacher[l]: pooled teacher pre-ReLU features [B, C_l]; z_student[l]: pooled student pre-LIF
    features [B, C'_l] (pool_features; one B >= 2 for every layer). Gradients flow to both. The loss is
    fp32 (fp64 if a feature is fp64), as the reference's for half features.

    quantiles:  TAR's thresholds theta_m = torch.quantile(z_teacher[l], q_m) per layer ('linear'),
                constants of the loss (Eq. 16); ignored when `thresholds` is given.
    thresholds: fixed TAR thresholds instead (in standardized units under `normalize`).
    delta:      the soft exceedance's temperature, sigmoid((z - theta) / delta) (Eq. 16).
    weights:    the layer weights w_l (Eqs. 15, 17), normalized by their sum; None: equal.
    lambda_rca, lambda_tar: the two terms' weights in L (Eq. 18's lambdas).
    normalize:  True or "teacher": both sides standardized, (z - mean(zT)) / s, with constants from the
                teacher, s = max(std_pop(zT), 1e-3 rms(zT), eps), before thresholding (a constant teacher
                layer at c gets s = 1e-3 |c|; an all-zero one s = 1); None or False: raw features.
    eps:        an absolute floor of s (>= 0; default none). RCA needs none either: rows at most 1e-3 x
                their side's largest norm are silent and leave its pairs (docs/design.md 2.2).
    backend:    "auto", "cpu", "triton", "cuda" or "reference" (stars_fast.available_backends).
    return_parts: also (L_RCA, L_TAR), weighted by w_l / sum(w) but not by the lambdas, detached on
                every backend (diagnostics: backpropagate through the total).
    Second derivatives (create_graph=True) are exact on every backend (the fused ones take them
    through the reference).
    """
    _check_stars_args(z_teacher, z_student, quantiles, thresholds, delta, weights, lambda_rca, lambda_tar,
                      normalize, eps)
    normalize = "teacher" if normalize in (True, "teacher") else None
    quantiles = [float(q) for q in quantiles]
    thresholds = None if thresholds is None else [float(t) for t in thresholds]
    dtype = functools.reduce(torch.promote_types, [z.dtype for z in list(z_teacher) + list(z_student)])
    chosen = _backend.reference_under_transforms(_backend.resolve(backend, z_teacher[0].device, dtype=dtype))
    if chosen == "reference":
        total, rca, tar = reference.stars_loss(
            z_teacher, z_student, quantiles=quantiles, thresholds=thresholds, delta=delta, weights=weights,
            lambda_rca=lambda_rca, lambda_tar=lambda_tar, normalize=normalize, eps=eps)
        return (total, rca.detach(), tar.detach()) if return_parts else total
    weights = [1.0] * len(z_teacher) if weights is None else [float(w) for w in weights]
    w_sum = sum(weights)
    coef_rca = [lambda_rca * w / w_sum for w in weights]
    coef_tar = [lambda_tar * w / w_sum for w in weights]
    options = (quantiles, thresholds, float(delta), coef_rca, coef_tar, normalize == "teacher", float(eps), chosen)
    if chosen == "triton":
        total, parts, _, _ = _stars_loss_triton(list(z_teacher), list(z_student), *options)
    else:
        total, parts = _ExtStarsLoss.apply(options, len(z_teacher), *z_teacher, *z_student)
    if not return_parts:
        return total
    layer_weights = parts.new_tensor(weights) / w_sum
    rca, tar = (parts.detach() * layer_weights[:, None]).sum(dim=0)
    return total, rca, tar


class StarsLoss(torch.nn.Module):
    """nn.Module form of stars_loss: StarsLoss(...)(z_teacher, z_student); the arguments are stars_loss's,
    checked here at construction."""

    def __init__(self, *, quantiles: Sequence[float] = DEFAULT_QUANTILES, thresholds: Optional[Sequence[float]] = None,
                 delta: float = 0.5, weights: Optional[Sequence[float]] = None, lambda_rca: float = 1.0,
                 lambda_tar: float = 1.0, normalize=None, return_parts: bool = False, backend: str = "auto",
                 eps: float = 0.0):
        super().__init__()
        self.options = dict(quantiles=quantiles, thresholds=thresholds, delta=delta, weights=weights,
                            lambda_rca=lambda_rca, lambda_tar=lambda_tar, normalize=normalize,
                            return_parts=return_parts, backend=backend, eps=eps)
        probe = [torch.zeros(2, 1)] * (1 if weights is None else len(weights))
        _check_stars_args(probe, probe, quantiles, thresholds, delta, weights, lambda_rca, lambda_tar, normalize, eps)
        if backend not in ("auto",) + _backend.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {('auto',) + _backend.BACKENDS}")

    def forward(self, z_teacher, z_student):
        return stars_loss(z_teacher, z_student, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


def _fold_time_space(f: Tensor) -> Tensor:
    """[B, C, H, W] -> [1, B*C, H*W]; [T, B, C, H, W] -> [T, B*C, H*W] (the pool_mean layout)."""
    if f.dim() == 4:
        return f.reshape(1, f.shape[0] * f.shape[1], -1)
    return f.reshape(f.shape[0], f.shape[1] * f.shape[2], -1)


@torch.library.custom_op("stars_fast::pool_features", mutates_args=())
def _pool_op(f: Tensor, backend: str) -> Tensor:
    x = _fold_time_space(f).contiguous()
    if backend == "triton":
        from ..kernels import stars as triton_stars

        pooled = triton_stars.pool_mean(x)
    else:
        pooled = torch.ops.stars_fast.pool_mean(x)
    batch_channels = f.shape[-4:-2]
    return pooled.to(f.dtype).reshape(batch_channels)


@_pool_op.register_fake
def _(f, backend):
    return f.new_empty(f.shape[-4:-2])


def _pool_setup_context(ctx, inputs, output):
    ctx.shape = inputs[0].shape


def _pool_backward(ctx, grad):
    """d mean/d f = grad / (T*H*W), broadcast: a zero-copy expanded view, nothing materialized."""
    shape = ctx.shape
    count = math.prod(shape) // (shape[-4] * shape[-3])
    return (grad / count)[..., None, None].expand(shape), None


_pool_op.register_autograd(_pool_backward, setup_context=_pool_setup_context)


def pool_features(f: Tensor, backend: str = "auto") -> Tensor:
    """Eq. 12: teacher [B, C, H, W] -> mean over H, W; student [T, B, C, H, W] -> mean over T, H, W."""
    if not isinstance(f, Tensor) or f.dim() not in (4, 5):
        raise ValueError("pool_features expects [B, C, H, W] (teacher) or [T, B, C, H, W] (student), got "
                         f"{getattr(f, 'shape', type(f).__name__)}")
    if not f.is_floating_point():
        raise TypeError(f"pool_features needs a floating-point tensor, got {f.dtype}")
    chosen = _backend.reference_under_transforms(_backend.resolve(backend, f.device, dtype=f.dtype))
    if chosen == "reference" or f.numel() == 0:
        return reference.pool_features(f)
    return _pool_op(f, chosen)
