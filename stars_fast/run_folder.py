"""The run folder (`--out`): every file a run writes, and reading its checkpoint back.

  log.txt          the console's lines: teacher accuracy, one line per epoch, the result row
  metrics.jsonl    one JSON object per finished epoch: epoch (1-based), student_acc, best_acc (fractions),
                   lr, time_s, the loss terms, memory_size, synthesis_time_s
  summary.json     teacher_acc, student_acc, best_student_acc, wall time, the resolved backends, device,
                   versions, git commit, the Markdown result row, the full configuration
  checkpoint.pt    what changes from epoch to epoch (student, optimizer, scheduler, per process its RNG
                   and synthesizer state, the synthetic memory's image count, metrics history); atomic;
                   tensors and plain Python types only; its zip CRCs are verified before a resume
  student.pth      the last student, best.pth the best by top-1 (models.save_student; models.load_student)
  synthetic/       the synthetic memory (synthesis/memory.py; read it with open_synthetic)
  synthetic_epochNNN.png, real_reference.png   grids of the last synthesized images, and of real test images
  tensorboard/     with --tensorboard: the metrics as TensorBoard scalars
Only rank 0 writes. Files are written atomically with open()'s mode (stars_fast.atomic); the
temporary files of a killed write are removed when a run starts or resumes.

One writer per folder: rank 0 holds an advisory lock (flock on `.stars_fast.lock`, which names its
holder) for the run's life; the kernel releases it on any exit, SIGKILL included, so no stale lock
survives a dead run. A second run or a --resume of a live one is refused with one line. A folder is
ours when `.stars_fast_run` (written when a run takes it) is in it: `--out` must be new, empty or ours.
"""
from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import socket
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

import torch

from . import models
from .atomic import atomic_write_bytes, remove_stale_temp_files
from .data import DatasetInfo

CHECKPOINT_FORMAT = 3
CHECKPOINT = "checkpoint.pt"
LOCK = ".stars_fast.lock"
MARKER = ".stars_fast_run"
RESULT_HEADER = ("| method | STARS | teacher → student | T | neuron | last top-1 | best top-1 | synthesis time |\n"
                 "|---|---|---|---|---|---|---|---|")


class RunFolder:
    """The files of one run in `path`; `writer` is False on every process but rank 0 (nothing is written)."""

    def __init__(self, path: str, writer: bool = True):
        self.path, self.writer = path, writer
        self.created = False  # whether this process made the folder (then an early error removes it)
        self._tensorboard = None
        self._lock_fd: Optional[int] = None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def create(self) -> None:
        """Make or take the folder, lock it for this run and drop stale temporary files; SystemExit with
        one line if the folder is another program's, another run holds it, or it cannot be written."""
        if not self.writer:
            return
        try:
            try:
                os.makedirs(self.path)
                self.created = True
            except FileExistsError:
                if not os.path.isdir(self.path):
                    raise SystemExit(f"--out {self.path}: a file, not a folder") from None
                if os.listdir(self.path) and not os.path.isfile(self.file(MARKER)):
                    raise SystemExit(f"--out {self.path}: the folder is not empty and is not a stars_fast run folder "
                                     f"(no {MARKER}); choose a new or empty folder") from None
            self._lock()
            with open(self.file(MARKER), "a"):
                pass
        except OSError as exc:
            raise SystemExit(f"--out {self.path}: cannot write the run folder ({exc.strerror or exc})") from None
        for folder in (self.path, self.file("synthetic")):
            if os.path.isdir(folder):
                remove_stale_temp_files(folder)

    def _lock(self) -> None:
        """Take the folder's lock, or SystemExit naming the process that holds it."""
        fd = os.open(self.file(LOCK), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise SystemExit(f"--out {self.path}: another run is writing this folder ({holder}); wait for it to "
                             f"end, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        """Give the folder's lock back (the run is over, in this process)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove_if_unfinished(self) -> None:
        """After an error: remove the folder if this run made it and no epoch was checkpointed."""
        if self.writer and self.created and not os.path.exists(self.file(CHECKPOINT)):
            self.close()
            shutil.rmtree(self.path, ignore_errors=True)

    # ---------------------------------------------------------------------- checkpoint

    def load_checkpoint(self) -> Optional[Dict[str, object]]:
        """The verified checkpoint, None if there is none; SystemExit with one line if it is damaged."""
        path = self.file(CHECKPOINT)
        if not os.path.isfile(path):
            return None
        try:
            models.verify_checkpoint(path)
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except (ValueError, RuntimeError, OSError) as exc:
            raise SystemExit(f"cannot resume: {exc}") from None
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
            found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
            raise SystemExit(f"cannot resume: {path} has format {found}, expected {CHECKPOINT_FORMAT}")
        return checkpoint

    def save_checkpoint(self, state: Dict[str, object]) -> None:
        if self.writer:
            models.save_checkpoint({"format": CHECKPOINT_FORMAT, **state}, self.file(CHECKPOINT))

    def save_students(self, student, record: Dict[str, object], best: bool, **meta) -> None:
        """student.pth (this epoch's student) and, when `best`, best.pth (Fast-Datafree's best_acc1 too)."""
        if not self.writer:
            return
        meta = dict(meta, acc=record["student_acc"], epoch=record["epoch"])
        models.save_student(self.file("student.pth"), student, **meta)
        if best:
            models.save_student(self.file("best.pth"), student, **meta, best_acc1=record["student_acc"])

    # ------------------------------------------------------------------------- logs

    def log(self, line: str, console=print) -> None:
        """One line on the console and in log.txt."""
        if not self.writer:
            return
        console(line)
        with open(self.file("log.txt"), "a") as f:
            f.write(line + "\n")

    def write_metrics(self, history: List[Dict[str, object]]) -> None:
        """metrics.jsonl rewritten to `history` (on resume: drops the lines of an epoch the checkpoint lost)."""
        if self.writer:
            atomic_write_bytes(self.file("metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in history).encode())

    def append_metrics(self, record: Dict[str, object]) -> None:
        if not self.writer:
            return
        with open(self.file("metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self._tensorboard.add_scalar(key, value, record["epoch"])
            self._tensorboard.flush()

    def open_tensorboard(self) -> None:
        if self.writer:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(self.file("tensorboard"))

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def write_summary(self, summary: Dict[str, object]) -> None:
        if self.writer:
            atomic_write_bytes(self.file("summary.json"), (json.dumps(summary, indent=2) + "\n").encode())

    # ----------------------------------------------------------------------- images

    def save_grid(self, name: str, images: torch.Tensor, labels: Optional[torch.Tensor], info: DatasetInfo) -> None:
        """A labelled grid of synthesized images, one row per class (stars_fast.images)."""
        if self.writer:
            from .images import save_class_grid

            save_class_grid(self.file(name), images, labels, info)

    def save_real_reference(self, info: DatasetInfo, data_root: Optional[str]) -> None:
        """real_reference.png, once per run: the same grid from the real test split."""
        if self.writer and not os.path.exists(self.file("real_reference.png")):
            from .images import save_real_reference

            save_real_reference(self.file("real_reference.png"), info, data_root=data_root)


# ------------------------------------------------------------------------ what summary.json records

def environment(config: Dict[str, object], device: torch.device) -> Dict[str, object]:
    """The backends `auto` resolved to, the device, the versions and the git commit of this run."""
    from . import __version__, _backend

    def version(package: str) -> Optional[str]:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"backend": {"requested": config["backend"], "resolved": _backend.resolve(config["backend"], device)},
            "device": str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "triton": version("triton"),
                         "stars_fast": __version__},
            "git_commit": git_commit()}


def git_commit() -> Optional[str]:
    """The commit of the stars_fast checkout this runs from, or None (no git, not a checkout)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else None


def result_row(config: Dict[str, object], summary: Dict[str, object]) -> str:
    """The run as one row of a Markdown results table (RESULT_HEADER's columns)."""
    def top1(value) -> str:
        return "-" if value is None else f"{value:.2%}"

    return (f"| {config['method']} | {'on' if config['stars'] else 'off'} | {config['teacher']} → "
            f"{config['student']} | {config['T']} | {config['neuron']} | {top1(summary['student_acc'])} | "
            f"{top1(summary['best_student_acc'])} | {summary['synthesis_time_s']:.0f} s |")


def export_synthetic(run_dir: str, out_dir: str) -> int:
    """Write the run's synthetic set as PNGs in ImageFolder layout: out_dir/<class index, 3 digits>/NNNNNNN.png
    (labelled by the class the synthesizer aimed at). Returns the number of images."""
    from PIL import Image

    from .synthesis.memory import open_synthetic

    pixels, labels = open_synthetic(run_dir)
    for i in range(pixels.shape[0]):
        folder = os.path.join(out_dir, "unlabeled" if labels is None else f"{int(labels[i]):03d}")
        os.makedirs(folder, exist_ok=True)
        array = pixels[i].permute(1, 2, 0).numpy()
        Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(os.path.join(folder, f"{i:07d}.png"))
    return pixels.shape[0]
