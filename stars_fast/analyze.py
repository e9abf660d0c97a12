"""`python -m stars_fast.analyze RUN_DIR`: figures of a finished (or running) run, written into the run folder.

  curves.png         test top-1 (student, best, teacher) and the loss terms per epoch (metrics.jsonl)
  gradients.png      the synthesis steps' gradient norm per epoch (median, max, spikes), and with
                     --grad-shares each loss term's share of the summed term gradient norms
  tsne.png           t-SNE of the student's penultimate features on test images, coloured by class
                     (the paper's Fig. 2)
  firing_rates.png   mean firing rate of every spiking layer of the student, on real test images and on
                     the run's synthetic images
  tail_masses.png    per STARS layer, the teacher's and the student's soft tail masses
                     p^m = mean_{b,c} sigmoid((z - theta_m) / delta) at the TAR thresholds theta_m
                     (teacher quantiles q_m, or the run's fixed thresholds), on real and on synthetic images:
                     the mismatch L_TAR penalizes (docs/design.md 2.2; the paper's Sec. 3)
  analysis.json      the numbers behind every figure

The teacher is the run's (--teacher-ckpt, or the cached digits teacher), the student student.pth
(--model best: best.pth). Plots use matplotlib (pip install matplotlib) with the Agg backend.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

from .cli import DATASET_NAMES

# metrics.jsonl entries that are not loss terms (besides the gradient statistics, GRADIENT_PREFIXES)
NOT_LOSSES = ("epoch", "student_acc", "best_acc", "teacher_acc", "lr", "time_s", "memory_size", "synthesis_time_s")
GRADIENT_PREFIXES = ("synth_grad_", "grad_")


def is_loss(key: str) -> bool:
    return key not in NOT_LOSSES and not key.startswith(GRADIENT_PREFIXES)


def gradient_shares(series: Dict[str, List[Optional[float]]]) -> Dict[str, List[Optional[float]]]:
    """Per epoch, each term's gradient norm (grad_<term>, --grad-shares) over the sum of all terms' norms."""
    terms = [k for k in series if k.startswith("grad_")]
    shares = {}
    for key in terms:
        shares[key[5:]] = [None if series[key][i] is None else
                           series[key][i] / max(sum(series[k][i] or 0.0 for k in terms), 1e-30)
                           for i in range(len(series["epoch"]))]
    return shares


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stars_fast.analyze", allow_abbrev=False,
        description="Write figures of a run into its folder: accuracy and loss curves, a t-SNE of the student's "
                    "penultimate features on the test split (the paper's Fig. 2), per-layer firing rates, and "
                    "teacher-vs-student tail masses at the TAR thresholds on real and synthetic images; the "
                    "numbers behind them go to analysis.json. Needs matplotlib (the 'plots' extra).",
        epilog="Files written: curves.png, tsne.png, firing_rates.png, tail_masses.png, analysis.json")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder of python -m stars_fast.train (--out)")
    parser.add_argument("--dataset", choices=DATASET_NAMES, help="test set (default: the run's)")
    parser.add_argument("--data-root", metavar="DIR", help="folder holding CIFAR / Tiny-ImageNet (default: the run's)")
    parser.add_argument("--model", choices=("last", "best"), default="last",
                        help="the student to analyze: student.pth (last, default) or best.pth")
    parser.add_argument("--max-images", type=int, default=1000, metavar="N",
                        help="test (and synthetic) images used, a fixed random subset (default: 1000)")
    parser.add_argument("--batch-size", type=int, default=200, help="batch size of the forward passes (default: 200)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    return parser


# ------------------------------------------------------------------------------------------- numbers

def read_metrics(path: str) -> List[Dict[str, object]]:
    """metrics.jsonl -> one dict per epoch (a half-written last line of a running job is skipped)."""
    records = []
    with open(path) as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                break
            raise ValueError(f"{path}, line {number}: not JSON") from None
        if not isinstance(record, dict) or "epoch" not in record:
            raise ValueError(f"{path}, line {number}: not a metrics record (no 'epoch')")
        records.append(record)
    return records


def curves(records: List[Dict[str, object]]) -> Dict[str, List[Optional[float]]]:
    """Per-epoch series: epoch, accuracies, and every numeric loss term present in some epoch."""
    keys = ["epoch", "student_acc", "best_acc", "lr"]
    keys += sorted({k for r in records for k, v in r.items()
                    if k not in NOT_LOSSES and isinstance(v, (int, float)) and not isinstance(v, bool)})
    series = {}
    for key in keys:
        values = [r.get(key) for r in records]
        series[key] = [float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None for v in values]
    return series


def tail_masses(zt, zs, *, quantiles: Sequence[float], thresholds: Optional[Sequence[float]], delta: float,
                normalize: bool, eps: float = 0.0) -> Dict[str, List[float]]:
    """TAR's tail masses of one layer over a whole image set: theta_m = quantile(zT, q_m) (or the fixed
    thresholds), p^m = mean sigmoid((z - theta_m) / delta) for teacher and student, and the plain fractions
    of features above theta_m. normalize: both standardized first as the loss does (teacher_std_floored)."""
    import torch

    from .reference import teacher_std_floored

    zt, zs = zt.double(), zs.double()
    if normalize:
        shift, scale = zt.mean(), 1.0 / teacher_std_floored(zt, eps)
        zt, zs = (zt - shift) * scale, (zs - shift) * scale
    if thresholds is None:
        theta = torch.quantile(zt.flatten(), torch.tensor(list(quantiles), dtype=zt.dtype))
    else:
        theta = torch.tensor(list(thresholds), dtype=zt.dtype)

    def soft(z):
        return torch.sigmoid((z.flatten()[:, None] - theta) / delta).mean(0)

    def above(z):
        return (z.flatten()[:, None] > theta).double().mean(0)

    return {"theta": theta.tolist(), "teacher": soft(zt).tolist(), "student": soft(zs).tolist(),
            "teacher_above": above(zt).tolist(), "student_above": above(zs).tolist()}


def _subset(count: int, limit: int, seed: int = 0):
    import torch

    if count <= limit:
        return torch.arange(count)
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


class _Probe:
    """Forward hooks on a student: per spiking layer its spike count and size; the input of its last Linear
    (the penultimate features, averaged over the T steps as the logits are)."""

    def __init__(self, student):
        import torch

        from .models import Spiking

        self.student, self.counts, self.sizes, self.features = student, {}, {}, []
        self.handles = []
        for name, module in student.named_modules():
            if isinstance(module, Spiking):
                self.handles.append(module.register_forward_hook(self._spikes(name)))
        linears = [m for m in student.modules() if isinstance(m, torch.nn.Linear)]
        if linears:
            self.handles.append(linears[-1].register_forward_pre_hook(self._penultimate))

    def _spikes(self, name):
        def hook(module, inputs, output):
            self.counts[name] = self.counts.get(name, 0.0) + float(output.detach().double().sum())
            self.sizes[name] = self.sizes.get(name, 0) + output.numel()
        return hook

    def _penultimate(self, module, inputs):
        x = inputs[0].detach()
        steps = getattr(self.student, "T", 1)
        self.features.append(x.unflatten(0, (steps, -1)).mean(0).float().cpu())

    def rates(self) -> Dict[str, float]:
        return {name: self.counts[name] / self.sizes[name] for name in self.counts}

    def close(self):
        for handle in self.handles:
            handle.remove()


def run_models(teacher, student, images, *, batch_size: int, device) -> Dict[str, object]:
    """Teacher and student over normalized `images` [N, C, H, W]: pooled taps of both (per layer [N, C_l]),
    the student's firing rates per spiking layer, its penultimate features [N, D] and predictions."""
    import torch

    probe = _Probe(student)
    taps_t, taps_s, predictions = [], [], []
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                batch = images[start:start + batch_size].to(device)
                _, zt = teacher(batch, return_taps=True)
                logits, zs = student(batch, return_taps=True)
                taps_t.append([z.float().cpu() for z in zt])
                taps_s.append([z.float().cpu() for z in zs])
                predictions.append(logits.argmax(1).cpu())
    finally:
        probe.close()
    layers = len(taps_t[0])
    return {"teacher_taps": [torch.cat([b[l] for b in taps_t]) for l in range(layers)],
            "student_taps": [torch.cat([b[l] for b in taps_s]) for l in range(layers)],
            "firing_rates": probe.rates(),
            "features": torch.cat(probe.features) if probe.features else None,
            "predictions": torch.cat(predictions)}


EXACT_TSNE_MAX_POINTS = 1000  # up to here the exact gradient (as fast at this size, and safe with duplicates)


def tsne_embedding(features, seed: int = 0):
    """2-D t-SNE (scikit-learn, PCA initialisation) of [N, D] features; perplexity min(30, (N - 1) / 3).
    Returns (coords [N, 2], perplexity), or (None, reason) when the features cannot be embedded: fewer than
    5 distinct rows (a silent last spiking layer gives all-zero features; Barnes-Hut t-SNE crashes on those)."""
    from sklearn.manifold import TSNE

    n, distinct = features.shape[0], features.unique(dim=0).shape[0]
    if distinct < 5:
        return None, (f"{distinct} distinct penultimate feature vector(s) among {n} images "
                      f"(is the student's last spiking layer silent?)")
    perplexity = min(30.0, (n - 1) / 3.0)
    method = "exact" if n <= EXACT_TSNE_MAX_POINTS else "barnes_hut"
    coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, method=method).fit_transform(
        features.double().numpy())
    return coords, perplexity


# ------------------------------------------------------------------------------------------- figures

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: str) -> None:
    """PNG via matplotlib, written atomically."""
    import io

    from .atomic import atomic_write_bytes

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def plot_curves(series, teacher_acc: Optional[float], path: str) -> None:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = series["epoch"]
    for key, label in (("student_acc", "student"), ("best_acc", "best student")):
        left.plot(epochs, [None if v is None else 100 * v for v in series[key]], marker="o", markersize=3, label=label)
    if teacher_acc is not None:
        left.axhline(100 * teacher_acc, color="gray", linestyle="--", label=f"teacher {100 * teacher_acc:.2f}%")
    left.set(xlabel="epoch", ylabel="test top-1 (%)", title="accuracy")
    left.legend()
    left.grid(alpha=0.3)
    losses = [k for k in series if is_loss(k)]
    values = [abs(v) for k in losses for v in series[k] if v is not None]
    for key in losses:
        right.plot(epochs, series[key], marker="o", markersize=3, label=key)
    if values and all(v is not None and v > 0 for k in losses for v in series[k]):
        right.set_yscale("log")
    elif any(values):  # zeros or negative terms (e.g. the adversarial one): log-like, linear near 0
        right.set_yscale("symlog", linthresh=min(v for v in values if v > 0))
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set(xlabel="epoch", ylabel="loss (symlog where a term is <= 0)", title="loss terms (epoch means)")
    if losses:
        right.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    right.grid(alpha=0.3)
    _save(figure, path)
    plt.close(figure)


def plot_gradients(series, path: str) -> bool:
    """gradients.png: the synthesis gradient norm per epoch and, where measured, the terms' shares.
    False (nothing drawn) for a run without the statistics (written before they existed)."""
    if not any(v is not None for v in series.get("synth_grad_median", [])):
        return False
    plt = _pyplot()
    shares = gradient_shares(series)
    figure, axes = plt.subplots(1, 2 if shares else 1, figsize=(11 if shares else 6, 4), squeeze=False)
    left = axes[0][0]
    epochs = series["epoch"]
    left.plot(epochs, series["synth_grad_median"], marker="o", markersize=3, label="median step")
    left.plot(epochs, series["synth_grad_max"], marker="^", markersize=3, label="largest step")
    spiky = [e for e, n in zip(epochs, series.get("synth_grad_spikes", [])) if n]
    if spiky:
        left.scatter(spiky, [m for e, m in zip(epochs, series["synth_grad_max"]) if e in spiky], color="red",
                     zorder=3, label="epoch with spikes")
    left.set(yscale="log", xlabel="epoch", ylabel="||grad|| on the synthesized variables",
             title="synthesis gradient norm")
    left.legend()
    left.grid(alpha=0.3)
    if shares:
        right = axes[0][1]
        for term, values in shares.items():
            right.plot(epochs, values, marker="o", markersize=3, label=term)
        right.set(xlabel="epoch", ylabel="share of the summed term norms", ylim=(0, 1),
                  title="gradient share of each loss term (--grad-shares)")
        right.legend(fontsize=8)
        right.grid(alpha=0.3)
    _save(figure, path)
    plt.close(figure)
    return True


def plot_tsne(coords, labels, names: Sequence[str], accuracy: float, path: str) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 6))
    classes = sorted(set(labels.tolist()))
    colormap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "turbo")
    for index, c in enumerate(classes):
        chosen = labels == c
        color = colormap(index % colormap.N if len(classes) <= 20 else index / max(1, len(classes) - 1))
        axis.scatter(coords[chosen, 0], coords[chosen, 1], s=6, color=color, label=names[c])
    if len(classes) <= 20:
        axis.legend(markerscale=3, fontsize=8, loc="best")
    axis.set(title=f"t-SNE of student penultimate features ({len(labels)} test images, top-1 {100 * accuracy:.1f}%)",
             xticks=[], yticks=[])
    _save(figure, path)
    plt.close(figure)


def plot_firing_rates(rates: Dict[str, Dict[str, float]], path: str) -> None:
    plt = _pyplot()
    layers = list(next(iter(rates.values())))
    figure, axis = plt.subplots(figsize=(max(6, 0.45 * len(layers) + 2), 4))
    width = 0.8 / len(rates)
    for index, (source, values) in enumerate(rates.items()):
        axis.bar([i + (index - (len(rates) - 1) / 2) * width for i in range(len(layers))],
                 [values[name] for name in layers], width=width, label=f"{source} images")
    axis.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=8)
    axis.set(ylabel="mean firing rate (spikes / neuron / step)", title="student firing rates per spiking layer")
    axis.legend()
    axis.grid(axis="y", alpha=0.3)
    _save(figure, path)
    plt.close(figure)


def plot_tail_masses(masses: Dict[str, List[Dict[str, List[float]]]], labels: Sequence[str], path: str) -> None:
    plt = _pyplot()
    sources = list(masses)
    layers = len(next(iter(masses.values())))
    figure, axes = plt.subplots(len(sources), layers, figsize=(3.2 * layers, 3.0 * len(sources)), squeeze=False)
    for row, source in enumerate(sources):
        for layer in range(layers):
            axis, values = axes[row][layer], masses[source][layer]
            positions = range(len(values["theta"]))
            axis.bar([p - 0.2 for p in positions], values["teacher"], width=0.4, label="teacher")
            axis.bar([p + 0.2 for p in positions], values["student"], width=0.4, label="student")
            axis.set_xticks(list(positions), labels, fontsize=8)
            axis.set_title(f"{source}: layer {layer + 1}", fontsize=9)
            if layer == 0:
                axis.set_ylabel("soft tail mass p^m")
            if row == len(sources) - 1:
                axis.set_xlabel("TAR threshold")
            axis.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    _save(figure, path)
    plt.close(figure)


# ------------------------------------------------------------------------------------------- command

def _fail(message: str):
    raise SystemExit(f"analyze: {message}")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Write the figures and analysis.json into RUN_DIR; returns the analysis."""
    args = build_parser().parse_args(argv)
    if args.max_images < 5:
        _fail(f"--max-images must be >= 5, got {args.max_images}")
    if args.batch_size < 1:
        _fail(f"--batch-size must be >= 1, got {args.batch_size}")
    run = args.run_dir
    for required in ("summary.json", "metrics.jsonl"):
        if not os.path.isfile(os.path.join(run, required)):
            _fail(f"{run} is not a run folder of stars_fast.train: no {required}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _fail("matplotlib is not installed: pip install matplotlib")

    import torch

    from . import models
    from .atomic import atomic_write_bytes
    from .data import DATASETS, DatasetFormatError, DatasetNotFoundError, class_names, load_dataset, normalize
    from .synthesis.memory import open_synthetic
    from .teacher_cache import load_run_teacher
    from .train import resolve_device

    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    config = summary.get("config") or {}
    try:
        records = read_metrics(os.path.join(run, "metrics.jsonl"))
    except ValueError as exc:
        _fail(str(exc))
    if not records:
        _fail(f"{run}/metrics.jsonl has no finished epoch yet")
    name = args.dataset or config.get("dataset")
    if name not in DATASETS:
        _fail(f"cannot tell the run's dataset ({name!r}): pass --dataset")
    info = DATASETS[name]
    data_root = args.data_root or config.get("data_root")
    device = resolve_device(args.device)
    if name == "digits":
        torch.set_num_threads(1)  # tiny tensors: one thread is faster than several on a shared CPU (as train)

    student_file = os.path.join(run, "student.pth" if args.model == "last" else "best.pth")
    try:
        student, meta = models.load_student(student_file)
    except (FileNotFoundError, ValueError) as exc:
        _fail(f"{student_file}: {str(exc).splitlines()[0]}")
    if meta["arch"] not in models.STUDENTS:  # the figures are a spiking student's (firing rates, pre-LIF taps)
        _fail(f"{student_file} is a {meta['arch']!r} teacher file, not a spiking student")
    if (meta["num_classes"], meta["in_channels"]) != (info.num_classes, info.in_channels):
        _fail(f"{student_file} has {meta['num_classes']} classes and {meta['in_channels']} input channels; "
              f"{name} has {info.num_classes} and {info.in_channels}")
    teacher = load_run_teacher(dict(config, progress=False), info, device, log=print)
    student = student.to(device)
    try:
        test_set = load_dataset(name, "test", data_root)
    except (DatasetNotFoundError, DatasetFormatError) as exc:
        _fail(str(exc))
    chosen = _subset(len(test_set), args.max_images)
    real_images = torch.stack([test_set[i][0] for i in chosen.tolist()])
    real_labels = test_set.labels[chosen]
    sources = {"real": real_images}
    skipped = {}
    try:
        pixels, _ = open_synthetic(run)
    except ValueError as exc:
        pixels, skipped["synthetic"] = None, f"the synthetic memory is unreadable ({exc})"
    if pixels is not None and pixels.shape[0] == 0:
        skipped["synthetic"] = "the synthetic memory is empty"
    if pixels is not None and pixels.shape[0] > 0:
        newest = pixels[-args.max_images:]
        sources["synthetic"] = normalize(newest.float() / 255.0, info)
    for what, why in skipped.items():
        print(f"no {what} images in firing_rates.png and tail_masses.png: {why}")

    outputs = {source: run_models(teacher, student, images, batch_size=args.batch_size, device=device)
               for source, images in sources.items()}
    quantiles = config.get("quantiles") or [0.6, 0.7, 0.8, 0.9, 0.95]
    thresholds = config.get("thresholds")
    delta = float(config.get("delta") or 0.5)
    normalize_tar = bool(config.get("tar_normalize"))
    masses = {source: [tail_masses(zt, zs, quantiles=quantiles, thresholds=thresholds, delta=delta,
                                   normalize=normalize_tar)
                       for zt, zs in zip(out["teacher_taps"], out["student_taps"])]
              for source, out in outputs.items()}
    real = outputs["real"]
    accuracy = float((real["predictions"] == real_labels).double().mean())
    names = class_names(name, data_root)
    series = curves(records)

    figures = {}
    figures["curves"] = os.path.join(run, "curves.png")
    plot_curves(series, summary.get("teacher_acc"), figures["curves"])
    if plot_gradients(series, os.path.join(run, "gradients.png")):
        figures["gradients"] = os.path.join(run, "gradients.png")
    else:
        print("no gradients.png: the run's metrics.jsonl has no synthesis gradient statistics")
    analysis: Dict[str, object] = {
        "run": os.path.abspath(run), "dataset": name, "model": os.path.basename(student_file),
        "student": {k: meta.get(k) for k in ("arch", "T", "neuron", "epoch", "acc")},
        "teacher": config.get("teacher"), "images": {s: int(v.shape[0]) for s, v in sources.items()},
        "curves": series, "gradient_shares": gradient_shares(series), "teacher_acc": summary.get("teacher_acc"),
        "skipped": skipped,
        "student_top1_on_subset": accuracy,
        "firing_rates": {s: out["firing_rates"] for s, out in outputs.items()},
        "tail_masses": {"quantiles": None if thresholds is not None else list(quantiles),
                        "thresholds": thresholds, "delta": delta, "normalize": normalize_tar, **masses},
    }
    coords, perplexity = tsne_embedding(real["features"]) if real["features"] is not None else (None, "no Linear")
    if coords is None:
        print(f"no t-SNE: {perplexity}")
        analysis["tsne"] = {"skipped": perplexity}
    else:
        figures["tsne"] = os.path.join(run, "tsne.png")
        plot_tsne(coords, real_labels.numpy(), names, accuracy, figures["tsne"])
        analysis["tsne"] = {"perplexity": perplexity, "labels": real_labels.tolist(),
                            "coords": [[round(float(x), 4), round(float(y), 4)] for x, y in coords]}
    if real["firing_rates"]:
        figures["firing_rates"] = os.path.join(run, "firing_rates.png")
        plot_firing_rates(analysis["firing_rates"], figures["firing_rates"])
    figures["tail_masses"] = os.path.join(run, "tail_masses.png")
    mass_labels = ([f"q={q:g}" for q in quantiles] if thresholds is None else [f"θ={t:g}" for t in thresholds])
    plot_tail_masses(masses, mass_labels, figures["tail_masses"])
    analysis["figures"] = {key: os.path.basename(path) for key, path in figures.items()}

    atomic_write_bytes(os.path.join(run, "analysis.json"), (json.dumps(analysis, indent=1) + "\n").encode())
    for path in figures.values():
        print(f"wrote {path}")
    print(f"wrote {os.path.join(run, 'analysis.json')}")
    return analysis


if __name__ == "__main__":
    main()
    sys.exit(0)
