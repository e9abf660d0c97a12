"""CMI and NAYER: generators, augmentations, the bank of negatives, NAYER's schedule and label
embeddings, tiny end-to-end digits runs of both through the CLI, and the presets."""
import json
import os
import time

import pytest
import torch

from stars_fast import models, train
from stars_fast.data import DATASETS
from stars_fast.presets import APPENDIX_A, PAPER_PAIRS, PAPER_PRESETS
from stars_fast.synthesis import StarsRegularizer
from stars_fast.synthesis.cmi import CMISynthesizer, FeatureBank, random_resized_crop_and_flip
from stars_fast.synthesis.generator import Generator, NoisyLayerGenerator, reset_generator
from stars_fast.synthesis.nayer import (NayerSynthesizer, balanced_targets, load_label_embedding,
                                        random_label_embedding)

DIGITS = DATASETS["digits"]
TINY = ["--epochs", "5", "--g-steps", "20", "--kd-steps", "40", "--ep-steps", "40", "--batch-size", "64",
        "--synthesis-batch-size", "64", "--lr", "0.5", "--ngf", "16", "--no-progress"]
TINY_METHODS = {
    "cmi": ["--method", "cmi", "--lr-g", "0.1", "--bn", "1"],
    "nayer": ["--method", "nayer", "--lr-g", "0.02", "--warmup", "0", "--g-loops", "1", "--le-emb-size", "256"],
}


@pytest.fixture
def pair(teacher_cache):
    teacher = models.freeze(train.digits_teacher("digits_cnn", DIGITS, "cpu", progress=False))
    student = models.build_student("digits_snn", 10, T=2, in_channels=1, backend="reference")
    return teacher, student


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
    synthesizer = CMISynthesizer(teacher, student, DIGITS, batch_size=6, iterations=3, lr_g=0.05, bn=1, oh=1,
                                 adv=0.5, cr=0.8, cr_T=0.2, ngf=4, head_dim=8, stars=StarsRegularizer(backend="reference"))
    first = synthesizer.synthesize()
    second = synthesizer.synthesize()
    assert first.images.shape == (6, 1, 8, 8) and len(synthesizer.bank) == 12
    assert synthesizer.bank.features.shape[1] == 2 * (16 + 32 + 64)  # local and global taps of the teacher
    assert second.losses["loss_cr"] > 0 and second.losses["loss_rca"] > 0
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
        counts.append(len(synthesizer.synthesize().images))
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
