"""Greedy answers for many questions about few images, computing each image's prompt prefix once.

Every easy-VQA prompt is `[template][64 image tokens][\\n][question][template]`, and each test image
has ~10 questions. Running the vision tower and the shared prefix once per image, then only the
question suffixes against a copy of that KV cache, gives the same greedy tokens as
`model.generate` on each prompt (same positions, same masking; only float summation order differs)
at a fraction of the cost, which is what makes full-test-split evaluation of many quantized variants
feasible on a CPU. The logits of the first answer token are returned too, for fidelity (KL).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Sequence

import torch

from mquant.calib.data import open_image

_AIFS_ORDER = "_mquant_aifs_order"  # set by transforms.aifs on a cache it filled in switched order


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Longest prefix shared by all sequences, leaving at least one token of each as suffix."""
    shortest = min(len(s) for s in sequences)
    length = 0
    while length < shortest - 1 and all(s[length] == sequences[0][length] for s in sequences):
        length += 1
    return length


def _select_rows(cache, rows: torch.Tensor):
    cache = copy.deepcopy(cache)
    cache.batch_select_indices(rows)
    order = getattr(cache, _AIFS_ORDER, None)
    if order is not None:
        setattr(cache, _AIFS_ORDER, order[rows])
    return cache


def _eos_ids(model: Any, processor: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else set()
    tokenizer_eos = getattr(processor.tokenizer, "eos_token_id", None)
    return {i for i in ids | {tokenizer_eos} if i is not None}


@torch.no_grad()
def _answer_group(model, processor, prompts: list[list[int]], image_index: torch.Tensor, cache, prefix: int,
                  max_new_tokens: int, eos: set[int]) -> tuple[list[list[int]], torch.Tensor]:
    suffixes = [p[prefix:] for p in prompts]
    lengths = torch.tensor([len(s) for s in suffixes])
    width = int(lengths.max())
    pad = int(processor.tokenizer.pad_token_id)
    ids = torch.full((len(suffixes), width), pad, dtype=torch.long)
    keep = torch.zeros((len(suffixes), width), dtype=torch.long)
    for row, suffix in enumerate(suffixes):  # right padding: real tokens never see the pads
        ids[row, : len(suffix)] = torch.tensor(suffix)
        keep[row, : len(suffix)] = 1
    mask = torch.cat([torch.ones(len(suffixes), prefix, dtype=torch.long), keep], dim=1)
    positions = (prefix + torch.arange(width)).expand(len(suffixes), -1)
    cache = _select_rows(cache, image_index)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    first_logits = out.logits[torch.arange(len(suffixes)), lengths - 1].float()
    token = first_logits.argmax(dim=-1)
    generated = [[int(t)] for t in token]
    done = torch.tensor([int(t) in eos for t in token])
    next_pos = prefix + lengths
    for _ in range(max_new_tokens - 1):
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones(len(suffixes), 1, dtype=torch.long)], dim=1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                    past_key_values=out.past_key_values, use_cache=True)
        token = torch.where(done, torch.tensor(pad), out.logits[:, -1].argmax(dim=-1))
        for row, t in enumerate(token):
            if not done[row]:
                generated[row].append(int(t))
        done |= torch.tensor([int(t) in eos for t in token])
        next_pos = next_pos + 1
    return generated, first_logits


@torch.no_grad()
def answer_by_image(model: Any, processor: Any, image_paths: Sequence[str], questions: Sequence[str],
                    max_new_tokens: int = 3, images_per_batch: int = 8, on_batch=None) -> tuple[list[str], torch.Tensor]:
    """Replies (decoded new tokens) and first-answer-token logits [n, vocab], in input order.

    `processor` must expose `encode_prompt(question) -> ids` and `(images, prompts) -> batch`
    (our DefaultProcessor)."""
    prompts = [processor.encode_prompt(q) for q in questions]
    prefix = common_prefix_length(prompts)
    by_image: OrderedDict[str, list[int]] = OrderedDict()
    for index, path in enumerate(image_paths):
        by_image.setdefault(path, []).append(index)
    replies: list[str] = [""] * len(questions)
    logits: list[torch.Tensor | None] = [None] * len(questions)
    dtype = next(model.parameters()).dtype
    eos = _eos_ids(model, processor)
    paths = list(by_image)
    for start in range(0, len(paths), images_per_batch):
        chunk = paths[start:start + images_per_batch]
        pixel_values = processor([open_image(p) for p in chunk], [questions[by_image[p][0]] for p in chunk])["pixel_values"]
        prefix_ids = torch.tensor([prompts[by_image[p][0]][:prefix] for p in chunk])
        out = model(input_ids=prefix_ids, attention_mask=torch.ones_like(prefix_ids), pixel_values=pixel_values.to(dtype), use_cache=True)
        members = [(row, index) for row, p in enumerate(chunk) for index in by_image[p]]
        image_index = torch.tensor([row for row, _ in members])
        tokens, first = _answer_group(model, processor, [prompts[i] for _, i in members], image_index, out.past_key_values,
                                      prefix, max_new_tokens, eos)
        for (_, index), toks, row_logits in zip(members, tokens, first):
            replies[index] = processor.decode(toks).strip()
            logits[index] = row_logits
        if on_batch is not None:
            on_batch(len(members))
    return replies, torch.stack(logits)
