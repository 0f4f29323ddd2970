"""How closely a quantized model's next-token distribution follows the float reference.

Benchmark accuracy needs data and is noisy on small sets; the KL divergence of the quantized
model's next-token distribution from the float model's, on the same inputs, is a dense signal
that is available for any prompt and is what quantization papers report as "fidelity".
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mquant.errors import InputError

# Rows compared per step: the float64 working copies of a [rows, vocab] chunk stay ~100 MB at a
# 50k vocabulary, where a full easy-VQA test split (9,673 x 49,152) would need tens of GB at once.
_CHUNK_ROWS = 256


def _as_tensor(values: Any, name: str) -> torch.Tensor:
    """Accept torch tensors or numpy / nested lists; kept in their own float dtype (rows are
    promoted to float64 chunk by chunk in `next_token_fidelity`)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        return values if values.is_floating_point() else values.to(torch.float64)
    try:
        return torch.as_tensor(np.asarray(values, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} is not a numeric array ({exc}); pass a tensor of logits") from exc


def _flat_positions(
    ref: torch.Tensor, test: torch.Tensor, mask: Any | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten [..., vocab] logits to [positions, vocab], keeping only masked-in positions."""
    if ref.shape != test.shape:
        raise InputError(
            f"reference logits {tuple(ref.shape)} and test logits {tuple(test.shape)} differ in "
            "shape; run both models on the same inputs"
        )
    if ref.dim() < 1 or ref.shape[-1] < 1:
        raise InputError(f"logits of shape {tuple(ref.shape)} have no vocabulary axis")
    vocab = ref.shape[-1]
    ref2, test2 = ref.reshape(-1, vocab), test.reshape(-1, vocab)
    if mask is not None:
        keep = _as_tensor(mask, "mask") != 0
        if tuple(keep.shape) != tuple(ref.shape[:-1]):
            raise InputError(
                f"mask shape {tuple(keep.shape)} does not match the logits' positions "
                f"{tuple(ref.shape[:-1])}; give one flag per position"
            )
        keep = keep.reshape(-1)
        ref2, test2 = ref2[keep], test2[keep]
    if ref2.shape[0] == 0:
        raise InputError("no positions to compare (empty logits or an all-false mask)")
    if not (torch.isfinite(ref2).all() and torch.isfinite(test2).all()):
        raise InputError("logits contain NaN or Inf; the model produced non-finite outputs")
    return ref2, test2


def next_token_fidelity(
    ref_logits: Any, test_logits: Any, mask: Any | None = None
) -> dict[str, float]:
    """Compare next-token distributions position by position.

    Args:
        ref_logits: float-model logits, shape [..., vocab] (tensor or array).
        test_logits: quantized-model logits, same shape.
        mask: optional [...] flags; positions where it is 0/False are ignored (padding, prompt).

    Returns:
        kl: mean over positions of KL(P_ref || P_test) in nats;
        top1_agreement: fraction of positions whose argmax token agrees;
        max_abs_logit_diff: largest |ref - test| over compared logits;
        positions: number of positions compared.
    """
    ref, test = _flat_positions(_as_tensor(ref_logits, "ref_logits"), _as_tensor(test_logits, "test_logits"), mask)
    kl_sum, agree, max_diff = 0.0, 0, 0.0
    for start in range(0, ref.shape[0], _CHUNK_ROWS):
        # float64 so that KL of near-identical distributions (values ~1e-8) is not swamped by
        # float32 rounding; log_softmax subtracts the row max, so huge logits do not overflow.
        r = ref[start:start + _CHUNK_ROWS].to(torch.float64)
        t = test[start:start + _CHUNK_ROWS].to(torch.float64)
        log_p, log_q = torch.log_softmax(r, dim=-1), torch.log_softmax(t, dim=-1)
        # Terms with p == 0 contribute 0 (limit p log p -> 0); exp(log_p) underflowing to 0 does that.
        kl_sum += float((log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp_min(0.0).sum())
        agree += int((r.argmax(dim=-1) == t.argmax(dim=-1)).sum())
        max_diff = max(max_diff, float((r - t).abs().max()))
    positions = int(ref.shape[0])
    return {
        "kl": kl_sum / positions,
        "top1_agreement": agree / positions,
        "max_abs_logit_diff": max_diff,
        "positions": positions,
    }
