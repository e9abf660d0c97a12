"""The training loop of `python -m stars_fast.train`: per epoch (Fast-Datafree's schedule)
`ep_steps // kd_steps` rounds of (synthesize -> append to the synthetic memory -> `kd_steps` KD steps
on batches sampled from it; KD from epoch `warmup` on), then evaluation, the epoch's line, the
checkpoint. A non-finite loss term or student parameter stops the run (NonFiniteError) before it is
checkpointed, so the run folder keeps the last good epoch.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from . import distributed, models
from .data import DATASETS, load_dataset
from .distill import distill_steps, make_optimizer, make_scheduler
from .run_folder import RESULT_HEADER, RunFolder, environment, export_synthetic, result_row
from .synthesis import Synthesizer, SyntheticMemory
from .synthesis.factory import build_synthesizer
from .teacher_cache import load_run_teacher

GRID_PER_CLASS = 8  # images per class in a synthetic_epochNNN.png
# A synthesis step whose gradient norm exceeds this multiple of its round's median is a spike: one such
# step (a singular loss term, say) fills Adam's second moments and stalls the rest of the batch.
SPIKE_FACTOR = 100.0


class NonFiniteError(RuntimeError):
    """A loss term or a student parameter became NaN or infinite; the message names it."""


def _check_finite(values: Dict[str, Optional[float]], epoch: int, what: str) -> None:
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise NonFiniteError(f"{what} {name} is {value} in epoch {epoch + 1}: stopping (the run folder keeps "
                                 f"the last finite epoch)")


def _check_parameters(student: torch.nn.Module, epoch: int) -> None:
    params = list(student.named_parameters())
    finite = torch.stack([p.detach().isfinite().all() for _, p in params])
    if not bool(finite.all()):  # one host sync per epoch
        names = [name for (name, _), ok in zip(params, finite.tolist()) if not ok]
        raise NonFiniteError(f"student parameter {names[0]} is not finite after epoch {epoch + 1}"
                             f"{f' (and {len(names) - 1} more)' if len(names) > 1 else ''}: stopping (the run folder "
                             f"keeps the last finite epoch)")


def _rng_state(device: torch.device) -> Dict[str, object]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Dict[str, object], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gradient_statistics(rounds: List[List[float]]) -> Dict[str, Optional[float]]:
    """An epoch's synthesis gradient norms (one list per round): their median and max, and the steps
    above SPIKE_FACTOR x their round's median."""
    norms = [n for steps in rounds for n in steps]
    if not norms:
        return {"synth_grad_median": None, "synth_grad_max": None, "synth_grad_spikes": 0}
    spikes = sum(n > SPIKE_FACTOR * statistics.median(steps) for steps in rounds if steps for n in steps)
    return {"synth_grad_median": statistics.median(norms), "synth_grad_max": max(norms), "synth_grad_spikes": spikes}


def spike_warning(record: Dict[str, object], losses: Dict[str, float]) -> str:
    """The one-line warning of a run's first epoch with gradient spikes, naming the terms then active."""
    active = [key[5:] for key, value in losses.items() if key.startswith("loss_") and value != 0]
    return (f"warning: {record['synth_grad_spikes']} synthesis step(s) of epoch {record['epoch']} had a gradient "
            f"norm above {SPIKE_FACTOR:g}x their round's median (largest {record['synth_grad_max']:.3g}, epoch "
            f"median {record['synth_grad_median']:.3g}); terms active: {', '.join(active) or 'none'}. "
            f"metrics.jsonl has synth_grad_median / _max / _spikes for every epoch")


def epoch_line(record: Dict[str, object], epochs: int) -> str:
    """The console / log.txt line of one epoch."""
    losses = "  ".join(f"{key[5:] if key.startswith('loss_') else key} {value:.4g}" for key, value in record.items()
                       if (key.startswith("loss_") or key in ("kd_loss", "synth_loss")) and value is not None)
    grad = ""
    if record.get("synth_grad_median") is not None:
        grad = f"grad {record['synth_grad_median']:.3g} (max {record['synth_grad_max']:.3g})  "
    return (f"epoch {record['epoch']:>{len(str(epochs))}}/{epochs}  student {record['student_acc']:.2%}  "
            f"best {record['best_acc']:.2%}  {losses or 'kd_loss -'}  {grad}lr {record['lr']:.4g}  "
            f"{record['time_s']:.1f} s (synthesis {record['synthesis_time_s']:.1f} s)")


def train(config: Dict[str, object], checkpoint: Optional[Dict[str, object]], ctx: distributed.Context,
          folder: RunFolder) -> Dict[str, object]:
    """The run, in every process; rank 0 alone writes the run folder and reports."""
    progress = config["progress"] and ctx.is_main and sys.stderr.isatty()  # no \r bars in redirected output
    console = tqdm.write if progress else print
    log = lambda line: folder.log(line, console)  # noqa: E731
    threads = config["threads"] or (1 if config["dataset"] == "digits" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    device = ctx.device
    kd_batch = ctx.share(config["batch_size"], "--batch-size")
    synthesis_batch = ctx.share(config["synthesis_batch_size"], "--synthesis-batch-size")
    info = DATASETS[config["dataset"]]
    test_set = load_dataset(config["dataset"], "test", config["data_root"])

    with ctx.main_first():  # rank 0 trains and caches the digits teacher if need be, the others load it
        teacher = load_run_teacher(config, info, device, log=log)
    teacher_acc = ctx.evaluate(teacher, test_set, amp=config["amp"])
    log(f"teacher {config['teacher']}: {teacher_acc:.2%} top-1 on the {config['dataset']} test split "
        f"({len(test_set)} images)")

    torch.manual_seed(config["seed"])
    student = models.build_student(config["student"], info.num_classes, T=config["T"], neuron=config["neuron"],
                                   backend=config["backend"], in_channels=info.in_channels).to(device)
    torch.manual_seed(config["seed"] + ctx.rank)  # the same student everywhere, then a random stream per process
    student_meta = dict(arch=config["student"], num_classes=info.num_classes, in_channels=info.in_channels,
                        T=config["T"], neuron=config["neuron"])
    synthesizer = build_synthesizer(config, teacher, student, info, device, synthesis_batch)
    synthesizer.grad_shares_every = config.get("grad_shares", 0)
    memory = SyntheticMemory(info, config["memory_size"], folder.path, device, writer=ctx.is_main)
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
        try:
            memory.load_state_dict(checkpoint["memory"])
        except ValueError as exc:  # the memory's files were lost or cut short
            raise SystemExit(f"cannot resume: {exc}") from None
        synthesizer.load_state_dict(checkpoint["synthesizer"][ctx.rank])
        _set_rng_state(checkpoint["rng"][ctx.rank], device)
        start_epoch, history, elapsed = checkpoint["epoch"], checkpoint["history"], checkpoint["elapsed_s"]
        # The model files follow the checkpoint (written just before them at an epoch's end): a failure
        # between the two left them an epoch behind, so they are written again from it.
        if history:
            last = history[-1]
            folder.save_students(student, last, best=last["student_acc"] >= last["best_acc"], **student_meta)
        log(f"resuming {folder.path} after epoch {start_epoch}")
    ctx.barrier()  # rank 0 has cut the memory's files to the checkpoint's count
    kd_student = ctx.wrap(student)  # DistributedDataParallel when there are several processes
    folder.write_metrics(history)  # metrics.jsonl always agrees with the checkpoint
    if config.get("tensorboard"):
        folder.open_tensorboard()
    folder.save_real_reference(info, config["data_root"])
    run_env = environment(config, device)

    started = time.time() - elapsed
    epochs = tqdm(range(start_epoch, config["epochs"]), desc="epochs", unit="epoch", disable=not progress,
                  initial=start_epoch, total=config["epochs"])
    warned_spikes = any(r.get("synth_grad_spikes") for r in history)
    for epoch in epochs:
        record, result = _train_epoch(epoch, config, teacher, student, kd_student, synthesizer, memory, optimizer,
                                      scheduler, test_set, ctx, kd_batch, progress)
        best = max([r["student_acc"] for r in history] + [record["student_acc"]])
        record["best_acc"] = best
        history.append(record)
        elapsed = time.time() - started
        per_process = ctx.gather_to_main({"rng": _rng_state(device), "synthesizer": synthesizer.state_dict()})
        if ctx.is_main:
            folder.save_grid(f"synthetic_epoch{epoch + 1:03d}.png", result.images, result.targets, info)
            folder.save_checkpoint({
                "epoch": epoch + 1, "config": config, "student": student.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "memory": memory.state_dict(), "rng": [p["rng"] for p in per_process],
                "synthesizer": [p["synthesizer"] for p in per_process], "history": history,
                "teacher_acc": teacher_acc, "elapsed_s": elapsed,
            })
            folder.save_students(student, record, best=record["student_acc"] >= best, **student_meta)
            folder.append_metrics(record)
            folder.write_summary(_summary(config, teacher_acc, history, elapsed, ctx.world_size, run_env))
            log(epoch_line(record, config["epochs"]))
            if record["synth_grad_spikes"] and not warned_spikes:
                log(spike_warning(record, result.losses))
        warned_spikes = warned_spikes or bool(record["synth_grad_spikes"])
    epochs.close()
    summary = _summary(config, teacher_acc, history, elapsed, ctx.world_size, run_env)
    if ctx.is_main:
        folder.write_summary(summary)
        log(f"teacher accuracy: {teacher_acc:.2%}  student accuracy: {_percent(summary['student_acc'])}  "
            f"(best {_percent(summary['best_student_acc'])}; {config['dataset']} test split, {len(test_set)} "
            f"images; {summary['epochs_completed']} epochs, {summary['wall_time_s']:.0f} s; run folder {folder.path})")
        log(RESULT_HEADER + "\n" + summary["result_row"])
        if config.get("export_synthetic"):
            count = export_synthetic(folder.path, config["export_synthetic"])
            log(f"exported {count} synthetic images to {config['export_synthetic']} (ImageFolder layout)")
    folder.close()
    return summary


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2%}"


def _train_epoch(epoch: int, config, teacher, student, kd_student, synthesizer: Synthesizer, memory, optimizer,
                 scheduler, test_set, ctx: distributed.Context, kd_batch: int, progress: bool):
    """Synthesis rounds, each followed by KD steps (after the warm-up), then evaluation.
    Returns the metrics record of the epoch and the last synthesis result (images of every process)."""
    started = time.time()
    synthesizer.set_epoch(epoch)
    kd_on = epoch >= config["warmup"]
    rounds = config["ep_steps"] // config["kd_steps"]
    steps = tqdm(total=rounds * (synthesizer.steps_per_round + (config["kd_steps"] if kd_on else 0)), leave=False,
                 desc=f"epoch {epoch + 1}", unit="step", disable=not progress)
    kd_losses, synthesis_time, grad_norms, term_norms = [], 0.0, [], {}
    for _ in range(rounds):
        t0 = time.time()
        result = synthesizer.synthesize(progress=steps)
        synthesis_time += time.time() - t0
        _check_finite(result.losses, epoch, "synthesis loss")
        grad_norms.append(result.grad_norms)
        for name, norms in result.term_grad_norms.items():
            term_norms.setdefault(name, []).extend(norms)
        result.images, result.targets = ctx.gather(result.images), ctx.gather(result.targets)
        memory.add(result.images, result.targets)  # every process keeps the same memory
        ctx.barrier()  # rank 0 has written it
        if kd_on:
            kd_losses.append(distill_steps(kd_student, teacher, memory, optimizer, steps=config["kd_steps"],
                                           batch_size=kd_batch, temperature=config["kd_T"], amp=config["amp"],
                                           progress=steps))
            _check_finite({"kd_loss": kd_losses[-1]}, epoch, "KD loss")
    steps.close()
    _check_parameters(student, epoch)
    lr = optimizer.param_groups[0]["lr"]
    if kd_on:
        scheduler.step()
    ctx.broadcast_buffers(student)  # rank 0's BatchNorm statistics, as its checkpoint holds them
    record = {"epoch": epoch + 1, "student_acc": ctx.evaluate(student, test_set, amp=config["amp"]),
              "kd_loss": sum(kd_losses) / len(kd_losses) if kd_losses else None, **result.losses,
              **gradient_statistics(grad_norms),
              **{f"grad_{name}": statistics.median(norms) for name, norms in term_norms.items()},
              "lr": lr, "memory_size": len(memory), "synthesis_time_s": round(synthesis_time, 3),
              "time_s": round(time.time() - started, 3)}
    return record, result


def _summary(config, teacher_acc: float, history: List[Dict[str, object]], elapsed: float, world_size: int,
             run_env: Dict[str, object]) -> Dict[str, object]:
    accs = [r["student_acc"] for r in history]
    summary = {"teacher_acc": teacher_acc, "student_acc": accs[-1] if accs else None,
               "best_student_acc": max(accs) if accs else None, "epochs_completed": len(history),
               "wall_time_s": round(elapsed, 1),
               "synthesis_time_s": round(sum(r["synthesis_time_s"] for r in history), 1),
               "processes": world_size, **run_env, "config": config}
    summary["result_row"] = result_row(config, summary)
    return summary
