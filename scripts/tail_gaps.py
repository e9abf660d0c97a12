"""Where STARS changes the synthesized data: teacher/student tail-mass gaps at the TAR thresholds, with
and without the STARS term, on the offline default (digits), as a Markdown table.

    python scripts/tail_gaps.py gaps.md --student runs/x/student.pth -- --method nayer

For each seed, one synthesis round of the method (its digits preset and the flags after `--`) is run
twice from the same random state, with the student of `--student` (a trained one: the gaps matter
where the student has learned something; default: a fresh student) and without / with STARS
(`--no-stars` / `--stars`). On each synthesized batch, per tapped layer l and TAR quantile q:
theta = the q-quantile of the teacher's pooled features z_T, and the hard tail masses
p_T = P(z_T > theta), p_S = P(z_S > theta) over the batch and channels (Eq. 16 with delta -> 0: the
firing-relevant exceedances of the paper's Sec. 3). The table gives mean over q of |p_S - p_T| per
layer, and L_RCA and L_TAR of the batch (Eq. 14-17, the soft exceedances STARS optimizes), as
mean ± std over the seeds.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from typing import Dict, List

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from stars_fast import models, reference, train  # noqa: E402
from stars_fast.data import DATASETS  # noqa: E402
from stars_fast.synthesis.factory import build_synthesizer  # noqa: E402


def tail_gaps(teacher, student, images: torch.Tensor, quantiles) -> Dict[str, List[float]]:
    """Per layer: mean over the quantiles of |P(z_S > theta_q) - P(z_T > theta_q)|; and L_RCA, L_TAR (delta 0.5)."""
    with torch.no_grad():
        t_taps = teacher(images, return_taps=True)[1]
        s_taps = models.fold_bn(student)(images, return_taps=True)[1]
        gaps = []
        for z_t, z_s in zip(t_taps, s_taps):
            thresholds = torch.quantile(z_t.flatten(), torch.tensor(quantiles))
            gaps.append(float(torch.stack([((z_s > th).float().mean() - (z_t > th).float().mean()).abs()
                                           for th in thresholds]).mean()))
        _, rca, tar = reference.stars_loss(t_taps, s_taps, quantiles=quantiles)
    return {"gaps": gaps, "rca": [float(rca)], "tar": [float(tar)]}


def mean_std(values: List[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def main(argv=None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    own, extra = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="the Markdown file to write")
    parser.add_argument("--student", help="a student.pth of a run (default: a fresh, untrained student)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(own)
    torch.set_num_threads(1)

    rows = {}
    for variant, flag in (("BN-only", "--no-stars"), ("STARS", "--stars")):
        config = train.make_config(train.parse_args([*extra, flag]))
        info = DATASETS[config["dataset"]]
        teacher = train.load_run_teacher({**config, "progress": False}, info, "cpu")
        per_seed = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            student = models.build_student(config["student"], info.num_classes, T=config["T"],
                                           neuron=config["neuron"], backend=config["backend"],
                                           in_channels=info.in_channels)
            if args.student:
                student.load_state_dict(torch.load(args.student, map_location="cpu", weights_only=True)["state_dict"])
            torch.manual_seed(1000 + seed)  # the same synthesis draws for both variants
            synthesizer = build_synthesizer(config, teacher, student, info, "cpu", config["synthesis_batch_size"])
            synthesizer.set_epoch(config["warmup"])  # a round after any warm-up (the adversarial term on)
            images = synthesizer.synthesize().images
            per_seed.append(tail_gaps(teacher, student, images, config["quantiles"]))
        rows[variant] = per_seed

    layers = len(rows["BN-only"][0]["gaps"])
    header = ["variant"] + [f"tap {l}: mean_q abs(p_S - p_T)" for l in range(layers)] + ["L_RCA", "L_TAR (soft, delta 0.5)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, per_seed in rows.items():
        cells = [mean_std([s["gaps"][l] for s in per_seed]) for l in range(layers)]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {mean_std([s['rca'][0] for s in per_seed])} | "
                     f"{mean_std([s['tar'][0] for s in per_seed])} |")
    command = shlex.join(["python", "scripts/tail_gaps.py", *argv])
    lines += ["", f"Seeds {args.seeds}; one synthesis round per seed and variant, from the same random state. "
              "Produced by:", "", "```bash", command, "```", ""]
    text = "\n".join(lines)
    with open(args.output, "w") as f:
        f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
