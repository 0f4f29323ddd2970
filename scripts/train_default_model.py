"""Train the default VLM's projector and a small LoRA on SmolLM2, on the easy-VQA TRAIN split only.

The DINOv2 tower is frozen, so its patch features for all train images are computed once and cached
in /tmp. Each training sequence is one image followed by `--qa-per-seq` question/answer turns of that
image (the first turn is exactly the single-turn inference prompt); the image tokens are shared by
the turns, which makes each (expensive, CPU-only) step supervise several answers. Loss: answer
tokens and their `<|im_end|>` only. Weights are written every `--save-every` steps into
src/mquant/default_model/weights/ (projector with the feature standardisation folded in, LoRA
factors in fp16, sha256 file), so an interrupted run leaves a usable checkpoint.

    python scripts/train_default_model.py --steps 600 > /tmp/train.log 2>&1
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


def build_sequence(proc: DefaultProcessor, qas: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """Multi-turn ChatML ids and labels (-100 except answer tokens + their <|im_end|>)."""
    tok = proc.tokenizer
    ids: list[int] = []
    labels: list[int] = []
    for turn, (q, a) in enumerate(qas):
        prompt = proc.encode_prompt(q) if turn == 0 else tok(
            f"\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
        answer = tok(f"{a}<|im_end|>", add_special_tokens=False).input_ids
        ids += prompt + answer
        labels += [-100] * len(prompt) + answer
    return ids, labels


def lm_loss(lm, proj, feats, batch_ids, batch_labels, image_token_id):
    """Cross-entropy on labelled positions; lm_head is applied only where a label exists."""
    width = max(len(x) for x in batch_ids)
    ids = torch.full((len(batch_ids), width), 2, dtype=torch.long)
    labels = torch.full((len(batch_ids), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for r, (x, y) in enumerate(zip(batch_ids, batch_labels)):
        ids[r, :len(x)], labels[r, :len(y)], mask[r, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    emb = lm.model.embed_tokens(ids)
    img = proj(feats).to(emb.dtype)
    emb = emb.masked_scatter((ids == image_token_id).unsqueeze(-1), img.reshape(-1, img.shape[-1]))
    hidden = lm.model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    # position t predicts token t+1
    tgt = labels[:, 1:]
    sel = tgt != -100
    logits = lm.lm_head(hidden[:, :-1][sel])
    return F.cross_entropy(logits, tgt[sel]), logits.argmax(-1) == tgt[sel]


def save(proj: Projector, loras: dict[str, LoRALinear], rank: int, alpha: float, step: int) -> None:
    state = {k: v.detach().float().contiguous() for k, v in proj.folded_state().items()}
    for name, mod in loras.items():
        state[f"lora.{name}.A"] = mod.A.detach().half().contiguous()
        state[f"lora.{name}.B"] = mod.B.detach().half().contiguous()
    assemble.write_adapter(state, {"lora_rank": str(rank), "lora_alpha": str(alpha), "step": str(step)})
    print(f"saved adapter at step {step}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--qa-per-seq", type=int, default=3)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=8.0)
    ap.add_argument("--lr-proj", type=float, default=2e-3)
    ap.add_argument("--lr-lora", type=float, default=1e-3)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-n", type=int, default=320)
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
    held = set(paths[-HOLDOUT_IMAGES:])
    by_image: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for it in items:
        if it.image_path not in held:
            by_image[index[it.image_path]].append((it.question, it.answer))
    holdout = [it for it in items if it.image_path in held]
    holdout = random.Random(1).sample(holdout, min(args.eval_n, len(holdout)))
    train_imgs = sorted(by_image)
    print(f"features ready {time.time() - t0:.0f}s; {len(train_imgs)} train images, {len(holdout)} holdout qs", flush=True)

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
    warm = 20

    def evaluate() -> float:
        lm.eval()
        hits = 0
        with torch.no_grad():
            for i in range(0, len(holdout), 32):
                chunk = holdout[i:i + 32]
                seqs = [build_sequence(proc, [(it.question, it.answer)]) for it in chunk]
                f = feats[[index[it.image_path] for it in chunk]]
                _, ok = lm_loss(lm, proj, f, [s[0] for s in seqs], [s[1] for s in seqs], proc.image_token_id)
                # first labelled token of each row = first answer token (greedy first token)
                n_lab = [sum(1 for y in s[1] if y != -100) for s in seqs]
                starts = [sum(n_lab[:r]) for r in range(len(seqs))]
                hits += sum(bool(ok[s]) for s in starts)
        lm.train()
        return hits / len(holdout)

    print(f"step 0 holdout first-token acc {evaluate():.3f}", flush=True)
    for step in range(1, args.steps + 1):
        frac = step / warm if step <= warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / (args.steps - warm)))
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * max(frac, 0.02)
        imgs = rng.sample(train_imgs, args.batch)
        seqs = [build_sequence(proc, rng.sample(by_image[i], min(args.qa_per_seq, len(by_image[i])))) for i in imgs]
        loss, ok = lm_loss(lm, proj, feats[imgs], [s[0] for s in seqs], [s[1] for s in seqs], proc.image_token_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        if step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f} tok-acc {ok.float().mean():.3f} {time.time() - t0:.0f}s", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            save(proj, loras, args.rank, args.alpha, step)
        if step % args.eval_every == 0 or step == args.steps:
            print(f"step {step} holdout first-token acc {evaluate():.3f}", flush=True)
    print(f"done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
