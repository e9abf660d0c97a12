"""DeepInversion, CMI and NAYER as their originals (each loss term against the original's formula),
the STARS options and the label-embedding files; generators, augmentations, the bank of negatives, NAYER's schedule and label
embeddings, tiny end-to-end digits runs of both through the CLI, and the presets."""
import copy
import json
import os
import pickle
import time

import numpy as np

import pytest
import torch

from stars_fast import label_embedding, models, reference, train
from stars_fast.data import CIFAR10_CLASSES, DATASETS
from stars_fast.presets import APPENDIX_A, PAPER_PAIRS, PAPER_PRESETS
from stars_fast.synthesis import StarsRegularizer
from stars_fast.models import fold_bn
from stars_fast.synthesis import BNStatsHooks, DeepInversionSynthesizer, jitter_and_flip
from stars_fast.synthesis.cmi import (CMISynthesizer, FeatureBank, InstanceMeanHooks, fast_datafree_feature_layers,
                                      instance_feature_modules, random_resized_crop_and_flip)
from stars_fast.synthesis.base import StepGradientNorms
from stars_fast.synthesis.deepinversion import total_variation
from stars_fast.synthesis.factory import build_synthesizer
from stars_fast.synthesis.generator import Generator, NoisyLayerGenerator, reset_generator
from stars_fast.synthesis.objective import js_divergence
from stars_fast.synthesis.nayer import (NayerSynthesizer, balanced_targets, load_label_embedding,
                                        random_label_embedding)

DIGITS = DATASETS["digits"]
TINY = ["--epochs", "5", "--g-steps", "20", "--kd-steps", "40", "--ep-steps", "40", "--batch-size", "64",
        "--synthesis-batch-size", "64", "--lr", "0.5", "--ngf", "16", "--no-progress"]
TINY_METHODS = {
    "cmi": ["--method", "cmi", "--lr-g", "0.1", "--bn", "1"],
    "nayer": ["--method", "nayer", "--lr-g", "0.02", "--warmup", "0", "--g-loops", "1", "--le-emb-size", "256"],
}


# ---------------------------------------------------------------------------- generators

def test_generator_makes_pixels_and_resets_like_fast_datafree():
    generator = Generator(nz=8, ngf=4, img_size=8, nc=1)
    pixels = generator(torch.randn(3, 8))
    assert pixels.shape == (3, 1, 8, 8) and (pixels >= 0).all() and (pixels <= 1).all()
    reset_generator(generator)
    bn = generator.conv_blocks[0]
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias)) and (bn.weight - 1).abs().max() < 0.2
    assert generator.l1.weight.std() < 0.05 and torch.equal(generator.l1.bias, torch.zeros_like(generator.l1.bias))


def test_noisy_layer_generator_gives_each_chunk_of_classes_its_own_layer():
    embedding = torch.randn(3, 5)
    generator = NoisyLayerGenerator(embedding, batch_size=7, latent_size=6, ngf=4, img_size=8, nc=1)
    assert len(generator.noisy_layers) == 3  # ceil(7 / 3)
    assert generator(torch.tensor([0, 1, 2, 0, 1, 2, 1])).shape == (7, 1, 8, 8)
    with pytest.raises(ValueError, match="at most 9 images"):
        generator(torch.zeros(10, dtype=torch.long))
    before = generator.body.l1.weight.clone()
    generator.reset_noisy_layers()
    weights = torch.cat([layer.weight.flatten() for layer in generator.noisy_layers])
    assert 0.7 < weights.std() < 1.3 and torch.equal(generator.body.l1.weight, before)  # only the noisy layers
    assert "label_embedding" in generator.state_dict() and not any(
        p is generator.label_embedding for p in generator.parameters())


def test_balanced_targets_cover_every_class_then_random():
    targets = balanced_targets(10, 4, "cpu")
    assert targets[:8].tolist() == [0, 1, 2, 3, 0, 1, 2, 3] and ((targets[8:] >= 0) & (targets[8:] < 4)).all()


# ---------------------------------------------------------------------- CMI's pieces

def test_random_resized_crop_is_identity_at_full_scale_and_differentiable():
    x = torch.rand(4, 3, 8, 8, requires_grad=True)
    same = random_resized_crop_and_flip(x, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    assert torch.allclose(same, x, atol=1e-5)
    crops = random_resized_crop_and_flip(x, scale=(0.25, 0.5))
    assert crops.shape == x.shape and not torch.allclose(crops[0], crops[1])
    crops.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_feature_bank_keeps_the_newest_rows(tmp_path):
    bank = FeatureBank(5, "cpu")
    assert bank.sample(3, 4).shape == (0, 4)
    for i in range(3):
        bank.add(torch.full((2, 4), float(i)))
    assert len(bank) == 5 and sorted(bank.features[:, 0].tolist()) == [0.0, 1.0, 1.0, 2.0, 2.0]
    assert bank.sample(3, 4).shape == (3, 4) and bank.sample(10, 4).shape == (5, 4)
    torch.save(bank.state_dict(), tmp_path / "bank.pt")
    restored = FeatureBank(5, "cpu")
    restored.load_state_dict(torch.load(tmp_path / "bank.pt", weights_only=True))
    assert torch.equal(restored.features, bank.features)


def test_cmi_round_trains_the_generator_and_fills_the_bank(pair, tmp_path):
    teacher, student = pair
    synthesizer = CMISynthesizer(teacher, student, DIGITS, batch_size=6, iterations=3, lr_g=0.05, bn=1, oh=1, adv=0.5,
                                 cr=0.8, cr_T=0.2, ngf=4, head_dim=8, stars=StarsRegularizer(backend="reference"))
    first = synthesizer.synthesize()
    second = synthesizer.synthesize()
    assert first.images.shape == (6, 1, 8, 8) and len(synthesizer.bank) == 12
    assert synthesizer.bank.features.shape[1] == 2 * (16 + 32 + 64)  # local and global BN-input means
    assert second.losses["loss_cr"] > 0 and second.losses["loss_rca"] > 0
    assert len(second.grad_norms) == 3 and all(0 < n < float("inf") for n in second.grad_norms)
    assert all(p.grad is None for p in list(student.parameters()) + list(teacher.parameters()))
    torch.save(synthesizer.state_dict(), tmp_path / "cmi.pt")
    restored = CMISynthesizer(teacher, student, DIGITS, batch_size=6, iterations=3, lr_g=0.05, bn=1, oh=1, adv=0.5,
                              cr=0.8, cr_T=0.2, ngf=4, head_dim=8)
    restored.load_state_dict(torch.load(tmp_path / "cmi.pt", weights_only=True))
    assert torch.equal(restored.bank.features, synthesizer.bank.features)
    assert torch.equal(restored.head.head[0].weight, synthesizer.head.head[0].weight)


# -------------------------------------------------------------------- NAYER's schedule

def test_nayer_rebuilds_every_g_life_epochs_and_loops_more_in_warm_up(pair, tmp_path):
    teacher, student = pair
    options = dict(batch_size=12, iterations=1, lr_g=4e-3, bn=1, oh=1, adv=1, g_life=3, g_loops=1, gwp_loops=2,
                   warmup=2, latent_size=8, ngf=4)
    synthesizer = NayerSynthesizer(teacher, student, DIGITS, **options)
    generators, counts = [], []
    for epoch in range(6):
        synthesizer.set_epoch(epoch)
        result = synthesizer.synthesize()
        counts.append(len(result.images))
        assert len(result.grad_norms) == len(result.images) // 12  # a step per batch (iterations=1)
        generators.append(synthesizer.generator)
        if epoch == 3:  # a second round in the same epoch keeps the generator
            synthesizer.synthesize()
            assert synthesizer.generator is generators[-1]
    assert counts == [24, 24, 12, 12, 12, 12]  # gwp_loops batches in the 2 warm-up epochs
    rebuilt = [e for e in range(1, 6) if generators[e] is not generators[e - 1]]
    assert rebuilt == [2, 3, 5]  # e % 3 == 0 or (e - 2) % 3 == 0
    torch.save(synthesizer.state_dict(), tmp_path / "nayer.pt")
    restored = NayerSynthesizer(teacher, student, DIGITS, **options)
    restored.load_state_dict(torch.load(tmp_path / "nayer.pt", weights_only=True))
    restored.set_epoch(5)
    assert not restored._rebuild_due() and restored.built_epoch == 5
    assert torch.equal(restored.generator.body.l1.weight, synthesizer.generator.body.l1.weight)


def test_label_embedding_file_loads_and_bad_files_say_what_is_expected(tmp_path):
    good = torch.randn(10, 6)
    torch.save(good, tmp_path / "good.pt")
    assert torch.equal(load_label_embedding(str(tmp_path / "good.pt"), 10), good)
    torch.save(torch.randn(9, 6), tmp_path / "short.pt")
    with pytest.raises(ValueError, match=r"shape \[9, 6\].*num_classes=10"):
        load_label_embedding(str(tmp_path / "short.pt"), 10)
    torch.save({"embedding": good}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="holds a dict"):
        load_label_embedding(str(tmp_path / "dict.pt"), 10)
    assert torch.equal(random_label_embedding(10), random_label_embedding(10))  # fixed, seeded


# ---------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("method", ["cmi", "nayer"])
def test_method_trains_a_student_on_digits_end_to_end(teacher_cache, tmp_path, method):
    out = str(tmp_path / method)
    started = time.time()
    summary = train.main(["--out", out, *TINY, *TINY_METHODS[method]])
    assert time.time() - started < 60  # well under 30 s on a quiet machine
    assert summary["config"]["method"] == method and summary["epochs_completed"] == 5
    assert summary["student_acc"] > 0.25, summary  # chance is 0.1
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert all(r["loss_rca"] > 0 and r["loss_bn"] > 0 for r in records)
    if method == "cmi":
        assert all(r["loss_cr"] > 0 for r in records)
    checkpoint = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert len(checkpoint["synthesizer"]) == 1 and checkpoint["synthesizer"][0]  # the state that persists


def test_nayer_reads_a_label_embedding_file_and_rejects_a_bad_one(teacher_cache, tmp_path):
    path = str(tmp_path / "embedding.pt")
    torch.save(torch.randn(10, 12), path)
    short = ["--method", "nayer", "--epochs", "1", "--g-steps", "1", "--kd-steps", "1", "--ep-steps", "1",
             "--synthesis-batch-size", "10", "--no-progress"]
    train.main(["--out", str(tmp_path / "good"), "--label-embedding", path, *short])
    checkpoint = torch.load(str(tmp_path / "good" / "checkpoint.pt"), weights_only=True)
    assert checkpoint["synthesizer"][0]["generator"]["label_embedding"].shape == (10, 12)
    torch.save(torch.randn(10, 3, 4), path)
    with pytest.raises(SystemExit, match=r"--label-embedding: .*shape \[10, 3, 4\]"):
        train.main(["--out", str(tmp_path / "bad"), "--label-embedding", path, *short])


# ------------------------------------------------- the loss terms against the originals' formulas

def _fast_datafree_jsdiv(s_logits, t_logits, T=3.0):
    """Fast-Datafree's criterions.jsdiv, written out in numpy (float64), batchmean."""
    def softmax(z):
        e = np.exp(z / T - (z / T).max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    p, q = softmax(s_logits.numpy().astype(np.float64)), softmax(t_logits.numpy().astype(np.float64))
    m = np.clip(0.5 * (p + q), 0.01, 0.99)
    p, q = np.clip(p, 0.01, 0.99), np.clip(q, 0.01, 0.99)
    batch = len(p)
    return 0.5 * (m * (np.log(m) - np.log(p))).sum() / batch + 0.5 * (m * (np.log(m) - np.log(q))).sum() / batch


def test_js_divergence_is_fast_datafrees_clamped_jsdiv_at_T3():
    torch.manual_seed(1)
    s_logits, t_logits = torch.randn(5, 7) * 4, torch.randn(5, 7) * 4  # big enough for the clamps to bite
    got = js_divergence(s_logits, t_logits).mean()
    assert float(got) == pytest.approx(_fast_datafree_jsdiv(s_logits, t_logits), rel=1e-5)
    p = torch.softmax(s_logits / 3, 1)
    assert ((p < 0.01) | (p > 0.99)).any()  # the clamps were exercised
    assert float(js_divergence(t_logits, t_logits).abs().max()) < 1e-6  # zero for equal distributions
    assert torch.isfinite(js_divergence(torch.full((2, 3), 80.0), torch.zeros(2, 3))).all()


def test_total_variation_is_mean_absolute_neighbour_difference():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    a = x.numpy()
    expected = 0.0
    for di, dj in ((0, 1), (1, 0), (-1, 1), (1, 1)):  # right, down, and the two diagonals of Fast-Datafree
        diffs = []
        for i in range(5):
            for j in range(4):
                i2, j2 = i + di, j + dj
                if 0 <= i2 < 5 and 0 <= j2 < 4:
                    diffs.append(np.abs(a[:, :, i, j] - a[:, :, i2, j2]))
        expected += np.mean(np.stack(diffs))
    assert float(total_variation(x)) == pytest.approx(expected, rel=1e-12)


def test_jitter_and_flip_draws_one_shift_and_flip_for_the_whole_batch():
    x = torch.randn(6, 2, 8, 8)
    for seed in range(8):
        torch.manual_seed(seed)
        y = jitter_and_flip(x, flip=True)
        matches = [(dh, dw, flip) for dh in range(-1, 2) for dw in range(-1, 2) for flip in (False, True)
                   if torch.equal(y, (lambda r: r.flip(3) if flip else r)(torch.roll(x, (dh, dw), (2, 3))))]
        assert matches, seed  # a single (shift, flip) explains every sample (lim 1/8 of 8 px: shifts in -1..1)
    torch.manual_seed(0)
    flips = [not torch.equal(jitter_and_flip(x, lim=0.0, flip=True), x) for _ in range(200)]
    assert 60 < sum(flips) < 140  # flipped with probability 1/2
    assert all(torch.equal(jitter_and_flip(x, lim=0.0, flip=False), x) for _ in range(5))


class _InputMoments:
    """Records (mean, biased var) of the input of every BatchNorm2d of a model, per forward."""

    def __init__(self, model):
        self.calls = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, torch.nn.BatchNorm2d)]
        self.modules = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    def _hook(self, module, inputs, output):
        x = inputs[0].detach().double()
        self.calls.append((module, x.mean((0, 2, 3)), x.permute(1, 0, 2, 3).flatten(1).var(1, unbiased=False)))

    def r(self, calls, moving=None, m=0.0):
        """DeepInversionHook's r summed over the layers of `calls`, with NAYER's momentum target."""
        total = 0.0
        for i, (module, mean, var) in enumerate(calls):
            if moving is not None:
                mean, var = (1 - m) * mean + m * moving[i][0], (1 - m) * var + m * moving[i][1]
            total += float((module.running_var.double() - var).norm() + (module.running_mean.double() - mean).norm())
        return total

    def remove(self):
        for h in self.handles:
            h.remove()


def test_deepinversion_objective_is_fast_datafrees(pair):
    """bn * (teacher r - 0.001 * student r) + oh * CE - adv * jsdiv(s, t, T=3), each piece recomputed."""
    teacher, student = pair
    torch.manual_seed(3)
    student.train()
    for module in student.modules():  # non-trivial running statistics for the student's BN term
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    images, targets = torch.randn(6, 1, 8, 8), torch.arange(6)
    synthesizer = DeepInversionSynthesizer(teacher, student, DIGITS, batch_size=6, iterations=1, lr_g=0.1,
                                           bn=10, oh=1, adv=1.5)
    objective = synthesizer.objective
    assert objective.adversarial == "jsdiv" and objective.student_bn == 0.001
    with objective.round() as loss:
        probe_t, probe_s = _InputMoments(teacher), None
        out = loss(images, targets)
        probe_t.remove()
    # the same forward, by hand: teacher BN inputs, the student's BN inputs (unfolded, eval mode)
    reference_student = copy.deepcopy(student).eval()
    probe_s = _InputMoments(reference_student)
    with torch.no_grad():
        s_logits = reference_student(images)
        t_logits = teacher(images)
    probe_s.remove()
    r_teacher, r_student = probe_t.r(probe_t.calls), probe_s.r(probe_s.calls)
    ce = float(torch.nn.functional.cross_entropy(t_logits, targets))
    expected = 10 * (r_teacher - 0.001 * r_student) + ce - 1.5 * _fast_datafree_jsdiv(s_logits, t_logits)
    assert float(out.terms["loss_bn"]) == pytest.approx(r_teacher, rel=1e-4)
    assert float(out.terms["loss_bn_student"]) == pytest.approx(r_student, rel=1e-4)
    assert float(out.loss) == pytest.approx(expected, rel=1e-4)
    assert student.training  # restored


def test_deepinversion_reports_each_steps_gradient_norm(pair):
    """The norm recorded per step is ||d loss / d pixels||_2 of that step, the gradient Adam then takes."""
    teacher, student = pair
    synthesizer = DeepInversionSynthesizer(teacher, student, DIGITS, batch_size=6, iterations=4, lr_g=0.1,
                                           bn=1, oh=1, adv=0.5, stars=StarsRegularizer(backend="reference"))
    result = synthesizer.synthesize()
    assert len(result.grad_norms) == 4 and all(0 < n < float("inf") for n in result.grad_norms)
    images = torch.randn(6, 1, 8, 8, requires_grad=True)
    norms = StepGradientNorms([images])
    with synthesizer.objective.round() as objective:
        synthesizer.step(images, torch.arange(6), torch.optim.SGD([images], lr=0.0), objective, norms)
    assert norms.values() == pytest.approx([float(torch.linalg.vector_norm(images.grad))], rel=1e-6)


@pytest.mark.parametrize("only", ["bn", "oh", "rca"])
def test_grad_shares_measure_each_terms_own_gradient(pair, only):
    """--grad-shares: a term's measured norm is the gradient norm of that term alone; with a single term
    in the objective it equals the step's whole gradient norm (taken by the step's own backward)."""
    teacher, student = pair
    weights = dict(bn=float(only == "bn"), oh=float(only == "oh"), adv=0.0)
    stars = StarsRegularizer(lambda_tar=0.0, backend="cpu") if only == "rca" else None
    synthesizer = DeepInversionSynthesizer(teacher, student, DIGITS, batch_size=6, iterations=3, lr_g=0.1,
                                           stars=stars, **weights)
    synthesizer.grad_shares_every = 2  # steps 0 and 2
    result = synthesizer.synthesize()
    measured = result.term_grad_norms[only]
    assert len(measured) == 2 and set(result.term_grad_norms) <= {"bn", "oh", "adv", "rca"}
    assert measured == pytest.approx([result.grad_norms[0], result.grad_norms[2]], rel=1e-5)


def test_cmi_instance_features_are_bn_input_means_and_stage_inputs_for_resnet34(pair):
    teacher, student = pair
    synthesizer = CMISynthesizer(teacher, student, DIGITS, batch_size=4, iterations=1, lr_g=0.05, bn=1, oh=1, adv=0.5,
                                 cr=0.8, cr_T=0.2, ngf=4, head_dim=8)
    images = torch.randn(4, 1, 8, 8)
    probe = _InputMoments(teacher)
    with InstanceMeanHooks(synthesizer.feature_modules) as hooks:
        features = synthesizer._instance_features(images, hooks)
    probe.remove()
    spatial_means = []
    for module in probe.modules:  # the BN inputs' spatial means, recomputed from the input itself
        captured = {}
        handle = module.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0].detach()))
        teacher(images)
        handle.remove()
        spatial_means.append(captured["x"].mean((2, 3)))
    torch.testing.assert_close(features, torch.cat(spatial_means, 1))
    assert synthesizer.feature_dim == 16 + 32 + 64
    assert fast_datafree_feature_layers("resnet34") == ["layer1", "layer2", "layer3", "layer4"]
    assert fast_datafree_feature_layers("vgg16") is None and fast_datafree_feature_layers("resnet18") is None
    resnet34 = models.freeze(models.build_teacher("resnet34", 10))
    modules = instance_feature_modules(resnet34, fast_datafree_feature_layers("resnet34"))
    with torch.no_grad(), InstanceMeanHooks(modules) as hooks:
        resnet34(torch.randn(2, 3, 32, 32))
        assert hooks.features().shape == (2, 64 + 64 + 128 + 256)  # inputs of layer1..layer4


# ------------------------------------------------------------------------ NAYER's BN momentum

def test_bn_hooks_momentum_target_by_hand():
    bn = torch.nn.BatchNorm2d(3).eval()
    bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
    bn.running_var.copy_(torch.tensor([1.5, 0.5, 2.0]))
    x1, x2 = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5) * 2 + 1
    with BNStatsHooks(bn, momentum=0.9) as hooks:
        bn(x1)
        assert float(hooks.loss()) == pytest.approx(_r_by_hand(bn, x1), rel=1e-5)  # plain before any update
        hooks.update_moving()
        bn(x2)
        target = [(0.1 * m2 + 0.9 * m1, 0.1 * v2 + 0.9 * v1) for (m1, v1), (m2, v2) in zip([_moments(x1)], [_moments(x2)])]
        assert float(hooks.loss()) == pytest.approx(_r_by_hand(bn, None, target[0]), rel=1e-5)
        hooks.update_moving()
        (mean, var), = hooks.moving_state()
        torch.testing.assert_close(mean, 0.9 * _moments(x1)[0] + 0.1 * _moments(x2)[0])
        torch.testing.assert_close(var, 0.9 * _moments(x1)[1] + 0.1 * _moments(x2)[1])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        BNStatsHooks(bn, momentum=1.0)


def _moments(x):
    return x.mean((0, 2, 3)), x.permute(1, 0, 2, 3).flatten(1).var(1, unbiased=False)


def _r_by_hand(bn, x, target=None):
    mean, var = _moments(x) if target is None else target
    return float((bn.running_mean - mean).norm() + (bn.running_var - var).norm())


def test_nayer_bn_momentum_target_across_two_batches_and_a_rebuild(pair, tmp_path):
    teacher, student = pair
    options = dict(batch_size=10, iterations=2, lr_g=4e-3, bn=1, oh=1, adv=1, g_life=1, g_loops=2, gwp_loops=2,
                   warmup=0, latent_size=8, ngf=4, bn_momentum=0.9)
    synthesizer = NayerSynthesizer(teacher, student, DIGITS, **options)
    probe = _InputMoments(teacher)
    layers = len(probe.modules)
    r_values = []
    original = synthesizer.objective._loss

    def recording_loss(*args, **kwargs):
        out = original(*args, **kwargs)
        r_values.append(float(out.terms["loss_bn"]))
        return out

    synthesizer.objective._loss = recording_loss
    synthesizer.set_epoch(0)
    synthesizer.synthesize()  # two batches of two steps: 4 teacher forwards
    calls = [probe.calls[i * layers:(i + 1) * layers] for i in range(len(probe.calls) // layers)]
    assert len(calls) == 4
    last_of_batch1, last_of_batch2 = calls[1], calls[3]
    assert r_values[0] == pytest.approx(probe.r(calls[0]), rel=1e-4)  # no moving average yet: plain target
    moving1 = [(mean, var) for _, mean, var in last_of_batch1]  # the first update takes the last statistics
    assert r_values[2] == pytest.approx(probe.r(calls[2], moving1, 0.9), rel=1e-4)  # batch 2: the blended target
    moving2 = [(0.9 * m1 + 0.1 * m2, 0.9 * v1 + 0.1 * v2)
               for (m1, v1), (_, m2, v2) in zip(moving1, last_of_batch2)]
    for (mean, var), (want_mean, want_var) in zip(synthesizer.objective.bn_moving, moving2):
        torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var.double(), want_var, rtol=1e-5, atol=1e-6)
    # a new epoch rebuilds the generator (g_life 1) and keeps the moving average
    generator = synthesizer.generator
    synthesizer.set_epoch(1)
    probe.calls.clear()
    r_values.clear()
    synthesizer.synthesize()
    assert synthesizer.generator is not generator
    first = probe.calls[:layers]
    assert r_values[0] == pytest.approx(probe.r(first, moving2, 0.9), rel=1e-4)
    probe.remove()
    # it travels through the checkpoint (tensors and lists only)
    torch.save(synthesizer.state_dict(), tmp_path / "nayer.pt")
    restored = NayerSynthesizer(teacher, student, DIGITS, **options)
    restored.load_state_dict(torch.load(tmp_path / "nayer.pt", weights_only=True))
    for (a, b), (c, d) in zip(restored.objective.bn_moving, synthesizer.objective.bn_moving):
        assert torch.equal(a, c) and torch.equal(b, d)
    plain = NayerSynthesizer(teacher, student, DIGITS, **{**options, "bn_momentum": 0.0})
    plain.synthesize()
    assert plain.objective.bn_moving is None  # --bn-mmt 0: DeepInversion's plain BN loss


# ------------------------------------------------------------------ NAYER's label-embedding files

class _RunsACommand:
    """A pickle whose loading would run a shell command (it must never run)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_label_embedding_reads_nayers_pickle_and_refuses_a_malicious_one(tmp_path):
    embedding = torch.randn(10, 512).half().requires_grad_(False)
    nayer_file = tmp_path / "cifar10_le.pickle"
    with open(nayer_file, "wb") as f:
        pickle.dump(embedding, f)  # how NAYER's label_embedding.py writes it
    loaded = load_label_embedding(str(nayer_file), 10)
    assert loaded.dtype == torch.float32 and torch.equal(loaded, embedding.float())
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pickle"
    with open(evil, "wb") as f:
        pickle.dump(_RunsACommand(marker), f)
    with pytest.raises(ValueError, match="system"):
        load_label_embedding(str(evil), 10)
    assert not marker.exists()  # nothing from the file ran
    wrapped = tmp_path / "wrapped.pickle"
    with open(wrapped, "wb") as f:
        pickle.dump([embedding, _RunsACommand(marker)], f)
    with pytest.raises(ValueError):
        load_label_embedding(str(wrapped), 10)
    assert not marker.exists()


def _tiny_clip_text_model(folder):
    """A randomly initialized CLIP text encoder (transformers) with a byte-level tokenizer of no merges."""
    transformers = pytest.importorskip("transformers")
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]  # GPT-2's byte map
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    config = transformers.CLIPTextConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, projection_dim=16,
                                         num_hidden_layers=2, num_attention_heads=2, bos_token_id=len(tokens) - 2,
                                         eos_token_id=len(tokens) - 1, pad_token_id=len(tokens) - 1)
    return tokenizer, transformers.CLIPTextModelWithProjection(config).eval()


def test_label_embedding_is_clips_text_feature_of_nayers_prompt(tmp_path, monkeypatch):
    tokenizer, model = _tiny_clip_text_model(tmp_path)
    encode = label_embedding.transformers_encoder(model, tokenizer)
    names = ["aquarium_fish", "maple_tree", "cat", "bell-toad"]
    got = label_embedding.label_embedding(names, encode)
    assert got.shape == (4, 16) and got.dtype == torch.float32
    for row, text in zip(got, ["a image of aquarium fish", "a image of maple tree", "a image of cat",
                               "a image of bell toad"]):
        ids = tokenizer([text], return_tensors="pt")["input_ids"]  # alone, unpadded: CLIP's encode_text by hand
        with torch.no_grad():
            hidden = model.text_model(input_ids=ids).last_hidden_state[0]  # after the final layer norm
            want = model.text_projection(hidden[ids[0].tolist().index(tokenizer.eos_token_id)])
        torch.testing.assert_close(row, want, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(label_embedding, "pretrained_encoder", lambda library, device: encode)
    out = tmp_path / "cifar10_le.pt"
    label_embedding.main(["--dataset", "cifar10", "--out", str(out)])
    expected = label_embedding.label_embedding(list(CIFAR10_CLASSES), encode)
    torch.testing.assert_close(load_label_embedding(str(out), 10), expected)
    assert label_embedding.class_names("cifar100")[:3] == ["apple", "aquarium_fish", "baby"]


def test_tiny_imagenet_names_are_whole_words_entries_in_label_order(tmp_path):
    folder = tmp_path / "tiny-imagenet-200"
    folder.mkdir()
    (folder / "wnids.txt").write_text("n02\nn01\n")
    (folder / "words.txt").write_text("n00\tunused\nn01\tgoldfish, Carassius auratus\nn02\ttailed frog, bell toad\n")
    assert label_embedding.class_names("tiny-imagenet", str(tmp_path)) == ["goldfish, Carassius auratus",
                                                                            "tailed frog, bell toad"]
    with pytest.raises(ValueError, match="--data-root"):
        label_embedding.class_names("tiny-imagenet")
    (folder / "words.txt").write_text("n01\tgoldfish\n")
    with pytest.raises(ValueError, match="no entry for 1 wnids"):
        label_embedding.class_names("tiny-imagenet", str(tmp_path))


# --------------------------------------------------------------------- the new flags reach the loss

def test_stars_flags_parse_and_reach_the_loss(pair):
    teacher, student = pair
    flags = ["--thresholds", "-0.5", "0.25", "--stars-layers", "0", "2", "--stars-weights", "1", "3",
             "--stars-start-epoch", "2", "--bn-mmt", "0.5", "--method", "nayer", "--backend", "reference"]
    config = train.make_config(train.parse_args(flags))
    assert (config["thresholds"], config["stars_layers"], config["stars_weights"]) == ([-0.5, 0.25], [0, 2], [1.0, 3.0])
    assert config["stars_start_epoch"] == 2 and config["bn_mmt"] == 0.5
    synthesizer = build_synthesizer(config, teacher, student, DIGITS, "cpu", 10)
    assert synthesizer.objective.bn_momentum == 0.5
    images, targets = torch.randn(10, 1, 8, 8), torch.arange(10)
    with synthesizer.objective.round(adversarial=False) as loss:
        out = loss(images, targets)
    t_taps = teacher(images, return_taps=True)[1]
    s_taps = fold_bn(student)(images, return_taps=True)[1]
    _, rca, tar = reference.stars_loss([t_taps[0], t_taps[2]], [s_taps[0], s_taps[2]], thresholds=[-0.5, 0.25],
                                       weights=[1.0, 3.0], delta=0.5)
    assert float(out.terms["loss_rca"]) == pytest.approx(float(rca), rel=1e-4)
    assert float(out.terms["loss_tar"]) == pytest.approx(float(tar), rel=1e-4)
    assert [synthesizer.objective.stars_on(e) for e in range(4)] == [False, False, True, True]
    assert train.make_config({})["stars_start_epoch"] == 0  # the paper: STARS in every synthesis
    assert all(c["bn_mmt"] == 0.9 and c["stars_start_epoch"] == 0 for c in PAPER_PRESETS.values())  # NAYER's driver
    for bad, message in ((["--stars-layers", "0", "0"], "distinct"), (["--stars-layers", "0", "--stars-weights", "1", "2"],
                                                                       "one per layer"),
                         (["--stars-layers", "7"], "has 3 taps"), (["--method", "nayer", "--bn-mmt", "1"], r"\[0, 1\)")):
        with pytest.raises((SystemExit, ValueError), match=message):
            built = build_synthesizer(train.make_config(train.parse_args(bad)), teacher, student, DIGITS, "cpu", 4)
            with built.objective.round() as loss:
                loss(torch.randn(4, 1, 8, 8), torch.arange(4))


# --------------------------------------------------------------------------------- presets

def test_every_table_row_has_a_preset_and_every_preset_builds_a_config():
    rows = {f"{m}-{d}-{t}" for m in ("deepinv", "cmi", "nayer") for d in ("cifar10", "cifar100") for t in PAPER_PAIRS}
    rows |= {"cmi-tiny-imagenet-resnet34", "nayer-tiny-imagenet-resnet34"}
    assert set(PAPER_PRESETS) == rows
    for name in train.PRESETS:
        config = train.make_config(train.parse_args(["--preset", name, "--teacher-ckpt", "t.pth"]))
        assert config["preset"] == name and config["method"] in train.METHODS
        if name in PAPER_PRESETS:
            assert (config["T"], config["seed"], config["stars"], config["lambda_rca"], config["lambda_tar"],
                    config["delta"], config["quantiles"]) == (4, 0, True, 1.0, 1.0, 0.5, [0.6, 0.7, 0.8, 0.9, 0.95])
            assert config["student"] == PAPER_PAIRS[config["teacher"]]
            for key, value in APPENDIX_A[config["method"]].items():
                if config["dataset"] != "tiny-imagenet":
                    assert config[key] == value, (name, key)


def test_appendix_a_values_of_cmi_and_nayer():
    cmi = train.make_config(train.parse_args(["--preset", "cmi-cifar100-vgg16", "--teacher-ckpt", "t.pth"]))
    assert (cmi["epochs"], cmi["warmup"], cmi["kd_steps"], cmi["ep_steps"], cmi["g_steps"], cmi["batch_size"],
            cmi["synthesis_batch_size"], cmi["lr"], cmi["lr_g"], cmi["adv"], cmi["bn"], cmi["oh"], cmi["cr"],
            cmi["cr_T"], cmi["kd_T"]) == (200, 0, 400, 400, 200, 256, 256, 0.1, 1e-3, 0.5, 1.0, 1.0, 0.8, 0.2, 20.0)
    nayer = train.make_config(train.parse_args(["--preset", "nayer-cifar10-resnet19", "--teacher-ckpt", "t.pth"]))
    assert (nayer["epochs"], nayer["warmup"], nayer["lr"], nayer["lr_g"], nayer["adv"], nayer["bn"], nayer["oh"],
            nayer["kd_steps"], nayer["ep_steps"], nayer["g_steps"], nayer["g_life"], nayer["g_loops"],
            nayer["gwp_loops"]) == (320, 20, 0.2, 4e-3, 1.33, 20.0, 0.75, 1000, 1000, 75, 10, 4, 10)
    assert nayer["memory_size"] == (20 * 10 + 300 * 4) * 400  # every image the run makes
    tiny = train.make_config(train.parse_args(["--preset", "nayer-tiny-imagenet-resnet34", "--teacher-ckpt", "t"]))
    assert (tiny["dataset"], tiny["teacher"], tiny["student"], tiny["g_steps"], tiny["gwp_loops"], tiny["batch_size"],
            tiny["synthesis_batch_size"], tiny["lr"], tiny["bn"], tiny["oh"]) == \
        ("tiny-imagenet", "resnet34", "s_resnet18", 60, 20, 256, 200, 0.1, 10.0, 0.5)
    cmi_tiny = train.make_config(train.parse_args(["--preset", "cmi-tiny-imagenet-resnet34", "--teacher-ckpt", "t"]))
    assert {k: cmi_tiny[k] for k in APPENDIX_A["cmi"]} == APPENDIX_A["cmi"]


def test_method_without_preset_starts_from_its_digits_preset_and_flags_win():
    config = train.make_config(train.parse_args(["--method", "nayer", "--g-loops", "3"]))
    expected = train.PRESETS["nayer-digits"]
    assert config["preset"] is None and config["dataset"] == "digits"
    assert (config["lr_g"], config["ngf"], config["le_emb_size"], config["g_loops"]) == \
        (expected["lr_g"], expected["ngf"], expected["le_emb_size"], 3)
    assert train.make_config(train.parse_args([]))["lr_g"] == train.PRESETS["deepinv-digits"]["lr_g"]


def test_list_presets_prints_a_row_per_preset(capsys):
    assert train.main(["--list-presets"]) is None
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["preset", "method", "dataset"] and len(lines) == 2 + len(train.PRESETS)
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == set(train.PRESETS)
    assert "g_life 10, g_loops 4, gwp_loops 10" in rows["nayer-cifar100-resnet34"]
    assert "cr 0.8, cr_T 0.2" in rows["cmi-tiny-imagenet-resnet34"]
    assert "--list-presets" in train.build_parser().format_help()
