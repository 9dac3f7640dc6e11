"""Does the synthetic benchmark really drift? Latest-year-only vs all-years training, retrieval R@1 per year.

    python tools/make_shards.py --synthetic --out data/demo
    python benchmarks/synthetic_drift.py --data data/demo [--steps 300]

Trains the 32 px tiny ViT (configs/models/tiny-vit-32.json) with plain open_clip on CPU, twice from
the same init and for the same number of steps: once on the last year only, once on all years
pooled. Prints caption-matching R@1 (mean of image->text and text->image, as trainer/eval's
headline) on every year's eval split: the gap on the oldest year is the backward transfer that a
continual strategy has to recover.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

MODEL = Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny-vit-32.json"


def load_split(root: Path, split: str, year: str) -> tuple[torch.Tensor, list[str]]:
    """All images (normalised N x 3 x 32 x 32) and captions of one split and year."""
    images, captions = [], []
    for shard in sorted((root / split / year).glob("*.tar")):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for info in tar:
                key, ext = info.name.split(".", 1)
                member = tar.extractfile(info)
                if member is not None:
                    samples.setdefault(key, {})[ext] = member.read()
        for members in samples.values():
            images.append(np.asarray(Image.open(io.BytesIO(members["png"])).convert("RGB")))
            captions.append(members["txt"].decode())
    pixels = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (pixels - 0.5) / 0.25, captions


def train(
    model: open_clip.CLIP, images: torch.Tensor, tokens: torch.Tensor, steps: int, batch: int, lr: float
) -> float:
    """AdamW + one-cycle LR on the symmetric contrastive loss; returns the last loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        pick = torch.randint(len(images), (batch,), generator=generator)
        out = model(images[pick], tokens[pick])
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        labels = torch.arange(batch)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return loss.item()


@torch.no_grad()
def caption_r1(model: open_clip.CLIP, images: torch.Tensor, tokens: torch.Tensor, captions: list[str]) -> float:
    """Mean image->text / text->image R@1 in %, where any pair with the same caption text is a match."""
    model.eval()
    scores = model.encode_image(images, normalize=True) @ model.encode_text(tokens, normalize=True).T
    ids = torch.tensor([{c: i for i, c in enumerate(dict.fromkeys(captions))}[c] for c in captions])
    i2t = (ids[scores.argmax(1)] == ids).float().mean()
    t2i = (ids[scores.argmax(0)] == ids).float().mean()
    return float(i2t + t2i) / 2 * 100


def main() -> None:
    """Train both models and print the per-year table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = json.loads(MODEL.read_text())
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=config["text_cfg"]["context_length"])
    years = json.loads((args.data / "manifest.json").read_text())["years"]
    train_sets = {y: load_split(args.data, "train", y) for y in years}
    eval_sets = {y: (x, tokenizer(c), c) for y, (x, c) in ((y, load_split(args.data, "eval", y)) for y in years)}
    runs = {f"latest year only ({years[-1]})": [years[-1]], "all years": years}
    print(f"{'trained on':28s} " + " ".join(f"{y:>7s}" for y in years) + "   (caption-match R@1 %, eval split)")
    for name, chosen in runs.items():
        torch.manual_seed(0)
        model = open_clip.CLIP(config["embed_dim"], config["vision_cfg"], config["text_cfg"], output_dict=True)
        images = torch.cat([train_sets[y][0] for y in chosen])
        tokens = tokenizer([c for y in chosen for c in train_sets[y][1]])
        started = time.perf_counter()
        loss = train(model, images, tokens, args.steps, args.batch, args.lr)
        row = " ".join(f"{caption_r1(model, *eval_sets[y]):7.1f}" for y in years)
        print(f"{name:28s} {row}   (loss {loss:.2f}, {time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
