"""Command line of `python -m stars_fast.train`: the flags, and the configuration they layer onto.

DEFAULTS <- preset <- explicit flags (presets.py holds DEFAULTS and the Appendix-A presets).
This module imports no torch, so that --help answers at once; the model and dataset names are
written out here (tests check them against models.TEACHERS / STUDENTS and data.DATASETS).
"""
from __future__ import annotations

import argparse
import json
import math
from typing import Dict, List, Optional

from . import __version__
from .presets import DEFAULTS, METHODS, PRESETS

DATASET_NAMES = ("digits", "cifar10", "cifar100", "tiny-imagenet")
TEACHER_NAMES = ("resnet18", "resnet34", "resnet19", "resnet20", "vgg11", "vgg16", "digits_cnn")
STUDENT_NAMES = ("s_resnet18", "s_resnet19", "s_resnet20", "s_vgg16", "digits_snn")
MAX_AMBIGUOUS_T = 16  # --T above this is refused: it looks like Fast-Datafree's --T, the KD temperature (20)


def _time_steps(text: str) -> int:
    """--time-steps: an integer."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer number of time steps, got {text!r}") from None


def _fast_datafree_safe_T(text: str) -> int:
    """--T: the time steps, refused where it reads as Fast-Datafree's --T (a KD temperature like 20 or 4.0)."""
    note = ("--T is the student's number of time steps here; in Fast-Datafree --T is the KD temperature, "
            "which is --kd-T here")
    try:
        steps = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer. {note}") from None
    if steps > MAX_AMBIGUOUS_T:
        raise argparse.ArgumentTypeError(f"{steps} time steps? {note}. For more than {MAX_AMBIGUOUS_T} time "
                                         f"steps write --time-steps {steps}")
    return steps


def build_parser() -> argparse.ArgumentParser:
    """The CLI. Flags left out do not appear in the parsed namespace (defaults live in DEFAULTS)."""
    parser = argparse.ArgumentParser(
        prog="python -m stars_fast.train", argument_default=argparse.SUPPRESS, allow_abbrev=False,
        description="Data-free ANN-to-SNN knowledge distillation with DeepInversion, CMI or NAYER + STARS. "
                    "Without arguments: the offline digits default (a few minutes on a CPU). The defaults "
                    "shown are the offline default's (preset deepinv-digits); --method cmi or nayer without "
                    "--preset starts from cmi-digits or nayer-digits.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run folder: log.txt, metrics.jsonl, summary.json, checkpoint.pt, student.pth, best.pth, "
               "synthetic/ (the synthetic memory), synthetic_epochNNN.png, real_reference.png.\n"
               "Fast-Datafree users: its --T (KD temperature) is --kd-T here; --T here is the number of time steps.\n"
               "Several processes (DistributedDataParallel): torchrun --nproc_per_node N -m stars_fast.train ...\n"
               "Presets (Appendix A of the paper; --list-presets shows their values): " + ", ".join(PRESETS))
    parser.add_argument("--version", action="version", version=f"stars_fast {__version__}")
    parser.add_argument("--config", metavar="FILE",
                        help="take the flags from FILE: JSON or YAML with the flags' names as keys (--kd-T: kd_T), "
                             "or a run's summary.json (its configuration), to replay a run; flags given on the "
                             "command line override it; its out, resume and progress are not taken")

    def add(group, *flags, help, **kwargs):
        dest = kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_")
        default = DEFAULTS.get(dest)
        if default is not None and kwargs.get("action") not in ("store_true", "store_false"):
            help += f" (default: {' '.join(map(str, default)) if isinstance(default, list) else default})"
        group.add_argument(*flags, help=help, **kwargs)

    g = parser.add_argument_group("method and STARS")
    add(g, "--preset", choices=sorted(PRESETS), metavar="NAME",
        help="named hyperparameters of the paper's Appendix A; explicit flags override them "
             f"(default: <method>-digits). One of: {', '.join(PRESETS)}")
    add(g, "--list-presets", action="store_true", help="print every preset's values and exit")
    add(g, "--method", choices=METHODS,
        help="synthesizer: deepinv (DeepInversion), cmi (contrastive model inversion), nayer (noisy-layer generation)")
    add(g, "--stars", action=argparse.BooleanOptionalAction,
        help="add the STARS regularizers (RCA + TAR) to the synthesis loss")
    add(g, "--lambda-rca", type=float, help="weight of L_RCA (0 switches it off: TAR-only ablation)")
    add(g, "--lambda-tar", type=float, help="weight of L_TAR (0 switches it off: RCA-only ablation)")
    add(g, "--quantiles", type=float, nargs="+", metavar="Q", help="teacher quantiles that set the TAR thresholds")
    add(g, "--delta", type=float, help="TAR sigmoid softness delta")
    add(g, "--tar-normalize", action="store_true",
        help="standardize teacher and student features with the teacher's statistics before thresholding")
    add(g, "--thresholds", type=float, nargs="+", metavar="THETA",
        help="fixed TAR thresholds (shared by all layers; in standardized units with --tar-normalize) "
             "instead of the teacher quantiles")
    add(g, "--stars-layers", type=int, nargs="+", metavar="I",
        help="the layers S of STARS: 0-based indices of the stage taps (model(x, return_taps=True) order; "
             "e.g. 0 1 2 3 = layer1..layer4 of a ResNet-18/34) (default: all taps)")
    add(g, "--stars-weights", type=float, nargs="+", metavar="W",
        help="the layer weights w_l of Eq. 15 and 17, one per selected layer (default: equal)")
    add(g, "--stars-start-epoch", type=int,
        help="first epoch (0-based) whose synthesis includes STARS; earlier epochs synthesize without it. "
             "0 = every synthesis, as the paper's Algorithm 1 and Appendix A describe; e.g. 20 skips "
             "NAYER's warm-up, when the student is still untrained")

    g = parser.add_argument_group("models")
    add(g, "--teacher", choices=TEACHER_NAMES, help="teacher architecture (ANN)")
    add(g, "--teacher-ckpt", metavar="PATH",
        help="teacher weights (a Fast-Datafree checkpoint works); required except for digits, "
             "where a teacher is trained once and cached under $STARS_FAST_CACHE or ~/.cache/stars_fast")
    add(g, "--student", choices=STUDENT_NAMES,
        help="spiking student; with STARS it must tap as many stages as the teacher (the paper's pairs: "
             "vgg16 -> s_vgg16, resnet34 -> s_resnet18, resnet19 -> s_resnet19)")
    add(g, "--T", type=_fast_datafree_safe_T,
        help="number of simulation TIME STEPS of the spiking student (not a temperature: Fast-Datafree's --T, "
             f"the KD temperature, is --kd-T here; values above {MAX_AMBIGUOUS_T} are refused as ambiguous, "
             "use --time-steps for them)")
    add(g, "--time-steps", dest="T", type=_time_steps, help="the same as --T, any value")
    add(g, "--neuron", choices=("lif", "if", "plif"), help="spiking neuron of the student")

    g = parser.add_argument_group("data (evaluation only: the student never sees real images)")
    add(g, "--dataset", choices=DATASET_NAMES, help="evaluation dataset (and its shapes and normalization)")
    add(g, "--data-root", metavar="DIR", help="local folder of CIFAR / Tiny-ImageNet (never downloaded)")

    g = parser.add_argument_group("schedule")
    add(g, "--epochs", type=int, help="training epochs")
    add(g, "--warmup", type=int,
        help="epochs of synthesis only before KD starts (Fast-Datafree's warm-up; NAYER makes --gwp-loops "
             "batches a round then, without the adversarial term)")
    add(g, "--ep-steps", type=int, help="KD steps per epoch (ep_steps // kd_steps synthesis rounds per epoch)")
    add(g, "--kd-steps", type=int, help="KD steps after each synthesis round")
    add(g, "--g-steps", type=int, help="optimization steps per synthesized batch")
    add(g, "--batch-size", type=int, help="KD batch size (all processes together)")
    add(g, "--synthesis-batch-size", type=int, help="images per synthesized batch (all processes together)")
    add(g, "--memory-size", type=int, help="most synthetic images kept for KD (oldest dropped first)")

    g = parser.add_argument_group("optimization and losses")
    add(g, "--lr", type=float, help="student learning rate (SGD, momentum 0.9, cosine decay)")
    add(g, "--weight-decay", type=float, help="student weight decay")
    add(g, "--lr-g", type=float,
        help="learning rate of the synthesis (Adam): of the images (deepinv), of the generator (cmi, nayer)")
    add(g, "--adv", type=float, help="weight of the adversarial (student-teacher disagreement) loss")
    add(g, "--bn", type=float, help="weight of the BN-statistics loss")
    add(g, "--oh", type=float, help="weight of the one-hot (cross-entropy) loss")
    add(g, "--tv", type=float, help="deepinv: weight of the total-variation image prior")
    add(g, "--l2", type=float, help="deepinv: weight of the L2 image prior")
    add(g, "--kd-T", type=float,
        help="KD TEMPERATURE of the distillation loss, KL(softmax(t/T) || softmax(s/T)) * T^2 "
             "(Fast-Datafree's --T); > 0")

    g = parser.add_argument_group("CMI and NAYER (generator-based synthesis)")
    add(g, "--ngf", type=int, help="generator width (Fast-Datafree's ngf)")
    add(g, "--cr", type=float, help="CMI: weight of the contrastive (InfoNCE) loss")
    add(g, "--cr-T", type=float, help="CMI: temperature of the contrastive loss")
    add(g, "--g-life", type=int, help="NAYER: epochs between rebuilds of the generator")
    add(g, "--g-loops", type=int, help="NAYER: batches synthesized per round after the warm-up")
    add(g, "--gwp-loops", type=int, help="NAYER: batches synthesized per round during the warm-up")
    add(g, "--le-emb-size", type=int, help="NAYER: width of the noisy layers' output (the generator's latent)")
    add(g, "--bn-mmt", type=float,
        help="NAYER: BN momentum m; after the first batch the BN target is (1 - m) x the batch statistics "
             "+ m x a moving average of earlier batches' (0 = plain BN loss)")
    add(g, "--label-embedding", metavar="PATH",
        help="NAYER: per-class embeddings [num_classes, D] (row i: class i): NAYER's label_embedding/*_le.pickle "
             "or a torch.save file, read without executing code; make one with python -m stars_fast.label_embedding. "
             "Default: a fixed random N(0, 1) embedding with D = 512 (seed 0)")

    g = parser.add_argument_group("run")
    add(g, "--seed", type=int, help="random seed")
    add(g, "--device", help="auto, cpu, cuda, cuda:N (under torchrun: auto, cpu or cuda; each process takes "
                            "cuda:LOCAL_RANK)")
    add(g, "--backend", choices=("auto", "cpu", "cuda", "triton", "reference"),
        help="backend of the fused ops (neurons, STARS loss)")
    add(g, "--amp", action="store_true", help="bfloat16 autocast for the forward passes")
    add(g, "--threads", type=int,
        help="CPU threads of PyTorch; 0 picks 1 for digits (fastest for its small models, and safe on "
             "shared cores, where several threads slow down badly) and PyTorch's default otherwise")
    add(g, "--out", metavar="DIR", help="run folder (default: runs/<timestamp>)")
    add(g, "--resume", action="store_true",
        help="continue the run in --out from its checkpoint.pt up to --epochs, with the run's saved "
             "configuration (flags given again override it); starts the run if there is no checkpoint")
    add(g, "--no-progress", dest="progress", action="store_false",
        help="no progress bars (the one line per epoch is still printed; bars are shown only on a terminal)")
    add(g, "--dist-timeout", type=int, metavar="S",
        help="under torchrun: seconds a process waits for the others in a collective before the job stops "
             "with a message (a stalled or killed process)")
    add(g, "--grad-shares", type=int, metavar="N",
        help="every N-th synthesis step, also the gradient norm of each weighted loss term on the synthesized "
             "variables (one extra backward per term) into metrics.jsonl as grad_<term> (0: off, the default)")
    add(g, "--tensorboard", action="store_true",
        help="also write the metrics as TensorBoard scalars to <out>/tensorboard")
    add(g, "--export-synthetic", metavar="DIR",
        help="after the run, write its synthetic images as PNGs in ImageFolder layout (DIR/<class>/NNNNNNN.png); "
             "with --resume on a finished run, only exports")
    return parser


def parse_args(argv: Optional[List[str]] = None) -> Dict[str, object]:
    """Only the flags given on the command line, as {dest: value}; with --config FILE, FILE's flags
    under them."""
    explicit = vars(build_parser().parse_args(argv))
    path = explicit.pop("config", None)
    return explicit if path is None else {**read_config(path), **explicit}


CONFIG_RUN_KEYS = ("out", "resume", "progress", "list_presets", "export_synthetic")  # a run's, not a replay's


def read_config(path: str) -> Dict[str, object]:
    """The flags of a --config file (JSON, YAML, or a run's summary.json), checked against the flags'
    names and types; SystemExit with one line naming the file and the key."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise SystemExit(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except ValueError:
        import yaml  # a dependency; imported here so that --help stays free of it

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SystemExit(f"--config {path}: neither JSON nor YAML ({str(exc).splitlines()[0]})") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and "result_row" in data:
        data = data["config"]  # a run's summary.json
    if not isinstance(data, dict):
        raise SystemExit(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    unknown = sorted(key for key in data if key not in DEFAULTS and key not in CONFIG_RUN_KEYS
                     and key != "resume_changes")
    if unknown:
        raise SystemExit(f"--config {path}: unknown flags {', '.join(unknown)} (keys are the flags' names with _ "
                         f"for -, as --kd-T: kd_T)")
    config = {key: value for key, value in data.items() if key in DEFAULTS and key not in CONFIG_RUN_KEYS}
    for key, value in config.items():
        _check_type(path, key, value)
    return config


def _check_type(path: str, key: str, value) -> None:
    """The value's type is the flag's: that of its default (numbers: int for an int flag, int or float for
    a float one), a list of numbers for a list flag; None where the flag may be unset."""
    default = DEFAULTS[key]
    if value is None:
        if default is not None and not isinstance(default, list):
            raise SystemExit(f"--config {path}: {key} cannot be null")
        return
    if isinstance(default, bool):
        expected, ok = "true or false", isinstance(value, bool)
    elif isinstance(default, int):
        expected, ok = "an integer", isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        expected, ok = "a number", isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, list) or key in ("thresholds", "stars_layers", "stars_weights"):
        expected = "a list of numbers"
        ok = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    else:
        expected, ok = "a string", isinstance(value, str)
    if not ok:
        raise SystemExit(f"--config {path}: {key} must be {expected}, got {value!r}")


def make_config(explicit: Dict[str, object], base: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """DEFAULTS <- preset (by default the method's digits preset) <- explicit flags (or `base`, a resumed
    run's config, <- explicit flags)."""
    if base is None:
        preset = explicit.get("preset")
        base = {**DEFAULTS, **PRESETS[preset or f"{explicit.get('method', DEFAULTS['method'])}-digits"],
                "preset": preset}
    config = {**base, **explicit}
    config["quantiles"] = [float(q) for q in config["quantiles"]]
    _check_config(config)
    return config


# floats that must be > 0 (a division by them, or a step size) and >= 0 (loss weights); all must be finite
POSITIVE_FLOATS = ("lr", "lr_g", "kd_T", "delta", "cr_T")
NON_NEGATIVE_FLOATS = ("weight_decay", "adv", "bn", "oh", "tv", "l2", "cr", "lambda_rca", "lambda_tar")


def _check_config(config: Dict[str, object]) -> None:
    """SystemExit with one line for a configuration that cannot run, or can only give NaN."""
    for key in ("epochs", "ep_steps", "kd_steps", "g_steps", "batch_size", "synthesis_batch_size", "T",
                "memory_size", "ngf", "g_life", "g_loops", "gwp_loops", "le_emb_size"):
        if int(config[key]) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1, got {config[key]}")
    for key, value in config.items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise SystemExit(f"--{key.replace('_', '-')} must be finite, got {value}")
    for key in POSITIVE_FLOATS:
        if config[key] <= 0:
            raise SystemExit(f"--{key.replace('_', '-')} must be > 0, got {config[key]}"
                             + (" (the KD loss divides the logits by it)" if key == "kd_T" else ""))
    for key in NON_NEGATIVE_FLOATS:
        if config[key] < 0:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 0, got {config[key]}")
    if not all(0.0 <= q <= 1.0 for q in config["quantiles"]):
        raise SystemExit(f"--quantiles must lie in [0, 1], got {config['quantiles']}")
    if not 0 <= config["warmup"] < config["epochs"]:
        raise SystemExit(f"--warmup ({config['warmup']}) must be >= 0 and < --epochs ({config['epochs']}): "
                         "KD starts after the warm-up epochs, so this run would never distill")
    if not 0 <= config["seed"] < 2 ** 63 - 2 ** 16:  # torch's seeds are 64-bit; each process adds its rank
        raise SystemExit(f"--seed must be in [0, 2^63 - 2^16), got {config['seed']}")
    if config["dist_timeout"] < 1:
        raise SystemExit(f"--dist-timeout must be >= 1 second, got {config['dist_timeout']}")
    if config["grad_shares"] < 0:
        raise SystemExit(f"--grad-shares must be >= 0 (0: off), got {config['grad_shares']}")
    if config["threads"] < 0:
        raise SystemExit(f"--threads must be >= 0, got {config['threads']}")
    if config["ep_steps"] < config["kd_steps"]:
        raise SystemExit(f"--ep-steps ({config['ep_steps']}) must be >= --kd-steps ({config['kd_steps']})")
    if config["dataset"] != "digits" and config["teacher_ckpt"] is None:
        raise SystemExit(f"--dataset {config['dataset']} needs a pretrained teacher: pass --teacher-ckpt PATH")
