"""Knowledge distillation on synthetic batches (paper Eq. 19), top-1 evaluation, and the
supervised recipe that trains the small digits teacher of the offline default."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data import DatasetInfo, denormalize, normalize
from .synthesis.base import random_crop_and_flip
from .synthesis.memory import SyntheticMemory


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t / T) || softmax(s / T)), mean over the batch, times T^2 (Hinton et al.); T > 0."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"the KD temperature must be finite and > 0, got {temperature}")
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature * temperature


def make_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4):
    """SGD with momentum, Fast-Datafree's settings."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def make_scheduler(optimizer, kd_epochs: int, eta_min: float = 2e-4):
    """Cosine decay over the KD epochs (stepped once per epoch after the warm-up epochs)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, kd_epochs), eta_min=eta_min)


def distill_steps(student: nn.Module, teacher: nn.Module, memory: SyntheticMemory, optimizer, *, steps: int,
                  batch_size: int, temperature: float, amp: bool = False, progress=None) -> float:
    """`steps` SGD steps of KD on batches sampled (and augmented) from the memory; returns the mean loss."""
    device = next(student.parameters()).device
    student.train()
    teacher.eval()
    total = torch.zeros((), device=device)
    for _ in range(steps):
        images = memory.sample(batch_size).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            with torch.no_grad():
                t_logits = teacher(images)
            loss = kd_loss(student(images), t_logits, temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        if progress is not None:
            progress.update(1)
    return float(total) / max(1, steps)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 256, device="cpu", amp: bool = False) -> float:
    """Top-1 accuracy of `model` on `dataset`, as a fraction in [0, 1]."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images.to(device))
        correct += int((logits.argmax(1).cpu() == labels).sum())
        total += labels.numel()
    model.train(was_training)
    return correct / max(1, total)


def train_supervised(model: nn.Module, dataset: Dataset, info: DatasetInfo, *, epochs: int, lr: float,
                     batch_size: int = 64, device="cpu", generator: Optional[torch.Generator] = None,
                     progress: bool = True, on_epoch: Optional[Callable[[int, float], None]] = None) -> nn.Module:
    """Cross-entropy training with SGD + cosine and crop/flip augmentation (the digits teacher; train_teacher).

    on_epoch(epoch, mean training loss), if given, is called after each epoch (1-based), model in train mode."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    model.to(device).train()
    optimizer = make_optimizer(model, lr, weight_decay=5e-4)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    for epoch in tqdm(range(epochs), desc="teacher", unit="epoch", disable=not progress, leave=False):
        loss_sum = torch.zeros((), device=device)
        for images, labels in loader:
            pixels = denormalize(images.to(device), info)
            images = normalize(random_crop_and_flip(pixels, info.crop_padding, info.flip), info)
            loss = F.cross_entropy(model(images), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach()
        if on_epoch is not None:
            on_epoch(epoch + 1, float(loss_sum) / max(1, len(loader)))
            model.train()
    return model.eval()
