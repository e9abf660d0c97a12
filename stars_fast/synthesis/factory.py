"""The synthesizer a run's configuration names (--method, --stars and their flags)."""
from __future__ import annotations

from ..data import DatasetInfo
from ..presets import DEFAULTS, METHODS
from . import CMISynthesizer, DeepInversionSynthesizer, NayerSynthesizer, StarsRegularizer, Synthesizer, load_label_embedding
from .cmi import fast_datafree_feature_layers


def build_synthesizer(config, teacher, student, info: DatasetInfo, device, batch_size: int) -> Synthesizer:
    """The synthesizer named by --method, with the STARS term when --stars; `batch_size` images per batch."""
    config = {**DEFAULTS, **config}  # a run saved before a flag existed gets its default
    stars = None
    if config["stars"]:
        try:
            stars = StarsRegularizer(lambda_rca=config["lambda_rca"], lambda_tar=config["lambda_tar"],
                                     quantiles=config["quantiles"], thresholds=config["thresholds"],
                                     delta=config["delta"], normalize="teacher" if config["tar_normalize"] else None,
                                     layers=config["stars_layers"], weights=config["stars_weights"],
                                     start_epoch=config["stars_start_epoch"], backend=config["backend"])
        except ValueError as exc:
            raise SystemExit(f"STARS options: {exc}") from exc
    common = dict(batch_size=batch_size, iterations=config["g_steps"], lr_g=config["lr_g"], bn=config["bn"],
                  oh=config["oh"], adv=config["adv"], stars=stars, amp=config["amp"], device=device)
    if config["method"] == "deepinv":
        return DeepInversionSynthesizer(teacher, student, info, tv=config["tv"], l2=config["l2"], **common)
    if config["method"] == "cmi":
        return CMISynthesizer(teacher, student, info, cr=config["cr"], cr_T=config["cr_T"], ngf=config["ngf"],
                              feature_layers=fast_datafree_feature_layers(config["teacher"]), **common)
    if config["method"] == "nayer":
        if not 0.0 <= config["bn_mmt"] < 1.0:
            raise SystemExit(f"--bn-mmt must be in [0, 1), got {config['bn_mmt']}")
        embedding = None
        if config["label_embedding"] is not None:
            try:
                embedding = load_label_embedding(config["label_embedding"], info.num_classes)
            except (OSError, ValueError) as exc:
                raise SystemExit(f"--label-embedding: {exc}") from exc
        return NayerSynthesizer(teacher, student, info, g_life=config["g_life"], g_loops=config["g_loops"],
                                gwp_loops=config["gwp_loops"], warmup=config["warmup"], label_embedding=embedding,
                                latent_size=config["le_emb_size"], ngf=config["ngf"], bn_momentum=config["bn_mmt"],
                                **common)
    raise SystemExit(f"unknown --method {config['method']!r}; expected one of {METHODS}")
