"""Exportable wrappers around a LLaVA-style model: the vision tower + projector, and the language
model split as optimum does for decoders — a prefill graph (no past) and a decode graph (past K/V in,
present K/V out). Position ids come from the 2-D padding mask (cumsum − 1, as `generate` computes
them for left padding; right-padded rows of a multi-token step get theirs right too). The prefill
graph embeds the tokens and scatters the image features into the placeholder rows, so the host never
needs the embedding table; it returns the last position's logits [batch, vocab]. The decode graph
takes one or more new tokens, their mask and the past mask separately (the total length is then a
sum the exporter can keep dynamic) and returns logits for every new token [batch, seq, vocab].
Both return the present cache, one tensor per layer and kind, [batch, kv_heads, total, head_dim].
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from mquant.io.onnx_graph import RowModality


class VisionGraph(nn.Module):
    """pixel_values [images, 3, H, W] -> image features [images * tokens, hidden] (projected)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.core = model.model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.core.get_image_features(pixel_values=pixel_values, return_dict=True)
        feats = out.pooler_output
        feats = torch.cat(list(feats), dim=0) if isinstance(feats, (list, tuple)) else feats
        return feats.reshape(-1, feats.shape[-1])


class _Decoder(nn.Module):
    def __init__(self, model: nn.Module, rows: RowModality, image_token_id: int):
        super().__init__()
        self.language = model.model.language_model
        self.head = model.lm_head
        self.rows = rows
        self.image_token_id = image_token_id

    def run(self, embeds, attention_mask, cache, visual, last_only: bool, positions=None):
        seq = embeds.shape[1]
        if positions is None:  # M-RoPE families feed theirs (io/onnx_mrope.py)
            positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)[:, -seq:]
        if visual is not None:
            self.rows.set_prefill(visual, attention_mask)
        out = self.language(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                            past_key_values=cache, use_cache=True)
        self.rows.clear()
        hidden = out.last_hidden_state
        logits = self.head(hidden[:, -1] if last_only else hidden)
        present = []
        for layer in cache.layers:
            present += [layer.keys, layer.values]
        return (logits, *present)


class PrefillGraph(_Decoder):
    def forward(self, input_ids, attention_mask, image_features):
        return self.prefill(input_ids, attention_mask, image_features)

    def prefill(self, input_ids, attention_mask, image_features, positions=None):
        embeds = self.language.embed_tokens(input_ids)
        visual = input_ids == self.image_token_id
        embeds = embeds.masked_scatter(visual.unsqueeze(-1).expand_as(embeds), image_features.to(embeds.dtype))
        return self.run(embeds, attention_mask, DynamicCache(config=self.language.config), visual, True, positions)


class DecodeGraph(_Decoder):
    def forward(self, input_ids, attention_mask, past_attention_mask, *past):
        return self.decode(input_ids, attention_mask, past_attention_mask, past)

    def decode(self, input_ids, attention_mask, past_attention_mask, past, positions=None):
        cache = DynamicCache(config=self.language.config)
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        full_mask = torch.cat([past_attention_mask, attention_mask], dim=1)
        return self.run(self.language.embed_tokens(input_ids), full_mask, cache, None, False, positions)
