"""The CUDA LIF / IF neuron ops executed on the CPU: their host code (csrc/cuda/lif_ops.cuh) and kernels
(csrc/cuda/lif_kernels.cuh), unchanged, built by the host compiler over our CUDA emulation
(csrc/cuda/emulation/cuda_on_host.h), on CPU tensors, against stars_fast.reference.multistep_neuron
(plain PyTorch autograd). The extension is built once into ~/.cache/stars_fast/cuda_emulated/lif (cold:
about 30 s on 2 cores; rebuilt when a source or header changes).

Spikes (spiking=True) and v_last are bit-identical to the reference's, in every dtype: the state is fp32
(fp64 for fp64 data) on both sides, with the same IEEE operations in the same order. A surrogate's
primitive (spiking=False) and the gradients go through the math library (exp, atan, erfc), whose last
bit may differ from PyTorch's: those are compared within tolerances.

One host thread per CUDA thread is slow (a launch costs about 10 ms whatever N), so every launch counts:
the full grid of neuron options runs at T = 4, each configuration in the four dtypes, on the packed path
(N % 16 == 0, aligned) or the scalar one (odd N), with or without v_init and grad_v_last, in rotation;
misaligned views, T in {1, 5, 33}, gradient layouts and a grid-stride N run for a few configurations.
The emulated device has one multiprocessor: 32 blocks of 256 threads, so N above 8192 x VEC elements
takes the kernels' grid-stride loops."""
import itertools

import pytest
import torch

from stars_fast import reference
from stars_fast.ops.lif import SURROGATE_IDS

import cuda_emulation

pytestmark = pytest.mark.cuda_emulated

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALF = (torch.float16, torch.bfloat16)
# Neuron charge and decay: (leaky, decay_input, decay) with decay ("tau", value) dividing by tau, ("inv_tau",
# value) multiplying by k, ("plif", value) multiplying by a k that needs its gradient (ParametricLIFNode).
CHARGES = [(False, True, None)] + [(True, di, decay) for decay in (("tau", 2.5), ("inv_tau", 0.6), ("plif", 0.45))
                                   for di in (True, False)]
RESETS = [-0.3, None]  # hard reset to a nonzero v_reset; soft reset
FIRES = [(s, spiking) for s in SURROGATE_IDS for spiking in (True, False)
         if spiking or s not in reference.SURROGATES_WITHOUT_PRIMITIVE]
OPTION_GRID = [dict(leaky=leaky, decay_input=di, decay=decay, v_reset=vr, detach_reset=dr, surrogate=s,
                    spiking=spiking)
               for (leaky, di, decay), vr, dr, (s, spiking) in itertools.product(CHARGES, RESETS, [False, True], FIRES)]
# (v_init given, grad_v_last given)
INPUT_KINDS = list(itertools.product([True, False], [True, False]))


@pytest.fixture(scope="module")
def emulated():
    return cuda_emulation.build("lif_cuda_emulated", ["lif_emulated.cpp"], build_subdir="lif")


@pytest.fixture(autouse=True)
def _hang_guard(emulated):
    yield from cuda_emulation.hang_guard()


def _ids(opts):
    decay = "IF" if not opts["leaky"] else f"{opts['decay'][0]}" + ("-di" if opts["decay_input"] else "")
    reset = "soft" if opts["v_reset"] is None else "hard"
    return (f"{decay}-{reset}{'-detach' if opts['detach_reset'] else ''}-{opts['surrogate']}"
            f"{'' if opts['spiking'] else '-primitive'}")


def _state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _view_at_offset(t, offset):
    """t's values in a contiguous tensor starting `offset` elements into its storage (offset 1: a pointer
    that is not 16-byte aligned)."""
    if offset == 0:
        return t.clone()
    storage = torch.empty(t.numel() + offset, dtype=t.dtype)
    view = storage[offset:].view(t.shape)
    view.copy_(t)
    return view


def _case(T, N, dtype, v_init, grad_v_last, offset=0):
    x = _view_at_offset((torch.randn(T, N) * 1.5 + 0.4).to(dtype), offset)
    v0 = _view_at_offset((torch.randn(N) * 0.3).to(dtype), offset) if v_init else None
    grad_spikes = torch.randn(T, N).to(dtype)
    grad_v = torch.randn(N).to(dtype) if grad_v_last else None
    return x, v0, grad_spikes, grad_v


def _emulated(emulated, opts, x, v_init, grad_spikes, grad_v_last):
    """(spikes, v_last, grad_x, grad_v_init, grad k or None) from the emulated ops, called as
    stars_fast.ops.lif calls them."""
    leaky, (mode, value) = opts["leaky"], opts["decay"] or ("inv_tau", 1.0)
    decay = torch.tensor([value], dtype=_state_dtype(x.dtype))
    args = (x, v_init, decay, leaky, mode == "tau", 1.0, opts["v_reset"], opts["decay_input"],
            SURROGATE_IDS[opts["surrogate"]], reference.SURROGATE_DEFAULT_ALPHA[opts["surrogate"]], opts["spiking"])
    spikes, v_last = emulated.lif_forward(*args, True, None)
    need_decay_grad = leaky and mode == "plif"
    grad_x, grad_v_init, grad_decay, _ = emulated.lif_backward(
        grad_spikes, grad_v_last, *args, opts["detach_reset"], need_decay_grad, v_init is not None, None, False)
    return (spikes, v_last, grad_x, grad_v_init if v_init is not None else None,
            grad_decay.sum() if need_decay_grad else None)


def _reference(opts, x, v_init, grad_spikes, grad_v_last):
    """The same five values from reference.multistep_neuron and autograd."""
    xr = x.detach().clone().requires_grad_(True)
    v0 = None if v_init is None else v_init.detach().clone().requires_grad_(True)
    decay = {}
    if opts["leaky"]:
        mode, value = opts["decay"]
        if mode == "plif":
            decay = dict(inv_tau=torch.tensor(value, dtype=_state_dtype(x.dtype), requires_grad=True))
        else:
            decay = {mode: value}
    spikes, v_last = reference.multistep_neuron(
        xr, leaky=opts["leaky"], v_threshold=1.0, v_reset=opts["v_reset"], decay_input=opts["decay_input"],
        detach_reset=opts["detach_reset"], surrogate=opts["surrogate"], spiking=opts["spiking"], v_init=v0, **decay)
    outputs, grads = [spikes], [grad_spikes]
    if grad_v_last is not None:
        outputs.append(v_last)
        grads.append(grad_v_last)
    torch.autograd.backward(outputs, grads)
    k = decay.get("inv_tau")
    return (spikes.detach(), v_last.detach(), xr.grad, None if v0 is None else v0.grad,
            k.grad if isinstance(k, torch.Tensor) else None)


def _assert_close(got, want, dtype, what):
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, expected {want.dtype}"
    scale = want.double().abs().max().item() if want.numel() else 0.0
    if dtype in HALF:  # both sides round the same fp32 values (to within fp32 tolerance) to 16 bits
        eps = torch.finfo(dtype).eps
        tol = dict(rtol=2 * eps, atol=2 * eps * max(scale, 1.0))
    elif dtype == torch.float32:
        tol = dict(rtol=1e-5, atol=1e-5 * max(scale, 1.0))
    else:
        tol = dict(rtol=1e-11, atol=1e-11 * max(scale, 1.0))
    torch.testing.assert_close(got.double(), want.double(), **tol, msg=lambda m: f"{what}: {m}")


def _check(emulated, opts, x, v_init, grad_spikes, grad_v_last):
    got = _emulated(emulated, opts, x, v_init, grad_spikes, grad_v_last)
    want = _reference(opts, x, v_init, grad_spikes, grad_v_last)
    dtype = x.dtype
    where = f"{dtype} N={x.shape[1]} T={x.shape[0]} v_init={v_init is not None} grad_v_last={grad_v_last is not None}"
    spikes, v_last = got[:2]
    assert spikes.dtype == v_last.dtype == dtype
    if opts["spiking"]:
        assert torch.equal(spikes, want[0]), f"{where}: spikes differ from the reference's"
        assert torch.equal(v_last, want[1]), f"{where}: v_last differs from the reference's"
    else:
        _assert_close(spikes, want[0], dtype, f"{where}: primitive")
        _assert_close(v_last, want[1], dtype, f"{where}: v_last")
    for name, g, r in zip(("grad_x", "grad_v_init", "grad k"), got[2:], want[2:]):
        assert (g is None) == (r is None), f"{where}: {name} {'missing' if g is None else 'unexpected'}"
        if g is not None:
            _assert_close(g, r, dtype, f"{where}: {name}")


@pytest.mark.parametrize("index", range(len(OPTION_GRID)), ids=[_ids(o) for o in OPTION_GRID])
def test_option_grid(emulated, index):
    """Every option configuration at T = 4 in the four dtypes, two on the packed path (N = 16) and two on
    the scalar one (N = 13). The path and the inputs given rotate with the configuration: any eight
    neighbouring configurations run each dtype in all eight (path, v_init, grad_v_last) combinations."""
    opts = OPTION_GRID[index]
    for j, dtype in enumerate(DTYPES):
        N = (16, 13)[(index + j) % 2]
        v_init, grad_v_last = INPUT_KINDS[(index // 2 + j) % len(INPUT_KINDS)]
        _check(emulated, opts, *_case(4, N, dtype, v_init, grad_v_last))


# A few configurations for the shape and layout tests: both charges with a decay gradient, both resets.
FEW = [dict(leaky=True, decay_input=True, decay=("plif", 0.45), v_reset=-0.3, detach_reset=False,
            surrogate="sigmoid", spiking=True),
       dict(leaky=True, decay_input=False, decay=("tau", 2.5), v_reset=None, detach_reset=True, surrogate="erf",
            spiking=False),
       dict(leaky=False, decay_input=True, decay=None, v_reset=0.0, detach_reset=False, surrogate="triangle",
            spiking=True),
       dict(leaky=True, decay_input=False, decay=("plif", 0.7), v_reset=None, detach_reset=False,
            surrogate="soft_sign", spiking=False)]


@pytest.mark.parametrize("opts", FEW, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 5, 33])
def test_steps(emulated, opts, dtype, T):
    """T = 1, T = 5 (a chunk and a remainder: C = 4 for fp32 / fp64, 2 for 16-bit) and T = 33 (chunks
    recomputed from their checkpoints), packed and scalar."""
    for N, (v_init, grad_v_last) in zip((32, 7), INPUT_KINDS[:2] if T != 5 else INPUT_KINDS[2:]):
        _check(emulated, opts, *_case(T, N, dtype, v_init, grad_v_last))


@pytest.mark.parametrize("opts", FEW, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_views(emulated, opts, dtype):
    """x and v_init one element into their storage (N % 16 == 0, but not 16-byte aligned): the scalar path."""
    for T, v_init in ((4, True), (5, False)):
        _check(emulated, opts, *_case(T, 32, dtype, v_init, True, offset=1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradient_layouts(emulated, dtype):
    """Gradients read through their strides: grad_spikes a column block of a wider tensor (packed only
    when its row stride allows), broadcast (stride 0, as when only v_last is used) or transposed
    (copied); grad_v_last every other element."""
    T, N = 5, 32
    opts = FEW[0]
    x, v_init, _, _ = _case(T, N, dtype, True, False)
    wide = torch.randn(T, N + 16).to(dtype)
    layouts = {"row block": wide[:, 16:], "odd row stride": torch.randn(T, N + 1).to(dtype)[:, 1:],
               "broadcast": torch.ones((), dtype=dtype).expand(T, N),
               "transposed": torch.randn(N, T).to(dtype).t()}
    grad_v_last = torch.randn(2 * N).to(dtype)[::2]
    for name, grad_spikes in layouts.items():
        for g_v in (grad_v_last, None):
            try:
                _check(emulated, opts, x, v_init, grad_spikes, g_v)
            except AssertionError as e:
                raise AssertionError(f"grad_spikes {name}: {e}") from e


@pytest.mark.parametrize("opts", FEW[:2], ids=_ids)
@pytest.mark.parametrize("dtype, N", [(torch.float32, 16 * 2081), (torch.float64, 8195)], ids=["fp32", "fp64"])
def test_grid_stride(emulated, opts, dtype, N):
    """More threads' worth of work than the grid has (32 blocks of 256 threads on the emulated device):
    fp32 packed, 4 elements a thread, and fp64 scalar, at T = 33."""
    _check(emulated, opts, *_case(33, N, dtype, True, True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("decay_input,v_reset", [(True, -0.3), (False, None)])
def test_one_k_per_neuron(emulated, dtype, decay_input, v_reset):
    """PLIF per channel reaches the kernels as one k per neuron (decay [N], the state dtype): spikes and
    v_last bit for bit, grad_x, grad_v_init and the per-neuron dL/dk (not summed) against the reference
    with k [N] broadcast over the steps; packed (N = 32) and scalar (N = 13), T = 5 (chunks and a remainder)."""
    for N, (v_init, grad_v_last) in ((32, (True, True)), (13, (False, True))):
        x, v0, grad_spikes, grad_v = _case(5, N, dtype, v_init, grad_v_last)
        k = torch.rand(N, dtype=_state_dtype(dtype)) * 0.9 + 0.05
        args = (x, v0, k, True, False, 1.0, v_reset, decay_input, SURROGATE_IDS["atan"], 2.0, True)
        spikes, v_last = emulated.lif_forward(*args, True, None)
        grad_x, grad_v_init, grad_k, _ = emulated.lif_backward(grad_spikes, grad_v, *args, False, True, v_init, None,
                                                               False)
        xr = x.detach().clone().requires_grad_(True)
        v0r = None if v0 is None else v0.detach().clone().requires_grad_(True)
        kr = k.clone().requires_grad_(True)
        want_spikes, want_v = reference.multistep_neuron(xr, kr, v_reset=v_reset, decay_input=decay_input,
                                                         surrogate="atan", v_init=v0r)
        torch.autograd.backward([want_spikes, want_v], [grad_spikes, grad_v])
        where = f"{dtype} N={N}"
        assert torch.equal(spikes, want_spikes), f"{where}: spikes differ from the reference's"
        assert torch.equal(v_last, want_v), f"{where}: v_last differs from the reference's"
        _assert_close(grad_x, xr.grad, dtype, f"{where}: grad_x")
        _assert_close(grad_k, kr.grad, dtype, f"{where}: grad k")
        if v0 is not None:
            _assert_close(grad_v_init, v0r.grad, dtype, f"{where}: grad_v_init")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("charge,v_reset,detach_reset", [(("tau", 2.5), -0.3, False), (None, None, True),
                                                         (("plif", 0.45), None, False)])
def test_one_threshold_per_neuron(emulated, dtype, charge, v_reset, detach_reset):
    """A learnable threshold reaches the kernels as threshold [N] (the state dtype), alone (LIF dividing by
    tau, IF) or with one k per neuron (PLIF per channel): spikes and v_last bit for bit, grad_x and the
    per-neuron dL/dv_th (and dL/dk) against the reference with both broadcast over the steps; packed
    (N = 32) and scalar (N = 13), T = 5."""
    for N, (v_init, grad_v_last) in ((32, (True, True)), (13, (False, True))):
        x, v0, grad_spikes, grad_v = _case(5, N, dtype, v_init, grad_v_last)
        th = torch.rand(N, dtype=_state_dtype(dtype)) * 1.2 + 0.3
        plif = charge is not None and charge[0] == "plif"
        decay = (torch.rand(N, dtype=_state_dtype(dtype)) * 0.9 + 0.05 if plif
                 else torch.tensor([2.5 if charge else 1.0], dtype=_state_dtype(dtype)))
        args = (x, v0, decay, charge is not None, charge is not None and not plif, 0.0, v_reset, True,
                SURROGATE_IDS["sigmoid"], 4.0, True)
        spikes, v_last = emulated.lif_forward(*args, True, th)
        grad_x, _, grad_k, grad_th = emulated.lif_backward(grad_spikes, grad_v, *args, detach_reset, plif, False, th,
                                                           True)
        xr = x.detach().clone().requires_grad_(True)
        thr = th.clone().requires_grad_(True)
        kr = decay.clone().requires_grad_(True) if plif else None
        mode = {"inv_tau": kr} if plif else {"tau": 2.5} if charge else {}
        want_spikes, want_v = reference.multistep_neuron(xr, **mode, leaky=charge is not None, v_threshold=thr,
                                                         v_reset=v_reset, detach_reset=detach_reset, v_init=v0)
        torch.autograd.backward([want_spikes, want_v], [grad_spikes, grad_v])
        where = f"{dtype} N={N} {charge}"
        assert torch.equal(spikes, want_spikes), f"{where}: spikes differ from the reference's"
        assert torch.equal(v_last, want_v), f"{where}: v_last differs from the reference's"
        _assert_close(grad_x, xr.grad, dtype, f"{where}: grad_x")
        _assert_close(grad_th, thr.grad, dtype, f"{where}: grad v_th")
        if plif:
            _assert_close(grad_k, kr.grad, dtype, f"{where}: grad k")


def test_a_bad_threshold_operand_is_refused(emulated):
    """The CUDA ops check the threshold operand as the CPU ones do (op_args.h)."""
    x, decay = torch.randn(3, 20), torch.tensor([0.4])
    options = (True, False, 1.0, 0.0, True, 0, 4.0, True)
    with pytest.raises(RuntimeError, match=r"threshold must have shape \[N\] = \[20\]"):
        emulated.lif_forward(x, None, decay, *options, False, torch.ones(5))
    with pytest.raises(ValueError, match="need_threshold_grad requires a threshold tensor"):
        emulated.lif_backward(torch.ones_like(x), None, x, None, decay, *options, False, False, False, None, True)
