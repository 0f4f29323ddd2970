"""Train the default VLM's projector and a small LoRA on SmolLM2, on the easy-VQA TRAIN split only.

The DINOv2 tower is frozen, so its patch features for all train images are computed once and cached
in /tmp. Each training sequence packs one image with all its questions, every question computed exactly
as its own single-turn prompt (see `pack_image`), so the 64 image tokens are run once for ~10
supervised answers. Loss: answer tokens and their `<|im_end|>` only. The last 200 train images are
held out for the accuracy printed during training. Weights are written every `--save-every` steps
into src/mquant/demo/weights/ (projector with the feature standardisation folded in, LoRA
factors in fp16, sha256 file), so an interrupted run leaves a usable checkpoint.

What made it work (`--anchor-init --anchor-weight 1`): learning perception through the LM's sparse
answer gradient plateaued at ~70% (shape questions near chance). Every DINOv2 patch linearly encodes
the image's colour and shape, so the projector is first fitted alone (no LM) to output, for every
patch, LM-embedding(colour word) + LM-embedding(shape word); the LM can then copy the answer word,
and the LoRA learns the yes/no logic within ~50 steps. The shipped weights came from two runs
(2 CPU cores shared with other jobs):

    python scripts/train_default_model.py --minutes 55 --batch 6 --lr-lora 1.5e-3   # stopped at step 100
    python scripts/train_default_model.py --resume --anchor-init --anchor-weight 1.0 --minutes 22 \
        --batch 6 --lr-proj 5e-4 --lr-lora 1.5e-3 --skip-first-eval --eval-every 50 --save-every 20

The second run refits the projector from scratch and keeps only the first run's LoRA as a start.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image

from mquant.demo import assemble
from mquant.demo.dinov2_onnx import load_dinov2_from_onnx
from mquant.demo.easyvqa import load_split
from mquant.demo.processor import DefaultProcessor, preprocess_image
from mquant.demo.smollm import load_smollm2
from mquant.demo.training import (
    COLORS,
    SHAPES,
    LoRALinear,
    Projector,
    add_lora,
    anchor_loss,
    anchor_targets,
    attribute_labels,
    aux_loss,
    fit_anchor_projector,
    lm_loss,
    pack_image,
    resume_from_adapter,
)

FEAT_CACHE = Path("/tmp/mquant_easyvqa_train_feats.pt")
HOLDOUT_IMAGES = 200  # the last 200 train images (by id) are never trained on


@torch.no_grad()
def train_features(paths: list[str]) -> torch.Tensor:
    """(N, 64, 384) DINOv2 features exactly as Llava selects them (last hidden state, CLS dropped)."""
    if FEAT_CACHE.exists():
        cached = torch.load(FEAT_CACHE)
        if cached["paths"] == paths:
            return cached["feats"].float()
    tower = load_dinov2_from_onnx()
    feats = []
    for i in range(0, len(paths), 64):
        px = torch.stack([preprocess_image(Image.open(p)) for p in paths[i:i + 64]])
        out = tower(pixel_values=px, output_hidden_states=True)
        feats.append(out.hidden_states[-1][:, 1:].half())
        print(f"features {i + len(px)}/{len(paths)}", flush=True)
    feats_t = torch.cat(feats)
    torch.save({"paths": paths, "feats": feats_t}, FEAT_CACHE)
    return feats_t.float()


def save(proj: Projector, loras: dict[str, LoRALinear], rank: int, alpha: float, step: int) -> None:
    state = {k: v.detach().float().contiguous() for k, v in proj.folded_state().items()}
    for name, mod in loras.items():
        state[f"lora.{name}.A"] = mod.A.detach().half().contiguous()
        state[f"lora.{name}.B"] = mod.B.detach().half().contiguous()
    assemble.write_adapter(state, {"lora_rank": str(rank), "lora_alpha": str(alpha), "step": str(step)})
    print(f"saved adapter at step {step}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=70.0, help="wall-clock budget; the LR schedule follows it")
    ap.add_argument("--batch", type=int, default=8, help="images per step (all their questions are packed)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=8.0)
    ap.add_argument("--lr-proj", type=float, default=2e-3)
    ap.add_argument("--lr-lora", type=float, default=1e-3)
    ap.add_argument("--save-every", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-images", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true", help="start from the adapter in weights/ (fresh optimizer)")
    ap.add_argument("--anchor-init", action="store_true",
                    help="refit the projector so image tokens = LM embedding(colour word) + embedding(shape word)")
    ap.add_argument("--anchor-weight", type=float, default=0.0, help="keep image tokens near those anchors")
    ap.add_argument("--skip-first-eval", action="store_true")
    ap.add_argument("--aux-weight", type=float, default=0.0,
                    help="weight of a colour/shape classification loss on the projected image tokens")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    t0 = time.time()

    items = load_split("train")
    paths = sorted({it.image_path for it in items}, key=lambda p: int(Path(p).stem))
    index = {p: i for i, p in enumerate(paths)}
    feats = train_features(paths)
    by_image: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for it in items:
        by_image[index[it.image_path]].append((it.question, it.answer))
    held = list(range(len(paths) - HOLDOUT_IMAGES, len(paths)))
    train_imgs = [i for i in sorted(by_image) if i < len(paths) - HOLDOUT_IMAGES]
    eval_imgs = held[: args.eval_images]
    print(f"features ready {time.time() - t0:.0f}s; {len(train_imgs)} train images, "
          f"{sum(len(by_image[i]) for i in eval_imgs)} holdout questions", flush=True)

    lm, tok = load_smollm2()
    proc = DefaultProcessor(tok)
    for p in lm.parameters():
        p.requires_grad_(False)
    loras = add_lora(lm, args.rank, args.alpha)
    flat = feats[train_imgs].reshape(-1, feats.shape[-1])
    proj = Projector(flat.mean(0), flat.std(0) + 1e-6)
    if args.resume:
        resume_from_adapter(proj, loras)
    labels = attribute_labels(by_image)
    anchors, known = anchor_targets(lm.model.embed_tokens.weight, tok, labels)
    known[len(paths) - HOLDOUT_IMAGES:] = False
    if args.anchor_init:
        proj = Projector(flat.mean(0), flat.std(0) + 1e-6)
        print(f"anchor fit: relative mse {fit_anchor_projector(proj, feats, anchors, known):.4f}", flush=True)
    aux_head = torch.nn.Linear(576, len(COLORS) + len(SHAPES))
    opt = torch.optim.AdamW([
        {"params": list(proj.parameters()) + list(aux_head.parameters()), "lr": args.lr_proj},
        {"params": [p for m in loras.values() for p in (m.A, m.B)], "lr": args.lr_lora},
    ], weight_decay=0.0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    budget = args.minutes * 60
    warm = 10

    def evaluate() -> float:
        hits = total = 0
        with torch.no_grad():
            for i in range(0, len(eval_imgs), 8):
                chunk = eval_imgs[i:i + 8]
                samples = [pack_image(proc, by_image[j]) for j in chunk]
                _, ok, first = lm_loss(lm, proj, feats[chunk], samples, proc.image_token_id)
                hits += int(ok[first].sum())
                total += int(first.sum())
        return hits / total

    if not args.skip_first_eval:
        print(f"step 0 holdout first-token acc {evaluate():.3f} {time.time() - t0:.0f}s", flush=True)
    t_train, step = time.time(), 0
    while True:
        step += 1
        progress = (time.time() - t_train) / budget
        frac = step / warm if step <= warm else 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * max(frac, 0.02)
        imgs = rng.sample(train_imgs, args.batch)
        samples = [pack_image(proc, by_image[i]) for i in imgs]
        loss, ok, first = lm_loss(lm, proj, feats[imgs], samples, proc.image_token_id)
        if args.anchor_weight > 0:
            loss = loss + args.anchor_weight * anchor_loss(proj(feats[imgs]), anchors[imgs], known[imgs])
        if args.aux_weight > 0:
            loss = loss + args.aux_weight * aux_loss(aux_head, proj(feats[imgs]), labels[imgs])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        done = progress >= 1.0
        if step % 5 == 0:
            print(f"step {step} loss {loss.item():.4f} answer-acc {ok[first].float().mean():.3f} "
                  f"lr-frac {frac:.3f} {time.time() - t0:.0f}s", flush=True)
        if step % args.save_every == 0 or done:
            save(proj, loras, args.rank, args.alpha, step)
        if step % args.eval_every == 0 or done:
            print(f"step {step} holdout first-token acc {evaluate():.3f} {time.time() - t0:.0f}s", flush=True)
        if done:
            break
    print(f"done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
