"""Model zoo: shapes, taps, Fast-Datafree checkpoints, backends, frozen students, BN folding.

The large models' shapes at full size (32 and 64 px) are checked on the meta device (no arithmetic);
everything numeric runs on small inputs on the CPU."""
import os

import pytest
import torch
from torch import nn

import stars_fast
from stars_fast.models import (PAIRS, STUDENTS, TEACHERS, CheckpointMismatchError, Spiking, build_student,
                               build_teacher, fold_bn, freeze, load_student, load_teacher, save_checkpoint,
                               save_student, verify_checkpoint)
from stars_fast.models import teachers as teachers_module
from conftest import require_backend

STAGE_CHANNELS = {
    "resnet18": [64, 128, 256, 512], "resnet34": [64, 128, 256, 512], "resnet19": [128, 256, 512],
    "resnet20": [16, 32, 64], "vgg11": [64, 128, 256, 512, 512], "vgg16": [64, 128, 256, 512, 512],
    "digits_cnn": [16, 32, 64],
}
STUDENT_OF = {"s_resnet18": "resnet18", "s_resnet19": "resnet19", "s_resnet20": "resnet20",
              "s_vgg16": "vgg16", "digits_snn": "digits_cnn"}
# (input size, channels) per architecture: CIFAR 32 px, Tiny-ImageNet 64 px where the paper uses it
SIZES = {
    "resnet18": [(32, 3), (64, 3)], "resnet34": [(32, 3), (64, 3)], "resnet19": [(32, 3)],
    "resnet20": [(32, 3)], "vgg11": [(32, 3), (64, 3)], "vgg16": [(32, 3), (64, 3)], "digits_cnn": [(8, 1)],
}
# smaller inputs for the numeric tests (every model pools adaptively, so 8 px runs through)
SMALL = {"resnet18": (8, 3), "resnet34": (8, 3), "resnet19": (8, 3), "resnet20": (16, 3),
         "vgg11": (8, 3), "vgg16": (8, 3), "digits_cnn": (8, 1)}


def _randomize_bn(model):
    """Non-trivial BatchNorm statistics and affine parameters, as in a trained network."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.4)
    return model


def _stage_activations(model):
    """The activation modules whose inputs are the stage taps (the last activation of each stage)."""
    if hasattr(model, "num_stages"):  # ResNets
        return [getattr(model, f"layer{i}")[-1].act2 for i in range(1, model.num_stages + 1)]
    return list(model.acts)  # VGG, digits


def _student_input(name, batch=2):
    size, channels = SMALL[STUDENT_OF[name]]
    return torch.randn(batch, channels, size, size)


# --- shapes (meta device) ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", TEACHERS)
def test_teacher_shapes(name):
    for size, channels in SIZES[name]:
        with torch.device("meta"):
            model = build_teacher(name, num_classes=7, in_channels=channels)
            x = torch.empty(2, channels, size, size)
        logits, taps = model(x, return_taps=True)
        assert logits.shape == (2, 7)
        assert [tuple(t.shape) for t in taps] == [(2, c) for c in STAGE_CHANNELS[name]]


def _check_student_shapes(model, x, name, T):
    logits, taps = model(x, return_taps=True)
    assert model.T == T
    assert logits.shape == (2, 7)
    assert [tuple(t.shape) for t in taps] == [(2, c) for c in STAGE_CHANNELS[STUDENT_OF[name]]]


@pytest.mark.parametrize("name", ["s_resnet20", "digits_snn"])
@pytest.mark.parametrize("T", [1, 2, 4, 8])
def test_small_student_shapes(name, T):
    (size, channels), = SIZES[STUDENT_OF[name]]
    model = build_student(name, num_classes=7, T=T, in_channels=channels)
    with torch.no_grad():
        _check_student_shapes(model, torch.randn(2, channels, size, size), name, T)


@pytest.mark.parametrize("name", ["s_resnet18", "s_resnet19", "s_vgg16"])
def test_large_student_shapes(name):
    for size, channels in SIZES[STUDENT_OF[name]]:
        with torch.device("meta"):
            model = build_student(name, num_classes=7, T=2, in_channels=channels)
            x = torch.empty(2, channels, size, size)
        _check_student_shapes(model, x, name, 2)


def test_pairs_have_matching_tap_counts():
    assert set(PAIRS) == set(STUDENTS)
    for student, teacher in PAIRS.items():
        assert len(STAGE_CHANNELS[STUDENT_OF[student]]) == len(STAGE_CHANNELS[teacher])


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown teacher"):
        build_teacher("resnet50", 10)
    with pytest.raises(ValueError, match="unknown student"):
        build_student("s_resnet50", 10)
    with pytest.raises(ValueError, match="unknown neuron"):
        build_student("digits_snn", 10, neuron="izhikevich", in_channels=1)


# --- taps are the pre-activations of the stage-final activations -------------------------------------

def _hook_inputs(modules):
    seen = []
    handles = [m.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach())) for m in modules]
    return seen, handles


@pytest.mark.parametrize("name", TEACHERS)
def test_teacher_taps_are_pre_relu_stage_outputs(name):
    size, channels = SMALL[name]
    model = _randomize_bn(build_teacher(name, 10, channels)).eval()
    seen, handles = _hook_inputs(_stage_activations(model))
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        logits, taps = model(x, return_taps=True)
        plain = model(x)
    for h in handles:
        h.remove()
    assert torch.equal(logits, plain)
    assert len(seen) == 2 * len(taps)  # once per forward
    for tap, pre in zip(taps, seen):
        assert (pre < 0).any()  # taken before the ReLU
        torch.testing.assert_close(tap, pre.mean(dim=(2, 3)))


@pytest.mark.parametrize("name", STUDENTS)
def test_student_taps_are_pre_lif_stage_inputs(name):
    model = _randomize_bn(build_student(name, 10, T=2, in_channels=SMALL[STUDENT_OF[name]][1])).eval()
    seen, handles = _hook_inputs(_stage_activations(model))
    x = _student_input(name)
    with torch.no_grad():
        logits, taps = model(x, return_taps=True)
    for h in handles:
        h.remove()
    assert torch.isfinite(logits).all()
    for tap, pre in zip(taps, seen):
        folded = pre.unflatten(0, (2, x.shape[0]))  # [T, B, C, H, W]
        torch.testing.assert_close(tap, folded.mean(dim=(0, 3, 4)))


def test_plain_forward_does_no_tap_work(monkeypatch):
    def fail(f):
        raise AssertionError("pool_features called by a plain forward")

    monkeypatch.setattr(teachers_module, "pool_features", fail)
    monkeypatch.setattr(stars_fast.models.students, "pool_features", fail)
    build_teacher("digits_cnn", 10, 1)(torch.randn(2, 1, 8, 8))
    build_student("digits_snn", 10, in_channels=1)(torch.randn(2, 1, 8, 8))


def test_direct_coding_and_time_average():
    """T copies of the image go in (time folded into the batch); the logits are the per-step mean."""
    model = build_student("digits_snn", 10, T=3, neuron="if", in_channels=1).eval()
    x = torch.randn(4, 1, 8, 8)
    steps = []
    model.linear.register_forward_hook(lambda mod, args, out: steps.append(out))
    with torch.no_grad():
        logits = model(x)
    assert steps[0].shape == (3 * 4, 10)
    torch.testing.assert_close(logits, steps[0].unflatten(0, (3, 4)).mean(0))


def test_T_can_change_after_building():
    model = build_student("digits_snn", 10, T=2, in_channels=1)
    model.T = 5
    assert all(m.T == 5 for m in model.modules() if isinstance(m, Spiking))
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    with pytest.raises(ValueError):
        model.T = 0


# --- checkpoints -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "vgg11", "resnet20"])
def test_fast_datafree_checkpoint_round_trip(name, tmp_path):
    size, channels = SMALL[name]
    model = _randomize_bn(build_teacher(name, 10, channels)).eval()
    path = tmp_path / f"cifar10_{name}.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "best_acc1": 0.9},
               path)
    loaded = load_teacher(name, str(path), num_classes=10, in_channels=channels)
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training


def test_bare_state_dict_and_save_checkpoint(tmp_path):
    model = _randomize_bn(build_teacher("digits_cnn", 10, 1)).eval()
    path = tmp_path / "sub" / "teacher.pt"
    save_checkpoint(model.state_dict(), str(path))
    save_checkpoint(model.state_dict(), str(path))  # overwriting is fine
    assert os.listdir(path.parent) == ["teacher.pt"]  # no temporary file left behind
    loaded = load_teacher("digits_cnn", str(path), num_classes=10, in_channels=1)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_mismatching_checkpoint_names_the_keys(tmp_path):
    state = build_teacher("resnet20", 10).state_dict()
    state["fc.extra"] = state.pop("fc.bias")
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \['fc.bias'\].*unexpected keys \['fc.extra'\]"):
        load_teacher("resnet20", str(path), num_classes=10)
    with pytest.raises(CheckpointMismatchError, match="missing keys"):  # a different architecture
        load_teacher("resnet18", str(path), num_classes=10)


def test_wrong_num_classes_is_a_mismatch(tmp_path):
    path = tmp_path / "t.pth"
    torch.save(build_teacher("digits_cnn", 10, 1).state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match="size mismatch"):
        load_teacher("digits_cnn", str(path), num_classes=100, in_channels=1)


def test_old_checkpoint_without_num_batches_tracked(tmp_path):
    state = {k: v for k, v in build_teacher("digits_cnn", 10, 1).state_dict().items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(state, path)
    load_teacher("digits_cnn", str(path), num_classes=10, in_channels=1)


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@pytest.mark.parametrize("neuron", ["lif", "plif"])
def test_save_and_load_student_round_trip(neuron, tmp_path):
    model = _randomize_bn(build_student("digits_snn", 10, T=3, neuron=neuron, in_channels=1)).eval()
    for p in model.parameters():  # PLIF's learnable decay too
        p.data.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "best.pth"
    save_student(str(path), model, arch="digits_snn", num_classes=10, in_channels=1, T=3, neuron=neuron,
                 acc=0.93, epoch=7, best_acc1=0.93)
    assert os.listdir(tmp_path) == ["best.pth"]  # no temporary file left behind
    assert os.stat(path).st_mode & 0o777 == _umask_mode()  # as open() would create it, not mkstemp's 0600
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict", "arch", "num_classes", "in_channels", "T", "neuron", "acc", "epoch",
                        "best_acc1"}
    loaded, meta = load_student(str(path))
    assert meta == {"arch": "digits_snn", "num_classes": 10, "in_channels": 1, "T": 3, "neuron": neuron,
                    "acc": 0.93, "epoch": 7, "best_acc1": 0.93}
    assert not loaded.training and loaded.T == 3
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_save_student_writes_teachers_too(tmp_path):
    model = _randomize_bn(build_teacher("resnet20", 10)).eval()
    path = tmp_path / "teacher.pth"
    save_student(str(path), model, arch="resnet20", num_classes=10, in_channels=3, T=None, neuron=None,
                 acc=None, epoch=None)
    loaded, meta = load_student(str(path))
    assert meta["T"] is None and meta["arch"] == "resnet20"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert torch.equal(load_teacher("resnet20", str(path), 10)(x), model(x))  # train --teacher-ckpt reads it


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_load_student_refuses_what_is_not_a_model_file(tmp_path):
    cases = {"garbage.pth": b"not a checkpoint at all",
             "bare.pth": None, "unknown.pth": None, "evil.pth": None, "badshape.pth": None}
    (tmp_path / "garbage.pth").write_bytes(cases["garbage.pth"])
    teacher = build_teacher("digits_cnn", 10, 1)
    torch.save(teacher.state_dict(), tmp_path / "bare.pth")  # a bare state dict: no arch to rebuild
    meta = {"arch": "resnet1000", "num_classes": 10, "in_channels": 1, "T": 4, "neuron": "lif"}
    torch.save({"state_dict": teacher.state_dict(), **meta}, tmp_path / "unknown.pth")
    torch.save({"state_dict": _Payload(), **meta}, tmp_path / "evil.pth")
    torch.save({"state_dict": teacher.state_dict(), **meta, "arch": "digits_cnn", "num_classes": 7},
               tmp_path / "badshape.pth")
    messages = {"garbage.pth": "not a checkpoint torch.load can read", "bare.pth": "expected the keys",
                "unknown.pth": "unknown arch", "evil.pth": "weights_only", "badshape.pth": "size mismatch"}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for name, message in messages.items():
            with pytest.raises(ValueError, match=message):
                load_student(str(tmp_path / name))
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "PWNED").exists()


def test_verify_checkpoint_finds_flipped_bytes_in_a_tensor_record(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"w": torch.arange(4096, dtype=torch.float32)}, str(path))
    verify_checkpoint(str(path))  # intact
    data = bytearray(path.read_bytes())
    offset = data.find(torch.arange(4096, dtype=torch.float32)[100:104].numpy().tobytes())
    assert offset > 0
    data[offset:offset + 4] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["w"][100] != 100  # torch.load alone does not notice
    with pytest.raises(ValueError, match="CRC"):
        verify_checkpoint(str(path))
    (tmp_path / "t.pt").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        verify_checkpoint(str(tmp_path / "t.pt"))


# --- backends, neuron kinds, frozen students ---------------------------------------------------------

@pytest.mark.parametrize("name,neuron", [("s_resnet20", "lif"), ("digits_snn", "lif"), ("digits_snn", "if"),
                                         ("digits_snn", "plif")])
def test_cpu_and_reference_backends_agree(name, neuron):
    require_backend("cpu")
    channels = SMALL[STUDENT_OF[name]][1]
    fused = _randomize_bn(build_student(name, 10, T=4, neuron=neuron, backend="cpu", in_channels=channels))
    reference = build_student(name, 10, T=4, neuron=neuron, backend="reference", in_channels=channels)
    reference.load_state_dict(fused.state_dict())
    x = _student_input(name)
    grads = []
    for model in (freeze(fused), freeze(reference)):
        xg = x.clone().requires_grad_(True)
        logits, taps = model(xg, return_taps=True)
        (logits.square().sum() + sum(t.sum() for t in taps)).backward()
        grads.append((logits, taps, xg.grad))
    (l_f, taps_f, g_f), (l_r, taps_r, g_r) = grads
    torch.testing.assert_close(l_f, l_r, rtol=0, atol=1e-6)
    for a, b in zip(taps_f, taps_r):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(g_f, g_r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("neuron", ["lif", "if", "plif"])
def test_neuron_kinds_train(neuron):
    model = build_student("s_resnet20", 10, T=2, neuron=neuron, in_channels=3, v_threshold=0.5).train()
    kinds = {type(m.neuron).__name__ for m in model.modules() if isinstance(m, Spiking)}
    assert kinds == {{"lif": "LIFNode", "if": "IFNode", "plif": "ParametricLIFNode"}[neuron]}
    logits = model(torch.randn(2, 3, 16, 16))
    logits.sum().backward()
    assert model.conv1.weight.grad is not None
    tau_params = [p for n, p in model.named_parameters() if n.endswith("neuron.w")]
    assert len(tau_params) == (19 if neuron == "plif" else 0)  # one per neuron
    assert all(p.grad is not None for p in tau_params)


@pytest.mark.parametrize("make_frozen", [freeze, fold_bn], ids=["freeze", "fold_bn"])
def test_frozen_student_computes_no_parameter_gradients(make_frozen):
    model = make_frozen(build_student("s_resnet20", 10, T=2, neuron="plif"))
    assert not model.training
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    logits, taps = model(x, return_taps=True)
    (logits.sum() + sum(t.sum() for t in taps)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", STUDENTS)
def test_fold_bn_keeps_outputs(name):
    model = _randomize_bn(build_student(name, 10, T=2, in_channels=SMALL[STUDENT_OF[name]][1])).eval()
    folded = fold_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    x = _student_input(name)
    with torch.no_grad():
        logits, taps = model(x, return_taps=True)
        logits_f, taps_f = folded(x, return_taps=True)
    torch.testing.assert_close(logits_f, logits, rtol=0, atol=1e-5)
    for a, b in zip(taps_f, taps):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_channels_last_matches_contiguous():
    model = fold_bn(_randomize_bn(build_student("s_resnet20", 10, T=2)))
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    logits, taps = model(x, return_taps=True)
    grad, = torch.autograd.grad(logits.sum(), x)
    model_cl = model.to(memory_format=torch.channels_last)
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    spike_layouts = []
    for module in model_cl.modules():
        if isinstance(module, Spiking):
            module.register_forward_hook(lambda _, inputs, out: spike_layouts.append(
                (inputs[0].is_contiguous(memory_format=torch.channels_last),
                 out.is_contiguous(memory_format=torch.channels_last))))
    logits_cl, taps_cl = model_cl(x_cl, return_taps=True)
    assert spike_layouts and all(out for is_cl, out in spike_layouts if is_cl), "a spiking layer changed the layout"
    grad_cl, = torch.autograd.grad(logits_cl.sum(), x_cl)
    torch.testing.assert_close(logits_cl, logits, rtol=0, atol=1e-5)
    for a, b in zip(taps_cl, taps):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_cl, grad, rtol=1e-4, atol=1e-6)
