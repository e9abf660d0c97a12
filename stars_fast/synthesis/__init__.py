"""Synthesis of surrogate training batches from a frozen teacher, with the STARS regularizers.

- bn_hooks.py: the BN-statistics prior (hooks on the teacher's BatchNorm inputs)
- stars_regularizer.py: lambda_rca * L_RCA + lambda_tar * L_TAR between teacher and student taps
- deepinversion.py: DeepInversion under Fast-Datafree's protocol (+ STARS)
- memory.py: the bounded memory of synthesized images that the KD phase samples from
- base.py: the frozen-student context, per-sample augmentations, pixel bounds
"""
from .base import SynthesisResult, frozen, jitter_and_flip, random_crop_and_flip
from .bn_hooks import BNStatsHook, BNStatsHooks
from .deepinversion import DeepInversionSynthesizer
from .memory import SyntheticMemory
from .stars_regularizer import StarsRegularizer

__all__ = ["BNStatsHook", "BNStatsHooks", "DeepInversionSynthesizer", "StarsRegularizer", "SyntheticMemory",
           "SynthesisResult", "frozen", "jitter_and_flip", "random_crop_and_flip"]
