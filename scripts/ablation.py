"""The STARS component ablation (the components of the paper's Table 3, in the offline digits setting,
not the paper's CIFAR-100 one) as a Markdown table.

    python scripts/ablation.py ablation.md                    # 4 variants x 3 seeds of `python -m stars_fast.train`
    python scripts/ablation.py ablation.md --seeds 0 1 2 3 4  # the README's table (5 seeds)
    python scripts/ablation.py ablation.md --lambdas 10 100   # BN-only and STARS at lambda_rca = lambda_tar = 10, 100
    python scripts/ablation.py ablation.md --quick            # the tiniest sizes: checks that it runs, not a result
    python scripts/ablation.py ablation.md -- --method nayer  # flags after `--` go to every run

Variants: BN-only (--no-stars), RCA only (--lambda-tar 0), TAR only (--lambda-rca 0), STARS (both
terms); with --lambdas, BN-only and STARS at each lambda instead. Each run is its own process with its own run folder under --runs; a finished run of the
same configuration is reused and an interrupted one resumed, so the script can be stopped and
started again (a folder holding another configuration is an error: pick another --runs). The table
gives the best epoch's student top-1 (the protocol of Fast-Datafree, NAYER and the paper) and the last
epoch's, as mean ± sample standard deviation over the seeds, the paired difference of each variant to
BN-only at the same seed (mean and 95% t-interval over the seeds), the median synthesis gradient norm
and the wall time of each run, and the command that produced it; it is rewritten after every seed (all
four variants of a seed run before the next seed), so a stopped ablation leaves a table of the
seeds it finished.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from typing import Dict, List

from scipy import stats

VARIANTS = (
    ("BN-only", ["--no-stars"]),
    ("RCA only", ["--lambda-tar", "0"]),
    ("TAR only", ["--lambda-rca", "0"]),
    ("STARS", []),
)
QUICK = ["--epochs", "3", "--g-steps", "10", "--kd-steps", "50", "--ep-steps", "50", "--batch-size", "64",
         "--synthesis-batch-size", "64"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from stars_fast import train  # noqa: E402

RUN_ONLY = ("out", "resume", "progress")  # keys of a run's configuration that do not change its result


def run_once(out: str, flags: List[str]) -> Dict:
    """The summary.json of `python -m stars_fast.train --out OUT FLAGS`, reusing or resuming what is there."""
    summary_path = os.path.join(out, "summary.json")
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        expected = train.make_config(train.parse_args(flags))
        saved = summary["config"]  # a flag added since the run was made is absent: its default held
        if any(saved[key] != value for key, value in expected.items() if key in saved and key not in RUN_ONLY):
            raise SystemExit(f"{out} holds a run of another configuration; pass another --runs")
        if summary["epochs_completed"] == summary["config"]["epochs"]:
            return summary
    resume = ["--resume"] if os.path.isfile(os.path.join(out, "checkpoint.pt")) else []
    command = [sys.executable, "-m", "stars_fast.train", "--out", out, "--no-progress", *resume, *flags]
    print("$", shlex.join(command), flush=True)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(command, check=True, env=env)
    with open(summary_path) as f:
        return json.load(f)


def mean_std(values: List[float], scale: float = 1.0, digits: int = 2) -> str:
    mean = statistics.mean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def paired_difference(values: List[float], baseline: List[float]) -> str:
    """mean of values - baseline over the seeds, in points, with its 95% t-interval."""
    diffs = [100 * (v - b) for v, b in zip(values, baseline)]
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return f"{mean:+.2f}"
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"


def markdown(rows: List[Dict], teacher_acc: float, command: str) -> str:
    lines = [
        "| variant | flags | best top-1 (%) | last top-1 (%) | best - BN-only (pp, 95% CI) | "
        "last - BN-only (pp, 95% CI) | per seed best / last (%) | synthesis grad norm (median) | "
        "term grad norms (share) | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    baseline = rows[0]
    for row in rows:
        is_baseline = row is baseline
        per_seed = ", ".join(f"{100 * b:.2f} / {100 * a:.2f}" for b, a in zip(row["best"], row["accs"]))
        grads = [g for g in row["grads"] if g is not None]
        lines.append(
            f"| {row['name']} | `{shlex.join(row['flags']) or '(defaults)'}` | {mean_std(row['best'], 100)} | "
            f"{mean_std(row['accs'], 100)} | {'-' if is_baseline else paired_difference(row['best'], baseline['best'])} | "
            f"{'-' if is_baseline else paired_difference(row['accs'], baseline['accs'])} | {per_seed} | "
            f"{f'{statistics.median(grads):.3g}' if grads else '-'} | {term_norms(row['terms'])} | "
            f"{mean_std(row['times'], digits=1)} |")
    lines += ["", f"Teacher top-1: {100 * teacher_acc:.2f}%. Mean ± sample standard deviation over "
              f"{len(rows[0]['accs'])} seeds; differences paired by seed; the gradient norm is the median over the "
              "seeds of each run's median per-step norm on the synthesized variables (metrics.jsonl); wall time of "
              "the training (summary.json's wall_time_s); term grad norms (with --grad-shares): each loss term's own "
              "gradient norm, median over epochs then seeds, and its share of their sum. Produced by:",
              "", "```bash", command, "```", ""]
    return "\n".join(lines)


def median_over_epochs(out: str, key: str):
    """The median over a run's epochs of metrics.jsonl's `key` (None where no epoch has it)."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        values = [json.loads(line).get(key) for line in f]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


TERMS = ("bn", "oh", "adv", "rca", "tar", "cr", "tv", "l2")  # grad_<term> of --grad-shares


def term_norms(rows_terms: List[Dict[str, float]]) -> str:
    """Each term's gradient norm (median over the seeds) and its share of their sum, or '-'."""
    names = [t for t in TERMS if any(t in r for r in rows_terms)]
    if not names:
        return "-"
    medians = {t: statistics.median([r[t] for r in rows_terms if t in r]) for t in names}
    total = sum(medians.values())
    return ", ".join(f"{t} {v:.3g} ({100 * v / total:.1f}%)" for t, v in medians.items())


def main(argv=None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)  # the flags after `--` go to every run
    own, extra = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="the Markdown file to write")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of each variant")
    parser.add_argument("--runs", default=os.path.join("runs", "ablation"), help="folder of the run folders")
    parser.add_argument("--quick", action="store_true", help=f"append {' '.join(QUICK)} (a smoke test)")
    parser.add_argument("--lambdas", type=float, nargs="+",
                        help="instead of the components: BN-only and STARS at lambda_rca = lambda_tar = each value")
    args = parser.parse_args(own)
    common = extra + (QUICK if args.quick else [])

    variants = VARIANTS
    if args.lambdas:
        variants = [VARIANTS[0]] + [(f"STARS lambda {lam:g}", ["--lambda-rca", f"{lam:g}", "--lambda-tar", f"{lam:g}"])
                                    for lam in args.lambdas]
    rows = [{"name": name, "flags": flags, "accs": [], "best": [], "grads": [], "terms": [], "times": []}
            for name, flags in variants]
    command = shlex.join(["python", "scripts/ablation.py", *argv])
    text = ""
    for seed in args.seeds:  # seed-major, so that a stopped ablation has every variant at the same seeds
        for row in rows:
            tag = row["name"].lower().replace(" ", "-")
            out = os.path.join(args.runs, f"{tag}-seed{seed}")
            summary = run_once(out, [*common, *row["flags"], "--seed", str(seed)])
            row["accs"].append(summary["student_acc"])
            row["best"].append(summary["best_student_acc"])
            row["grads"].append(median_over_epochs(out, "synth_grad_median"))
            terms = {t: median_over_epochs(out, f"grad_{t}") for t in TERMS}
            row["terms"].append({t: v for t, v in terms.items() if v is not None})
            row["times"].append(summary["wall_time_s"])
            teacher_acc = summary["teacher_acc"]
        text = markdown(rows, teacher_acc, command)  # the table so far, rewritten after every seed
        tmp = f"{args.output}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.output)
    print(text)
    return text


if __name__ == "__main__":
    main()
