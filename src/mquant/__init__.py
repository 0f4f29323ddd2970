"""mquant: fully static post-training quantization of whole vision-language models.

    import mquant
    report = mquant.quantize(model, mquant.recipe_for("mquant", "w4a8"), calib=mquant.CalibConfig(n_samples=32), processor=processor)
    mquant.save_quantized(model, "out/", processor=processor, report=report)
    model = mquant.load_quantized("out/")
"""

from mquant.api import load_quantized, quantize, quantize_and_save, save_quantized
from mquant.config import CalibConfig, GPTQConfig, Recipe, RTNConfig, SchemeConfig, recipe_for

__version__ = "0.1.0"

__all__ = ["CalibConfig", "GPTQConfig", "RTNConfig", "Recipe", "SchemeConfig", "load_quantized", "quantize",
           "quantize_and_save", "recipe_for", "save_quantized", "__version__"]
