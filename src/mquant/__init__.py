"""mquant: fully static post-training quantization of whole vision-language models.

    import mquant
    report = mquant.quantize(model, mquant.recipe_for("mquant", "w4a8"), calib=mquant.CalibConfig(n_samples=32), processor=processor)
    mquant.save_quantized(model, "out/", processor=processor, report=report)
    model = mquant.load_quantized("out/")
"""

from mquant.config import CalibConfig, GPTQConfig, Recipe, RTNConfig, SchemeConfig, recipe_for

_API = ("load_quantized", "quantize", "quantize_and_save", "save_quantized")

__version__ = "0.1.0"

__all__ = ["CalibConfig", "GPTQConfig", "RTNConfig", "Recipe", "SchemeConfig", "load_quantized", "quantize",
           "quantize_and_save", "recipe_for", "save_quantized", "__version__"]


def __getattr__(name: str):
    if name in _API:
        # lazy: the verbs pull in transformers, calibration data and the default model; the vLLM plugin
        # (mquant.serving, run inside vLLM's own venv) imports mquant and needs none of them
        from mquant import api

        return getattr(api, name)
    raise AttributeError(f"module 'mquant' has no attribute {name!r}")
