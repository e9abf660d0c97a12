"""The configurations of `python -m stars_fast.train`: the offline default (DEFAULTS) and the named
presets (PRESETS, `--preset NAME`).

The paper's presets carry Appendix A's values, one per row of Tables 1 and 2:

    {deepinv, cmi, nayer}-{cifar10, cifar100}-{vgg16, resnet34, resnet19}   (teacher -> its student:
        vgg16 -> s_vgg16, resnet34 -> s_resnet18, resnet19 -> s_resnet19)
    {cmi, nayer}-tiny-imagenet-resnet34                                     (-> s_resnet18, 64 px)

all with T = 4, seed 0, and STARS on with lambda_rca = lambda_tar = 1, delta = 0.5 and teacher
quantiles (0.6, 0.7, 0.8, 0.9, 0.95) on every tap with equal weights, from the first epoch on (the
paper's Algorithm 1 adds STARS to every synthesis and names no delay). Where Appendix A is silent
the original code's defaults fill in: KD temperature 20 for NAYER (NAYER's default), NAYER's BN
momentum 0.9 (its driver's --bn_mmt), NAYER's batch sizes on CIFAR (512 for KD, 400
per synthesized batch: its published scripts), generator width 64 and NAYER's latent size 1000
(CMI's bank of 40960 negatives, 4096 per step, and its 256-wide head are fixed in cmi.py, as in
Fast-Datafree's script). The synthetic memory keeps every image the run makes, as the original
image pools do.

`{deepinv, cmi, nayer}-digits` are the offline default and its CMI / NAYER counterparts, sized to
run in minutes on a CPU (ours, not the paper's); `--method cmi` or `--method nayer` without a
preset starts from the method's digits preset.
"""
from __future__ import annotations

from typing import Dict

# the paper's teacher quantiles of the TAR thresholds (equal to stars_fast.ops.stars.DEFAULT_QUANTILES, tested;
# written out so that the CLI's --help need not import torch)
DEFAULT_QUANTILES = (0.6, 0.7, 0.8, 0.9, 0.95)

METHODS = ("deepinv", "cmi", "nayer")  # the synthesizers of --method

# The offline default (digits), tuned on 2 shared CPU cores: about 7 s an epoch when the cores are free.
# Departures from Appendix A, for 8x8 digits and a short run: bn 1 (bn 10 leaves the one-hot loss
# unfitted after 30 steps), lr 0.5 (the small SNN learns much faster), 30 synthesis steps per batch.
DEFAULTS: Dict[str, object] = {
    "preset": None, "method": "deepinv",
    "stars": True, "lambda_rca": 1.0, "lambda_tar": 1.0, "quantiles": list(DEFAULT_QUANTILES), "delta": 0.5,
    "tar_normalize": False, "thresholds": None, "stars_layers": None, "stars_weights": None, "stars_start_epoch": 0,
    "teacher": "digits_cnn", "teacher_ckpt": None, "student": "digits_snn", "T": 4, "neuron": "lif",
    "dataset": "digits", "data_root": None,
    "epochs": 15, "warmup": 0, "batch_size": 128, "synthesis_batch_size": 128,
    "lr": 0.5, "lr_g": 0.1, "weight_decay": 1e-4,
    "g_steps": 30, "kd_steps": 50, "ep_steps": 50,
    "adv": 1.0, "bn": 1.0, "oh": 1.0, "tv": 0.0, "l2": 0.0, "kd_T": 20.0, "memory_size": 51200,
    "ngf": 64, "cr": 0.8, "cr_T": 0.2, "g_life": 10, "g_loops": 1, "gwp_loops": 1, "label_embedding": None,
    "le_emb_size": 1000, "bn_mmt": 0.9,
    "seed": 0, "device": "auto", "backend": "auto", "amp": False, "threads": 0, "grad_shares": 0,
    "dist_timeout": 300,
    "out": None, "resume": False, "progress": True,
}
RUN_KEYS = ("preset", "out", "resume", "progress")  # what a preset never sets

STARS = {"stars": True, "lambda_rca": 1.0, "lambda_tar": 1.0, "quantiles": list(DEFAULT_QUANTILES), "delta": 0.5,
         "tar_normalize": False, "thresholds": None, "stars_layers": None, "stars_weights": None,
         "stars_start_epoch": 0}
PAPER_PAIRS = {"vgg16": "s_vgg16", "resnet34": "s_resnet18", "resnet19": "s_resnet19"}

# Appendix A, per method (CIFAR-10 and CIFAR-100 share them; so do the three pairs)
APPENDIX_A: Dict[str, Dict[str, object]] = {
    "deepinv": {"epochs": 200, "warmup": 0, "kd_steps": 400, "ep_steps": 400, "g_steps": 1000, "batch_size": 256,
                "synthesis_batch_size": 256, "lr": 0.1, "lr_g": 0.1, "adv": 1.0, "bn": 10.0, "oh": 1.0, "kd_T": 20.0},
    "cmi": {"epochs": 200, "warmup": 0, "kd_steps": 400, "ep_steps": 400, "g_steps": 200, "batch_size": 256,
            "synthesis_batch_size": 256, "lr": 0.1, "lr_g": 1e-3, "adv": 0.5, "bn": 1.0, "oh": 1.0, "cr": 0.8,
            "cr_T": 0.2, "kd_T": 20.0},
    "nayer": {"epochs": 320, "warmup": 20, "kd_steps": 1000, "ep_steps": 1000, "g_steps": 75, "g_life": 10,
              "g_loops": 4, "gwp_loops": 10, "batch_size": 512, "synthesis_batch_size": 400, "lr": 0.2,
              "lr_g": 4e-3, "adv": 1.33, "bn": 20.0, "oh": 0.75, "kd_T": 20.0},
}
# Appendix A, Tiny-ImageNet (ResNet-34 -> S-ResNet-18): CMI as on CIFAR; NAYER's own values
APPENDIX_A_TINY_IMAGENET: Dict[str, Dict[str, object]] = {
    "cmi": APPENDIX_A["cmi"],
    "nayer": {**APPENDIX_A["nayer"], "g_steps": 60, "gwp_loops": 20, "batch_size": 256, "synthesis_batch_size": 200,
              "lr": 0.1, "adv": 1.33, "bn": 10.0, "oh": 0.5},
}
# what the original code uses where Appendix A says nothing
ORIGINAL_DEFAULTS = {"T": 4, "neuron": "lif", "seed": 0, "weight_decay": 1e-4, "tv": 0.0, "l2": 0.0, "ngf": 64,
                     "le_emb_size": 1000, "cr": 0.8, "cr_T": 0.2, "g_life": 10, "g_loops": 1, "gwp_loops": 1,
                     "label_embedding": None, "bn_mmt": 0.9}


def images_per_run(config: Dict[str, object]) -> int:
    """How many images a run synthesizes: rounds per epoch x batches per round x batch size."""
    rounds = config["ep_steps"] // config["kd_steps"]
    if config["method"] != "nayer":
        return config["epochs"] * rounds * config["synthesis_batch_size"]
    warmup = min(config["warmup"], config["epochs"])
    batches = warmup * config["gwp_loops"] + (config["epochs"] - warmup) * config["g_loops"]
    return rounds * batches * config["synthesis_batch_size"]


def paper_preset(method: str, dataset: str, teacher: str) -> Dict[str, object]:
    """The Appendix A configuration of one row of Table 1 or 2."""
    values = (APPENDIX_A_TINY_IMAGENET if dataset == "tiny-imagenet" else APPENDIX_A)[method]
    config = {**ORIGINAL_DEFAULTS, **STARS, **values, "method": method, "dataset": dataset, "teacher": teacher,
              "student": PAPER_PAIRS[teacher]}
    config["memory_size"] = images_per_run(config)
    return config


DIGITS_PRESETS: Dict[str, Dict[str, object]] = {
    "deepinv-digits": {key: value for key, value in DEFAULTS.items() if key not in RUN_KEYS},
}
# CMI and NAYER on digits: the default's schedule, a narrower generator (and latent) for 8x8 images,
# the generator learning rates that fit in 30 steps a batch, and the methods' own adversarial weights
DIGITS_PRESETS["cmi-digits"] = {**DIGITS_PRESETS["deepinv-digits"], "method": "cmi", "lr_g": 0.1, "adv": 0.5,
                                "ngf": 16}
DIGITS_PRESETS["nayer-digits"] = {**DIGITS_PRESETS["deepinv-digits"], "method": "nayer", "lr_g": 0.02, "adv": 1.33,
                                  "ngf": 16, "le_emb_size": 256}

PAPER_PRESETS: Dict[str, Dict[str, object]] = {
    **{f"{method}-{dataset}-{teacher}": paper_preset(method, dataset, teacher)
       for method in APPENDIX_A for dataset in ("cifar10", "cifar100") for teacher in PAPER_PAIRS},
    **{f"{method}-tiny-imagenet-resnet34": paper_preset(method, "tiny-imagenet", "resnet34")
       for method in APPENDIX_A_TINY_IMAGENET},
}
PRESETS: Dict[str, Dict[str, object]] = {**DIGITS_PRESETS, **PAPER_PRESETS}


def format_presets(presets: Dict[str, Dict[str, object]]) -> str:
    """A table of `presets` for `--list-presets`: one row each, the values that tell them apart."""
    def extras(config) -> str:
        if config["method"] == "cmi":
            return f"cr {config['cr']}, cr_T {config['cr_T']}"
        if config["method"] == "nayer":
            return f"g_life {config['g_life']}, g_loops {config['g_loops']}, gwp_loops {config['gwp_loops']}"
        return ""

    header = ("preset", "method", "dataset", "teacher -> student", "epochs (warm-up)", "g/kd/ep steps",
              "batch/synth", "lr/lr_g", "adv/bn/oh", "kd_T", "method options")
    rows = [header] + [(
        name, c["method"], c["dataset"], f"{c['teacher']} -> {c['student']}", f"{c['epochs']} ({c['warmup']})",
        f"{c['g_steps']}/{c['kd_steps']}/{c['ep_steps']}", f"{c['batch_size']}/{c['synthesis_batch_size']}",
        f"{c['lr']:g}/{c['lr_g']:g}", f"{c['adv']:g}/{c['bn']:g}/{c['oh']:g}", f"{c['kd_T']:g}", extras(c))
        for name, c in presets.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
