"""Train the default VLM's projector and a small LoRA on SmolLM2, on the easy-VQA TRAIN split only.

The DINOv2 tower is frozen, so its patch features for all train images are computed once and cached
in /tmp. Each training sequence packs one image with all its questions, every question computed exactly
as its own single-turn prompt (see `pack_image`), so the 64 image tokens -- most of the cost of a
CPU step -- are run once for ~10 supervised answers. Loss: answer
tokens and their `<|im_end|>` only. Weights are written every `--save-every` steps into
src/mquant/default_model/weights/ (projector with the feature standardisation folded in, LoRA
factors in fp16, sha256 file), so an interrupted run leaves a usable checkpoint.

    nohup python scripts/train_default_model.py --minutes 70 > /tmp/train.log 2>&1 &
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from mquant.default_model import assemble
from mquant.default_model.dinov2_onnx import load_dinov2_from_onnx
from mquant.default_model.easyvqa import load_split
from mquant.default_model.processor import DefaultProcessor, preprocess_image
from mquant.default_model.smollm import load_smollm2

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


class Projector(torch.nn.Module):
    """Llava's projector (linear-GELU-linear) on standardised features; standardisation is folded at save."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, d_in: int = 384, d_out: int = 576) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear_1 = torch.nn.Linear(d_in, d_out)
        self.linear_2 = torch.nn.Linear(d_out, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1((x - self.mean) / self.std)))

    def folded_state(self) -> dict[str, torch.Tensor]:
        w1 = self.linear_1.weight / self.std
        b1 = self.linear_1.bias - w1 @ self.mean
        return {"multi_modal_projector.linear_1.weight": w1, "multi_modal_projector.linear_1.bias": b1,
                "multi_modal_projector.linear_2.weight": self.linear_2.weight,
                "multi_modal_projector.linear_2.bias": self.linear_2.bias}


class LoRALinear(torch.nn.Module):
    """y = base(x) + (x A^T B^T) * scale; B starts at zero so training starts from the base model."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.A = torch.nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.A), self.B) * self.scale


def add_lora(lm: torch.nn.Module, rank: int, alpha: float) -> dict[str, LoRALinear]:
    wrapped = {}
    for name, module in list(lm.model.named_modules()):
        for child in assemble.LORA_TARGETS:
            lin = getattr(module, child, None)
            if isinstance(lin, torch.nn.Linear):
                wrapped[f"{name}.{child}"] = LoRALinear(lin, rank, alpha)
                setattr(module, child, wrapped[f"{name}.{child}"])
    return wrapped


def pack_image(proc: DefaultProcessor, qas: list[tuple[str, str]]) -> dict[str, list]:
    """One image with several questions, each computed exactly as its own single-turn prompt.

    Layout: shared prefix (ChatML header + image tokens), then one segment per question
    (`\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>`). Segments get the position ids they
    would have alone and attend only to the prefix and themselves (4D mask), so packing changes the
    cost, not the maths: the image tokens are run once for ~10 supervised answers.
    """
    tok = proc.tokenizer
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    seg: list[int] = []  # 0 = prefix, k = k-th question
    for k, (q, a) in enumerate(qas, start=1):
        prompt = proc.encode_prompt(q)
        cut = max(i for i, t in enumerate(prompt) if t == proc.image_token_id) + 1
        answer = tok(f"{a}<|im_end|>", add_special_tokens=False).input_ids
        if k == 1:
            ids, labels, pos, seg = prompt[:cut], [-100] * cut, list(range(cut)), [0] * cut
        elif prompt[:cut] != ids[:cut]:
            raise RuntimeError("image prefix differs between questions; tokenization is not prefix-stable")
        body = prompt[cut:] + answer
        ids += body
        labels += [-100] * (len(prompt) - cut) + answer
        pos += list(range(cut, cut + len(body)))
        seg += [k] * len(body)
    return {"ids": ids, "labels": labels, "pos": pos, "seg": seg}


def collate(samples: list[dict[str, list]]) -> tuple[torch.Tensor, ...]:
    """Right-padded ids/labels/positions and a boolean (B, 1, T, T) mask (True = may attend)."""
    width = max(len(s["ids"]) for s in samples)
    n = len(samples)
    ids = torch.full((n, width), 2, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    seg = torch.full((n, width), -1, dtype=torch.long)
    for r, s in enumerate(samples):
        L = len(s["ids"])
        ids[r, :L], labels[r, :L] = torch.tensor(s["ids"]), torch.tensor(s["labels"])
        pos[r, :L], seg[r, :L] = torch.tensor(s["pos"]), torch.tensor(s["seg"])
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = seg.unsqueeze(2) == seg.unsqueeze(1)
    to_prefix = (seg.unsqueeze(1) == 0) & (seg.unsqueeze(2) >= 0)
    mask = causal & (same | to_prefix)
    mask |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves (no NaN rows)
    return ids, labels, pos, mask.unsqueeze(1)


def lm_loss(lm, proj, feats, samples, image_token_id):
    """Cross-entropy on labelled positions; lm_head is applied only where a label exists.

    Returns (loss, correct-per-labelled-token, index of the first answer token of every question).
    """
    ids, labels, pos, mask = collate(samples)
    emb = lm.model.embed_tokens(ids)
    img = proj(feats).to(emb.dtype)
    emb = emb.masked_scatter((ids == image_token_id).unsqueeze(-1), img.reshape(-1, img.shape[-1]))
    hidden = lm.model(inputs_embeds=emb, attention_mask=mask, position_ids=pos).last_hidden_state
    # position t predicts token t+1
    tgt = labels[:, 1:]
    sel = tgt != -100
    logits = lm.lm_head(hidden[:, :-1][sel])
    prev_unlabelled = torch.cat([torch.ones_like(sel[:, :1]), ~sel[:, :-1]], dim=1)
    first = (sel & prev_unlabelled)[sel]
    return F.cross_entropy(logits, tgt[sel]), logits.argmax(-1) == tgt[sel], first


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
    opt = torch.optim.AdamW([
        {"params": list(proj.parameters()), "lr": args.lr_proj},
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
