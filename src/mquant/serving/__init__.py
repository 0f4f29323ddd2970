"""Serving engines running mquant-format models as they are (top layer, above the api): the vLLM
plugin `mquant.serving.vllm` and its engine-free half `served`."""
