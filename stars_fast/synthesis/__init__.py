"""Synthesis of surrogate training batches from a frozen teacher, with the STARS regularizers.

- objective.py: the `Synthesizer` interface and the objective the three methods share
  (BN + one-hot + adversarial + STARS)
- deepinversion.py: DeepInversion under Fast-Datafree's protocol (images optimized directly)
- cmi.py: CMI, contrastive model inversion (a generator reset every round, a bank of negatives)
- nayer.py: NAYER, noisy-layer generation (label embeddings through re-drawn noisy layers)
- generator.py: the generators of CMI and NAYER
- bn_hooks.py: the BN-statistics prior (hooks on the teacher's BatchNorm inputs)
- stars_regularizer.py: lambda_rca * L_RCA + lambda_tar * L_TAR between teacher and student taps
- memory.py: the bounded memory of synthesized images that the KD phase samples from
- base.py: the frozen-model context, per-sample augmentations, pixel bounds
"""
from .base import SynthesisResult, frozen, jitter_and_flip, random_crop_and_flip
from .bn_hooks import BNStatsHook, BNStatsHooks
from .cmi import CMISynthesizer
from .deepinversion import DeepInversionSynthesizer
from .memory import SyntheticMemory
from .nayer import NayerSynthesizer, load_label_embedding
from .objective import InversionObjective, Synthesizer
from .stars_regularizer import StarsRegularizer

__all__ = ["BNStatsHook", "BNStatsHooks", "CMISynthesizer", "DeepInversionSynthesizer", "InversionObjective",
           "NayerSynthesizer", "StarsRegularizer", "SynthesisResult", "Synthesizer", "SyntheticMemory", "frozen",
           "jitter_and_flip", "load_label_embedding", "random_crop_and_flip"]
