"""The vLLM plugin: `vllm serve DIR` on a directory written by `mquant quantize` (our format).

Registered in pyproject.toml as a `vllm.general_plugins` entry point, so vLLM calls `register()` in
every process it starts (engine and workers) before it reads a model config; `register()` adds the
quantization method "mquant" (`register_quantization_config`). vLLM then picks it from config.json's
`quantization_config.quant_method` (io/serving_config.py), or from `quantization="mquant"` for
directories saved before that entry existed. The classes live in `_vllm_impl` because they subclass
vLLM's; this module imports without vLLM so mquant works where vLLM is not installed.
"""

from __future__ import annotations

QUANT_METHOD = "mquant"


def register() -> None:
    """vLLM general-plugin entry point: make the "mquant" quantization method known to vLLM."""
    # optional: vLLM is installed only where models are served (its own venv, its own torch pin)
    from mquant.serving import _vllm_impl

    _vllm_impl.register()
