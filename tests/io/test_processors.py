"""Processors load with exactly what install.sh installs: a Qwen2-VL directory (video processor
needs torchvision) loads and quantizes through the CLI, its saved processor builds the same inputs,
and a missing optional package is a one-line error naming the pip install."""

import json
import sys
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from PIL import Image

from mquant.errors import DependencyError
from mquant.io.loader import load_quantized
from mquant.io.processors import load_processor, load_saved_processor, missing_package
from mquant.testing.tiny import tiny_case
from mquant.testing.tiny.processors import tiny_qwen_processor

NO_TORCHVISION = find_spec("torchvision") is None
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _image(seed, size=(32, 24)):
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def _hub_style(directory, processor_class):
    """The file layout of a hub Qwen-VL repo: preprocessor_config.json (image processor +
    processor_class), tokenizer files, chat template; no processor_config.json."""
    nested = json.loads((directory / "processor_config.json").read_text())
    image = nested.pop("image_processor") | {"processor_class": processor_class}
    (directory / "preprocessor_config.json").write_text(json.dumps(image))
    (directory / "processor_config.json").unlink()
    return directory


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def qwen(request, tmp_path_factory):
    """(family, directory) of a tiny Qwen-VL saved like a hub repo, processor included."""
    case = tiny_case(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    case.model.save_pretrained(directory)
    processor = tiny_qwen_processor(case.model)
    processor.save_pretrained(directory)
    return request.param, _hub_style(directory, type(processor).__name__)


def _encode(processor, image):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=[image], text=[text], return_tensors="pt")


def test_qwen_processors_load_without_torchvision(qwen):
    family, qwen_dir = qwen
    processor = load_processor(str(qwen_dir))
    assert type(processor).__name__ == {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                                        "qwen3_vl": "Qwen3VLProcessor"}[family]
    if NO_TORCHVISION:
        assert "video_processor" not in type(processor).get_attributes()
    batch = _encode(processor, _image(0))
    grid = batch["image_grid_thw"][0]
    assert int((batch["input_ids"] == 250).sum()) == int(grid.prod()) // 4  # merge 2x2
    with torch.no_grad():
        assert torch.isfinite(tiny_case(family).model(**batch).logits).all()


@pytest.mark.skipif(not NO_TORCHVISION, reason="the image-only path is taken only without torchvision")
def test_videos_are_refused_in_one_line(qwen):
    _, qwen_dir = qwen
    with pytest.raises(DependencyError, match="pip install torchvision") as info:
        load_processor(str(qwen_dir))(text=["t3"], videos=[np.zeros((2, 8, 8, 3), np.uint8)])
    assert "\n" not in str(info.value)


def test_quantize_cli_on_a_saved_qwen_vl_directory(qwen, tmp_path, monkeypatch):
    from mquant.cli import main

    _, qwen_dir = qwen
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(2):
        _image(i + 1, (32, 32)).save(calib / f"{i}.png")
    out = tmp_path / "q"
    monkeypatch.setattr(sys, "argv", ["mquant", "quantize", str(qwen_dir), "--method", "rtn", "--scheme", "w8a8", "--calib", str(calib),
                                      "--n-calib", "2", "--out", str(out)])
    main()
    model = load_quantized(out)
    saved, original = load_saved_processor(out), load_processor(str(qwen_dir))
    mine, theirs = _encode(saved, _image(5)), _encode(original, _image(5))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with torch.no_grad():
        assert torch.isfinite(model(**mine).logits).all()


def test_missing_optional_package_is_one_line_error(qwen, tmp_path, monkeypatch, capsys):
    import transformers

    from mquant.cli import main

    def broken(*args, **kwargs):  # how transformers reports a backend it lacks
        raise ImportError("Qwen2VLImageProcessor requires the Torchvision library but it was not found in your environment.")

    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", broken)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", broken)
    monkeypatch.setattr(sys, "argv", ["mquant", "quantize", str(qwen[1]), "--method", "rtn", "--out", str(tmp_path / "q")])
    with pytest.raises(SystemExit) as code:
        main()
    message = capsys.readouterr().err.strip()
    assert code.value.code == 2 and message.count("\n") == 0, message  # before any weight is read
    assert message.startswith("error: ") and "needs torchvision" in message and "pip install torchvision==" in message


def test_missing_package_names():
    assert missing_package(ImportError("X requires the Torchvision library but it was not found")) == "torchvision"
    assert missing_package(ModuleNotFoundError("No module named 'timm.layers'", name="timm.layers")) == "timm"


def test_saved_processors_have_the_hub_files(tmp_path):
    """preprocessor_config.json (the image processor with its processor_class) next to transformers 5's
    processor_config.json, and a tokenizer class every transformers release knows."""
    from mquant.io.processors import save_processor

    processor = tiny_qwen_processor(tiny_case("qwen2_vl").model)
    save_processor(processor, tmp_path)
    image = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert image["processor_class"] == "Qwen2VLProcessor" and image["image_processor_type"] == "Qwen2VLImageProcessor"
    assert image["patch_size"] == 4 and image["merge_size"] == 2
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    again = load_processor(str(tmp_path))
    assert again.image_processor.to_dict() == processor.image_processor.to_dict()


def test_default_model_exports_carry_a_loadable_llava_processor(tmp_path):
    """The default model's processor (DefaultProcessor) is written as a standard LlavaProcessor by
    both formats, so AutoProcessor (and a serving engine) can build its inputs."""
    import copy

    from transformers import AutoProcessor

    from mquant.api import quantize, save_quantized
    from mquant.config import recipe_for
    from mquant.demo.processor import NUM_IMAGE_TOKENS, DefaultProcessor
    from mquant.demo.smollm import load_smollm2_tokenizer
    from mquant.io.compressed import export_compressed_tensors

    case = tiny_case("llava_dinov2")
    model = copy.deepcopy(case.model)
    quantize(model, recipe_for("rtn", "w8a8"), [case.batch(batch_size=1, seed=0)])
    processor = DefaultProcessor(load_smollm2_tokenizer())
    for out in (export_compressed_tensors(model, tmp_path / "ct", processor=processor), save_quantized(model, tmp_path / "mq", processor)):
        assert {"preprocessor_config.json", "processor_config.json", "chat_template.jinja", "tokenizer.json"} <= {p.name for p in out.iterdir()}
        standard = AutoProcessor.from_pretrained(str(out))
        batch = standard(images=[_image(0)], text=["<empty_output> hi"], return_tensors="pt")
        assert int((batch["input_ids"] == processor.image_token_id).sum()) == NUM_IMAGE_TOKENS
    assert isinstance(load_saved_processor(tmp_path / "mq"), DefaultProcessor)
