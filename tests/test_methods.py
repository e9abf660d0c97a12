"""CMI and NAYER: generators, augmentations, the bank of negatives, NAYER's schedule and label
embeddings, tiny end-to-end digits runs of both through the CLI, and the presets."""
import json
import os
import time

import pytest
import torch

from stars_fast import train
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
