"""NAYER's label embeddings: CLIP ViT-B/32 text features of "a image of {class name}", one row per class.

    python -m stars_fast.label_embedding --dataset cifar10 --out cifar10_le.pt
    python -m stars_fast.label_embedding --dataset tiny-imagenet --data-root DIR --out tiny_imagenet_le.pt

As NAYER's `label_embedding/label_embedding.py`: the class names in label order with "_" and "-"
turned into spaces, the prompt "a image of " + name, and CLIP's `encode_text` (the projected
end-of-text feature, not L2-normalized). CIFAR-10/100's names are built in; Tiny-ImageNet's are the
whole words.txt entry of each wnid (e.g. "goldfish, Carassius auratus"), in the dataset's label
order (sorted wnids). The text encoder comes from `open_clip` (ViT-B-32, OpenAI weights) or from
`transformers` (openai/clip-vit-base-patch32), whichever is installed and has its weights
(downloaded or cached by that library). The output is a float32 tensor [num_classes, 512] written
with torch.save, which `--label-embedding` reads (so do NAYER's own pickle files).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from .atomic import atomic_write
from .data import CIFAR10_CLASSES, CIFAR100_CLASSES, _find_folder, _tiny_imagenet_wnids

Encoder = Callable[[List[str]], Tensor]  # prompts -> [len(prompts), D]
DATASETS = ("cifar10", "cifar100", "tiny-imagenet")
OPEN_CLIP_MODEL = ("ViT-B-32", "openai")
TRANSFORMERS_MODEL = "openai/clip-vit-base-patch32"
PROMPTS_PER_BATCH = 100


def prompt(name: str) -> str:
    """NAYER's prompt for one class name."""
    return "a image of " + name.replace("_", " ").replace("-", " ")


def tiny_imagenet_names(data_root: str) -> List[str]:
    """Tiny-ImageNet's class names in label order: the full words.txt entry of each (sorted) wnid."""
    folder = _find_folder(data_root, "tiny-imagenet-200", "tiny-imagenet")
    listing = os.path.join(folder, "words.txt")
    if not os.path.isfile(listing):
        raise FileNotFoundError(f"no words.txt in {folder!r} (Tiny-ImageNet ships it beside wnids.txt)")
    words = {}
    with open(listing, encoding="utf-8") as f:
        for line in f:
            wnid, _, synonyms = line.rstrip("\n").partition("\t")
            words[wnid.strip()] = synonyms.strip()
    wnids = _tiny_imagenet_wnids(folder)
    missing = [w for w in wnids if not words.get(w)]
    if missing:
        raise ValueError(f"{listing} has no entry for {len(missing)} wnids, e.g. {missing[:3]}")
    return [words[w] for w in wnids]


def class_names(dataset: str, data_root: Optional[str] = None) -> List[str]:
    if dataset == "cifar10":
        return list(CIFAR10_CLASSES)
    if dataset == "cifar100":
        return list(CIFAR100_CLASSES)
    if dataset == "tiny-imagenet":
        if data_root is None:
            raise ValueError("tiny-imagenet: pass --data-root, the folder holding tiny-imagenet-200/ (its words.txt)")
        return tiny_imagenet_names(data_root)
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")


@torch.no_grad()
def label_embedding(names: Sequence[str], encode: Encoder) -> Tensor:
    """[len(names), D] float32 on the CPU: encode(prompts) in batches of PROMPTS_PER_BATCH."""
    prompts = [prompt(n) for n in names]
    rows = [encode(prompts[i:i + PROMPTS_PER_BATCH]).float().cpu()
            for i in range(0, len(prompts), PROMPTS_PER_BATCH)]
    embedding = torch.cat(rows)
    if embedding.shape[0] != len(names) or not torch.isfinite(embedding).all():
        raise ValueError(f"the text encoder gave {tuple(embedding.shape)} (or non-finite values) for {len(names)} prompts")
    return embedding


def transformers_encoder(model, tokenizer, device="cpu") -> Encoder:
    """CLIP's encode_text through a transformers CLIPTextModelWithProjection and its tokenizer."""
    model = model.to(device).eval()

    def encode(prompts: List[str]) -> Tensor:
        tokens = tokenizer(prompts, padding=True, return_tensors="pt").to(device)
        return model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).text_embeds

    return encode


def open_clip_encoder(model, tokenizer, device="cpu") -> Encoder:
    """CLIP's encode_text through an open_clip model and its tokenizer."""
    model = model.to(device).eval()
    return lambda prompts: model.encode_text(tokenizer(prompts).to(device))


def pretrained_encoder(library: str = "auto", device="cpu") -> Encoder:
    """CLIP ViT-B/32's text encoder from open_clip or transformers ("auto": the first installed)."""
    if library in ("auto", "open_clip"):
        try:
            import open_clip
        except ImportError:
            if library == "open_clip":
                raise
        else:
            name, weights = OPEN_CLIP_MODEL
            model, _, _ = open_clip.create_model_and_transforms(name, pretrained=weights, device=device)
            return open_clip_encoder(model, open_clip.get_tokenizer(name), device)
    from transformers import AutoTokenizer, CLIPTextModelWithProjection  # ImportError names the missing package

    return transformers_encoder(CLIPTextModelWithProjection.from_pretrained(TRANSFORMERS_MODEL),
                                AutoTokenizer.from_pretrained(TRANSFORMERS_MODEL), device)


def save_embedding(path: str, embedding: Tensor) -> None:
    atomic_write(path, lambda f: torch.save(embedding.contiguous(), f))


def main(argv: Optional[List[str]] = None) -> Tensor:
    parser = argparse.ArgumentParser(prog="python -m stars_fast.label_embedding", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--out", required=True, metavar="PATH", help="the file to write (torch.save)")
    parser.add_argument("--data-root", metavar="DIR", help="tiny-imagenet: the folder holding tiny-imagenet-200/")
    parser.add_argument("--library", choices=("auto", "open_clip", "transformers"), default="auto",
                        help="where CLIP comes from (default: open_clip if installed, else transformers)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        names = class_names(args.dataset, args.data_root)
        encoder = pretrained_encoder(args.library, args.device)
    except ImportError as exc:
        raise SystemExit(f"{exc}: install open_clip_torch or transformers (and let it fetch CLIP ViT-B/32 once)")
    except (OSError, ValueError) as exc:
        raise SystemExit(str(exc)) from exc
    embedding = label_embedding(names, encoder)
    save_embedding(args.out, embedding)
    print(f"{args.out}: {embedding.shape[0]} classes x {embedding.shape[1]} ({args.dataset})")
    return embedding


if __name__ == "__main__":
    main(sys.argv[1:])
