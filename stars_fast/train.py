"""`python -m stars_fast.train`: data-free ANN-to-SNN distillation with DeepInversion, CMI or NAYER + STARS.

With no arguments it runs the offline default: a small CNN teacher trained (once, then cached)
on scikit-learn's bundled digits, distilled into a small spiking student without touching the
training images, then both evaluated on the held-out digits. `--preset NAME` loads the
hyperparameters of the paper's Appendix A (presets.py; `--list-presets` prints them); explicit
flags override the preset.

Each epoch (Fast-Datafree's schedule): `ep_steps // kd_steps` rounds of (synthesize with `g_steps`
optimization steps per batch -> add the batch (NAYER: batches) to the synthetic memory ->
`kd_steps` KD steps on batches sampled from the memory); KD starts after `warmup` epochs.

Several processes: `torchrun --nproc_per_node N -m stars_fast.train ...` trains with
DistributedDataParallel, each process synthesizing its share (distributed.py).

Run folder (`--out`), read by other tools:
  metrics.jsonl    one JSON object per finished epoch: epoch (1-based), student_acc (fraction), losses
  summary.json     teacher_acc, student_acc, best_student_acc, wall time, the full configuration
  checkpoint.pt    everything to resume (student, optimizer, scheduler, synthetic memory, epoch,
                   metrics history, and per process its RNG and synthesizer state); atomic;
                   tensors and plain Python types only
  synthetic_epochNNN.png   the last synthesized batch of each epoch (up to 256 images)
`--resume` continues the run in `--out` from its checkpoint up to `--epochs`; a run killed
mid-epoch loses that epoch only.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import struct
import sys
import time
import zlib
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from . import distributed, models
from .data import DATASETS, DatasetInfo, denormalize, load_dataset
from .distill import distill_steps, make_optimizer, make_scheduler, train_supervised
from .cli import METHODS, build_parser, make_config, parse_args  # noqa: F401  (the CLI, re-exported)
from .presets import PRESETS, format_presets
from .synthesis import Synthesizer, SyntheticMemory
from .synthesis.factory import build_synthesizer

CHECKPOINT_FORMAT = 2
GRID_IMAGES = 256  # most images in a synthetic_epochNNN.png


# --------------------------------------------------------------------------- run-folder files

def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: str, obj) -> None:
    _atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def _png_bytes(pixels) -> bytes:
    """A minimal 8-bit grayscale / RGB PNG encoder (pixels: uint8 array [H, W, C], C in {1, 3})."""
    height, width, channels = pixels.shape
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(height))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0 if channels == 1 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def write_png(path: str, pixels, use_pil: Optional[bool] = None) -> None:
    """Write uint8 [H, W, C] pixels as a PNG, with PIL when installed (or `use_pil`), else `_png_bytes`."""
    if use_pil is None:
        try:
            import PIL  # noqa: F401

            use_pil = True
        except ImportError:
            use_pil = False
    if use_pil:
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(buffer, format="PNG")
        _atomic_write(path, buffer.getvalue())
    else:
        _atomic_write(path, _png_bytes(pixels))


def image_grid(images: torch.Tensor, info: DatasetInfo, min_side: int = 32, padding: int = 2):
    """Normalized images [N, C, H, W] -> a uint8 [H', W', C] grid on gray, each cell upscaled to >= min_side px."""
    pixels = (denormalize(images.detach().float().cpu(), info).clamp(0, 1) * 255).round().to(torch.uint8)
    n, c, h, w = pixels.shape
    scale = max(1, math.ceil(min_side / max(h, w)))
    pixels = pixels.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    h, w = h * scale, w * scale
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.full((c, rows * (h + padding) - padding, cols * (w + padding) - padding), 128, dtype=torch.uint8)
    for i in range(n):
        top, left = (i // cols) * (h + padding), (i % cols) * (w + padding)
        grid[:, top:top + h, left:left + w] = pixels[i]
    return grid.permute(1, 2, 0).contiguous().numpy()


# ------------------------------------------------------------------------------------ models

def cache_dir() -> str:
    """Where the digits teacher is cached: $STARS_FAST_CACHE, else $XDG_CACHE_HOME/stars_fast, else ~/.cache/stars_fast."""
    if os.environ.get("STARS_FAST_CACHE"):
        return os.environ["STARS_FAST_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "stars_fast")


# bump "version" when the recipe changes, so cached teachers of the old recipe are not reused
DIGITS_TEACHER_RECIPE = {"epochs": 30, "lr": 0.05, "batch_size": 64, "seed": 0, "version": 1}


def _architecture_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the state-dict names and shapes, so a changed architecture misses the cache."""
    layout = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    return hashlib.sha1(repr(layout).encode()).hexdigest()[:10]


def digits_teacher(name: str, info: DatasetInfo, device, progress: bool) -> torch.nn.Module:
    """The digits teacher: loaded from the cache, or trained on the digits train split and cached.

    It is trained under its own fixed seed (in a forked RNG), so every run and seed shares one teacher;
    the cache file name holds a fingerprint of the architecture and the recipe's version.
    """
    recipe = DIGITS_TEACHER_RECIPE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        teacher = models.build_teacher(name, info.num_classes, in_channels=info.in_channels)
        path = os.path.join(cache_dir(), f"digits-{name}-{_architecture_fingerprint(teacher)}-r{recipe['version']}.pt")
        if os.path.isfile(path):
            return models.load_teacher(name, path, info.num_classes, in_channels=info.in_channels).to(device)
        tqdm.write(f"training the digits teacher {name!r} (cached afterwards at {path})")
        train_supervised(teacher, load_dataset("digits", "train"), info, epochs=recipe["epochs"], lr=recipe["lr"],
                         batch_size=recipe["batch_size"], device=device,
                         generator=torch.Generator().manual_seed(recipe["seed"]), progress=progress)
    models.save_checkpoint({"state_dict": teacher.state_dict()}, path)
    return teacher


def load_run_teacher(config, info: DatasetInfo, device) -> torch.nn.Module:
    if config["teacher_ckpt"] is not None:
        teacher = models.load_teacher(config["teacher"], config["teacher_ckpt"], info.num_classes,
                                      in_channels=info.in_channels).to(device)
    else:
        teacher = digits_teacher(config["teacher"], info, device, config["progress"])
    models.freeze(teacher)
    return teacher


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ------------------------------------------------------------------------------------- run

def _default_out() -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out, n = os.path.join("runs", stamp), 1
    while os.path.exists(out):
        n += 1
        out = os.path.join("runs", f"{stamp}-{n}")
    return out


def _rng_state(device: torch.device) -> Dict[str, object]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Dict[str, object], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def main(argv: Optional[List[str]] = None) -> Optional[Dict[str, object]]:
    """Run the CLI; returns the final summary (what summary.json holds), or None for --list-presets."""
    explicit = parse_args(argv)
    if explicit.pop("list_presets", False):
        print(format_presets(PRESETS))
        return None
    out = explicit.get("out")  # without --out, rank 0 names a new folder below
    checkpoint_path = None if out is None else os.path.join(out, "checkpoint.pt")
    checkpoint = None
    if checkpoint_path is not None and os.path.isfile(checkpoint_path):
        if not explicit.get("resume"):
            raise SystemExit(f"{out} already holds a run: pass --resume to continue it, or another --out")
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise SystemExit(f"{checkpoint_path} has format {checkpoint.get('format')}, expected {CHECKPOINT_FORMAT}")
    config = make_config(explicit, base=None if checkpoint is None else checkpoint["config"])
    config["resume"] = False
    with distributed.setup(resolve_device(config["device"])) as ctx:
        if checkpoint is not None and len(checkpoint["rng"]) != ctx.world_size:
            raise SystemExit(f"{out} was written by {len(checkpoint['rng'])} processes; resume it with as many "
                             f"(torchrun --nproc_per_node {len(checkpoint['rng'])}), not {ctx.world_size}")
        config["out"] = out or ctx.broadcast(_default_out())  # one folder, named by rank 0
        if ctx.is_main:
            os.makedirs(config["out"], exist_ok=True)
        return _train(config, checkpoint, ctx)


def _train(config: Dict[str, object], checkpoint: Optional[Dict[str, object]],
           ctx: distributed.Context) -> Dict[str, object]:
    """The run, in every process; rank 0 alone writes the run folder and reports."""
    out, progress = config["out"], config["progress"] and ctx.is_main
    log = tqdm.write if ctx.is_main else (lambda message: None)
    threads = config["threads"] or (1 if config["dataset"] == "digits" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    device = ctx.device
    kd_batch = ctx.share(config["batch_size"], "--batch-size")
    synthesis_batch = ctx.share(config["synthesis_batch_size"], "--synthesis-batch-size")
    info = DATASETS[config["dataset"]]
    test_set = load_dataset(config["dataset"], "test", config["data_root"])

    with ctx.main_first():  # rank 0 trains and caches the digits teacher if need be, the others load it
        teacher = load_run_teacher(config, info, device)
    teacher_acc = ctx.evaluate(teacher, test_set, amp=config["amp"])
    log(f"teacher {config['teacher']}: {teacher_acc:.2%} top-1 on the {config['dataset']} test split "
        f"({len(test_set)} images)")

    torch.manual_seed(config["seed"])
    student = models.build_student(config["student"], info.num_classes, T=config["T"], neuron=config["neuron"],
                                   backend=config["backend"], in_channels=info.in_channels).to(device)
    torch.manual_seed(config["seed"] + ctx.rank)  # the same student everywhere, then a random stream per process
    synthesizer = build_synthesizer(config, teacher, student, info, device, synthesis_batch)
    memory = SyntheticMemory(info, config["memory_size"], device)
    optimizer = make_optimizer(student, config["lr"], weight_decay=config["weight_decay"])
    scheduler = make_scheduler(optimizer, config["epochs"] - config["warmup"])

    start_epoch, history, elapsed = 0, [], 0.0
    if checkpoint is not None:
        student.load_state_dict(checkpoint["student"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scheduler.T_max = max(1, config["epochs"] - config["warmup"])  # --epochs may have grown: put the
        for group in optimizer.param_groups:  # learning rate where the cosine over the new length has it
            group["lr"] = scheduler.eta_min + (group["initial_lr"] - scheduler.eta_min) * (
                1 + math.cos(math.pi * scheduler.last_epoch / scheduler.T_max)) / 2
        memory.load_state_dict(checkpoint["memory"])
        synthesizer.load_state_dict(checkpoint["synthesizer"][ctx.rank])
        _set_rng_state(checkpoint["rng"][ctx.rank], device)
        start_epoch, history, elapsed = checkpoint["epoch"], checkpoint["history"], checkpoint["elapsed_s"]
        log(f"resuming {out} after epoch {start_epoch}")
    kd_student = ctx.wrap(student)  # DistributedDataParallel when there are several processes
    if ctx.is_main:  # metrics.jsonl always agrees with the checkpoint: drop lines of an epoch the checkpoint lost
        _atomic_write(os.path.join(out, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in history).encode())

    started = time.time() - elapsed
    summary = _summary(config, teacher_acc, history, elapsed, ctx.world_size)
    epochs = tqdm(range(start_epoch, config["epochs"]), desc="epochs", unit="epoch", disable=not progress,
                  initial=start_epoch, total=config["epochs"])
    for epoch in epochs:
        record, images = _train_epoch(epoch, config, teacher, student, kd_student, synthesizer, memory, optimizer,
                                      scheduler, test_set, ctx, kd_batch, progress)
        history.append(record)
        elapsed = time.time() - started
        per_process = ctx.gather_to_main({"rng": _rng_state(device), "synthesizer": synthesizer.state_dict()})
        summary = _summary(config, teacher_acc, history, elapsed, ctx.world_size)
        if ctx.is_main:
            write_png(os.path.join(out, f"synthetic_epoch{epoch + 1:03d}.png"), image_grid(images[:GRID_IMAGES], info))
            models.save_checkpoint({
                "format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "config": config, "student": student.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "memory": memory.state_dict(), "rng": [p["rng"] for p in per_process],
                "synthesizer": [p["synthesizer"] for p in per_process], "history": history,
                "teacher_acc": teacher_acc, "elapsed_s": elapsed,
            }, os.path.join(out, "checkpoint.pt"))
            student_file = dict(arch=config["student"], num_classes=info.num_classes, in_channels=info.in_channels,
                                T=config["T"], neuron=config["neuron"], acc=record["student_acc"], epoch=epoch + 1)
            models.save_student(os.path.join(out, "student.pth"), student, **student_file)
            if record["student_acc"] >= summary["best_student_acc"]:
                models.save_student(os.path.join(out, "best.pth"), student, **student_file,
                                    best_acc1=record["student_acc"])
            with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            _write_json(os.path.join(out, "summary.json"), summary)
        epochs.set_postfix(student_acc=f"{record['student_acc']:.3f}", kd_loss=f"{record['kd_loss'] or 0:.3f}")
    epochs.close()
    if ctx.is_main:
        _write_json(os.path.join(out, "summary.json"), summary)
        print(f"teacher accuracy: {teacher_acc:.2%}  student accuracy: {summary['student_acc']:.2%}  "
              f"({config['dataset']} test split, {len(test_set)} images; {summary['epochs_completed']} epochs, "
              f"{summary['wall_time_s']:.0f} s; run folder {out})")
    return summary


def _train_epoch(epoch: int, config, teacher, student, kd_student, synthesizer: Synthesizer, memory, optimizer,
                 scheduler, test_set, ctx: distributed.Context, kd_batch: int, progress: bool):
    """Synthesis rounds, each followed by KD steps (after the warm-up), then evaluation.
    Returns the metrics record of the epoch and the last synthesized images (of every process)."""
    started = time.time()
    synthesizer.set_epoch(epoch)
    kd_on = epoch >= config["warmup"]
    rounds = config["ep_steps"] // config["kd_steps"]
    steps = tqdm(total=rounds * (synthesizer.steps_per_round + (config["kd_steps"] if kd_on else 0)), leave=False,
                 desc=f"epoch {epoch + 1}", unit="step", disable=not progress)
    kd_losses, synthesis_time = [], 0.0
    for _ in range(rounds):
        t0 = time.time()
        result = synthesizer.synthesize(progress=steps)
        synthesis_time += time.time() - t0
        images = ctx.gather(result.images)  # every process keeps the same memory
        memory.add(images)
        if kd_on:
            kd_losses.append(distill_steps(kd_student, teacher, memory, optimizer, steps=config["kd_steps"],
                                           batch_size=kd_batch, temperature=config["kd_T"], amp=config["amp"],
                                           progress=steps))
    steps.close()
    lr = optimizer.param_groups[0]["lr"]
    if kd_on:
        scheduler.step()
    ctx.broadcast_buffers(student)  # rank 0's BatchNorm statistics, as its checkpoint holds them
    record = {"epoch": epoch + 1, "student_acc": ctx.evaluate(student, test_set, amp=config["amp"]),
              "kd_loss": sum(kd_losses) / len(kd_losses) if kd_losses else None, **result.losses,
              "lr": lr, "memory_size": len(memory), "synthesis_time_s": round(synthesis_time, 3),
              "epoch_time_s": round(time.time() - started, 3)}
    return record, images


def _summary(config, teacher_acc: float, history: List[Dict[str, object]], elapsed: float,
             world_size: int) -> Dict[str, object]:
    accs = [r["student_acc"] for r in history]
    return {"teacher_acc": teacher_acc, "student_acc": accs[-1] if accs else None,
            "best_student_acc": max(accs) if accs else None, "epochs_completed": len(history),
            "wall_time_s": round(elapsed, 1), "processes": world_size, "config": config}


if __name__ == "__main__":
    main(sys.argv[1:])
