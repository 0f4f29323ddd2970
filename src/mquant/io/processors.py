"""Processors: loading a model directory's transformers processor with exactly what the install
has, and saving the processor next to a quantized model (`mquant_config.json` records which kind).

transformers 5.23 builds every video processor (Qwen2/2.5/3-VL, GLM-4V, InternVL, LLaVA-OneVision)
on torchvision, which the install does not ship (its PyPI wheels are CUDA builds), so
`AutoProcessor.from_pretrained` on such a directory raises ImportError even though images need only
the PIL image processor. Without torchvision we load the same processor class minus its video
processor (`image_only`): identical for images, saved under the real class name, and videos fail
with a one-line error. Any other missing package becomes a one-line DependencyError.
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from mquant.demo.processor import DefaultProcessor, llava_processor
from mquant.errors import DependencyError

# The pip spec to name for a missing package, where the bare name is not the right fix.
_PIP_SPECS = {"torchvision": "torchvision==0.28.0 (the release built for torch 2.13)"}


def save_processor(processor: Any, out_dir: Path) -> dict[str, Any]:
    """Save the processor next to the weights, as the standard transformers files (the default
    model's as its equivalent LlavaProcessor); returns what `load_saved_processor` needs."""
    if isinstance(processor, DefaultProcessor):
        _save_standard(llava_processor(processor.tokenizer), Path(out_dir))
        return {"processor": "default"}
    if processor is not None and hasattr(processor, "save_pretrained"):
        _save_standard(processor, Path(out_dir))
        return {"processor": "auto"}
    return {"processor": None}


def _save_standard(processor: Any, out_dir: Path) -> None:
    """`save_pretrained`, plus the hub's preprocessor_config.json: transformers 5 nests the image
    processor inside processor_config.json only, which older readers (and AutoVideoProcessor's
    fallback, when torchvision is installed later) do not look in."""
    processor.save_pretrained(out_dir)
    _portable_tokenizer_class(out_dir / "tokenizer_config.json")
    image = getattr(processor, "image_processor", None)
    target = out_dir / "preprocessor_config.json"
    if image is not None and not target.exists():
        target.write_text(json.dumps(image.to_dict() | {"processor_class": type(processor).__name__}, indent=2, sort_keys=True) + "\n")


def _portable_tokenizer_class(path: Path) -> None:
    """transformers 5 names a tokenizer built from tokenizer.json alone `TokenizersBackend`, a class
    no earlier release has; `PreTrainedTokenizerFast` is what hub repos say for it and every
    transformers >= 4 (5 included, as an alias) loads."""
    if path.is_file():
        config = json.loads(path.read_text())
        if config.get("tokenizer_class") == "TokenizersBackend":
            path.write_text(json.dumps(config | {"tokenizer_class": "PreTrainedTokenizerFast"}, indent=2, ensure_ascii=False) + "\n")


def load_saved_processor(model_dir: str | Path, config_name: str = "mquant_config.json") -> Any:
    """The processor saved by `save_processor` next to a model (`config_name` holds its kind)."""
    meta = json.loads((Path(model_dir) / config_name).read_text())
    kind = meta.get("processor")
    if kind == "default":
        # lazy: transformers' auto classes take seconds to import
        from transformers import AutoTokenizer

        return DefaultProcessor(AutoTokenizer.from_pretrained(str(model_dir)))
    if kind == "auto":
        return load_processor(str(model_dir))
    return None


def load_processor(source: str, model_type: str | None = None) -> Any:
    """The processor of a model directory or hub id, as AutoProcessor would build it, without
    needing torchvision for image inputs."""
    # lazy: transformers' auto classes take seconds to import
    from transformers import AutoProcessor

    try:
        cls = _processor_class(source, model_type)
        if cls is not None and "video_processor" in cls.get_attributes() and find_spec("torchvision") is None:
            return image_only(cls).from_pretrained(source)
        return AutoProcessor.from_pretrained(source)
    except ImportError as exc:
        package = missing_package(exc)
        raise DependencyError(f"the processor of {source} needs {package}, which is not installed; "
                              f"pip install {_PIP_SPECS.get(package, package)}") from exc


def _processor_class(source: str, model_type: str | None) -> type | None:
    """The processor class the directory names (processor_class in its processor, image processor
    or tokenizer config), else the one transformers maps the model type to."""
    # lazy: transformers' auto classes take seconds to import
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = None
    for file in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = Path(source) / file
        if path.is_file() and name is None:
            name = json.loads(path.read_text()).get("processor_class")
    name = name or PROCESSOR_MAPPING_NAMES.get(model_type or "")
    cls = getattr(transformers, name, None) if name else None
    return cls if isinstance(cls, type) and hasattr(cls, "get_attributes") else None


@cache
def image_only(cls: type) -> type:
    """`cls` without its video processor. ProcessorMixin takes its sub-processors from
    `get_attributes()` (loading, checking, saving), so dropping the attribute there is enough; the
    class keeps its name, so what it saves is the standard `processor_class` files."""

    class ImageOnly(cls):
        @classmethod
        def get_attributes(klass):
            return [a for a in super().get_attributes() if a != "video_processor"]

        def __call__(self, *args, **kwargs):
            if kwargs.get("videos") is not None:
                raise DependencyError(f"{cls.__name__} was loaded without its video processor (torchvision is not installed); "
                                      f"pip install {_PIP_SPECS['torchvision']} to process videos")
            return super().__call__(*args, **kwargs)

    ImageOnly.__name__ = ImageOnly.__qualname__ = cls.__name__
    ImageOnly.__module__ = cls.__module__
    return ImageOnly


def missing_package(exc: ImportError) -> str:
    """The package an ImportError says is missing (transformers' 'requires the X library', or the
    module a ModuleNotFoundError could not find)."""
    match = re.search(r"requires the (\w+) library", str(exc))
    if match:
        return match.group(1).lower()
    name = getattr(exc, "name", None)
    if not name:
        quoted = re.search(r"'([\w.]+)'", str(exc))
        name = quoted.group(1) if quoted else "an optional package"
    return name.split(".")[0]
