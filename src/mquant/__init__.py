"""mquant: fully static post-training quantization of whole vision-language models."""

__version__ = "0.1.0"
