"""Building blocks of scripts/train_default_model.py (projector, LoRA, packed sequences, losses).

Kept in the package so that the tests can check the packing maths without running a training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mquant.demo import assemble
from mquant.demo.processor import DefaultProcessor


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


COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")


def attribute_labels(by_image: dict[int, list[tuple[str, str]]]) -> torch.Tensor:
    """(N, 2) colour and shape index per image from its open questions' answers (-100 if never asked)."""
    out = torch.full((max(by_image) + 1, 2), -100, dtype=torch.long)
    for i, qas in by_image.items():
        for _, a in qas:
            if a in COLORS:
                out[i, 0] = COLORS.index(a)
            elif a in SHAPES:
                out[i, 1] = SHAPES.index(a)
    return out


def aux_loss(head: torch.nn.Linear, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Every projected image token must linearly reveal the image's colour and shape.

    DINOv2 puts both into every patch (a linear probe on a single corner patch is >99% right), so
    this pushes the projector to hand the LM 64 consistent, clearly separated tokens instead of
    leaving it to discover that from the (sparse) answer-token gradient alone. The head is discarded.
    """
    logits = head(tokens)  # (B, 64, 11)
    n_tok = tokens.shape[1]
    col = F.cross_entropy(logits[..., :len(COLORS)].flatten(0, 1), labels[:, 0].repeat_interleave(n_tok), ignore_index=-100)
    shp = F.cross_entropy(logits[..., len(COLORS):].flatten(0, 1), labels[:, 1].repeat_interleave(n_tok), ignore_index=-100)
    return torch.nan_to_num(col) + torch.nan_to_num(shp)


def resume_from_adapter(proj: Projector, loras: dict[str, LoRALinear]) -> None:
    """Load the saved (standardisation-folded) projector and LoRA factors to continue training."""
    state = load_file(str(assemble.ADAPTER_FILE))
    proj.mean.zero_()
    proj.std.fill_(1.0)
    with torch.no_grad():
        for name in ("linear_1", "linear_2"):
            getattr(proj, name).weight.copy_(state[f"multi_modal_projector.{name}.weight"])
            getattr(proj, name).bias.copy_(state[f"multi_modal_projector.{name}.bias"])
        for name, mod in loras.items():
            mod.A.copy_(state[f"lora.{name}.A"].float())
            mod.B.copy_(state[f"lora.{name}.B"].float())
    print("resumed from", assemble.ADAPTER_FILE, flush=True)


def anchor_targets(embed: torch.Tensor, tokenizer, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: embedding(colour word) + embedding(shape word) of the LM, and a known-labels mask.

    Image tokens that look like the words the answer is made of let the LM's existing copy ability
    (attend to a token, emit it) do most of the work; the LoRA then only has to learn the yes/no logic.
    """
    cid = torch.tensor([tokenizer(c, add_special_tokens=False).input_ids[0] for c in COLORS])
    sid = torch.tensor([tokenizer(s, add_special_tokens=False).input_ids[0] for s in SHAPES])
    known = (labels[:, 0] >= 0) & (labels[:, 1] >= 0)
    lab = labels.clamp(min=0)
    return (embed[cid[lab[:, 0]]] + embed[sid[lab[:, 1]]]).detach(), known


def anchor_loss(tokens: torch.Tensor, targets: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """MSE of every image token to its image's anchor, relative to the anchor's power (0 when none known)."""
    if not bool(known.any()):
        return tokens.sum() * 0.0
    tok, tgt = tokens[known], targets[known].unsqueeze(1)
    return F.mse_loss(tok, tgt.expand_as(tok)) / tgt.pow(2).mean()


def fit_anchor_projector(proj: Projector, feats: torch.Tensor, targets: torch.Tensor, known: torch.Tensor,
                         steps: int = 400, seed: int = 0) -> float:
    """Fit the projector alone (no LM, ~1 min on CPU) so that image tokens land on their anchors."""
    gen = torch.Generator().manual_seed(seed)
    idx = known.nonzero().squeeze(1)
    opt = torch.optim.Adam(proj.parameters(), lr=3e-3)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        b = idx[torch.randint(0, len(idx), (128,), generator=gen)]
        loss = anchor_loss(proj(feats[b]), targets[b], torch.ones(len(b), dtype=torch.bool))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()
