"""Calibration samples: image + prompt pairs from the offline default set, a folder, a JSONL file or
a `datasets` name, encoded into model inputs by the model's processor; for a text-only causal LM,
text from the same kinds of source, tokenized into windows of TEXT_TOKENS tokens.

Calibration always comes from *training* data: the default source is the easy-VQA train split,
never the test split that evaluation scores; the default text is the part of Python's bundled
`pydoc_data` prose after the first EVAL_TEXT_CHARS characters, which the perplexity task scores.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mquant.calib.prompts import diverse_prompt, text_only_turns
from mquant.config import CalibConfig
from mquant.demo.easyvqa import load_split
from mquant.errors import CalibrationError, InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}
TEXT_SUFFIXES = {".txt", ".md"}
DEFAULT_PROMPT = "Describe the image."
EVAL_TEXT_CHARS = 200_000  # eval/perplexity.py scores text[:EVAL_TEXT_CHARS]; calibration text starts after it
TEXT_TOKENS = 256  # tokens per text calibration sample


@dataclass(frozen=True)
class CalibPair:
    image_path: str
    prompt: str


def _default_pairs() -> list[CalibPair]:
    return [CalibPair(item.image_path, item.question) for item in load_split("train")]


def _folder_pairs(folder: Path) -> list[CalibPair]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return [CalibPair(str(p), DEFAULT_PROMPT) for p in paths]


def _jsonl_pairs(path: Path) -> list[CalibPair]:
    pairs = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image = Path(record["image"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CalibrationError(f"{path}:{line_no}: expected a JSON object with 'image' and 'prompt' ({exc})") from exc
        if not image.is_absolute():
            image = path.parent / image
        pairs.append(CalibPair(str(image), str(record.get("prompt", DEFAULT_PROMPT))))
    return pairs


def _dataset_pairs(name: str, n: int) -> list[CalibPair]:
    """Online users: a Hugging Face dataset with an image column and a question/prompt column."""
    try:
        import datasets  # noqa: F401
    except ImportError as exc:
        raise CalibrationError(
            f"calibration source '{name}' is not a folder or .jsonl file, and `datasets` is not installed to fetch it; "
            "pip install datasets, or pass a local folder/JSONL"
        ) from exc
    # optional: only online calibration sets need `datasets`
    from datasets import load_dataset

    try:
        data = load_dataset(name, split=f"train[:{n}]")
    except Exception as exc:  # network / missing dataset: one line for the user
        raise CalibrationError(f"could not load dataset '{name}' ({type(exc).__name__}); use a local folder or JSONL offline") from exc
    cache = Path.home() / ".cache" / "mquant" / "calib" / name.replace("/", "__")
    cache.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i, row in enumerate(data):
        image = row.get("image")
        prompt = row.get("question") or row.get("prompt") or DEFAULT_PROMPT
        if image is None:
            continue
        path = cache / f"{i}.png"
        image.convert("RGB").save(path)
        pairs.append(CalibPair(str(path), str(prompt)))
    return pairs


def load_calibration_pairs(config: CalibConfig) -> list[CalibPair]:
    """`config.n_samples` pairs, chosen with `config.seed` (deterministic)."""
    source = config.source
    path = Path(source)
    if source == "default":
        pairs = _default_pairs()
    elif path.is_dir():
        pairs = _folder_pairs(path)
    elif path.suffix == ".jsonl":
        if not path.exists():
            raise CalibrationError(f"calibration file {path} does not exist; pass an existing .jsonl of image+prompt records")
        pairs = _jsonl_pairs(path)
    elif path.exists():
        raise CalibrationError(f"calibration source {path} is a file but not .jsonl; pass a folder of images or a .jsonl file")
    else:
        pairs = _dataset_pairs(source, config.n_samples)
    if not pairs:
        raise CalibrationError(f"calibration source '{source}' holds no images; add image files or image+prompt records")
    rng = random.Random(config.seed)
    return rng.sample(pairs, min(config.n_samples, len(pairs)))


def open_image(path: str):
    # lazy: PIL only when an image is opened
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"image {path} cannot be decoded ({type(exc).__name__}); remove it or replace it with a valid PNG/JPEG") from exc


def encode_pair(processor: Any, image, prompt: str) -> dict:
    """One model-input dict (batch of 1). Works with our DefaultProcessor and HF processors."""
    if hasattr(processor, "apply_chat_template"):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        return dict(processor(images=[image], text=[text], return_tensors="pt"))
    return dict(processor([image], [prompt]))


def build_calibration_inputs(config: CalibConfig, processor: Any, model: Any) -> list[dict]:
    """`config.n_samples` model-input dicts; with `n_validation`, that many more follow (disjoint
    pairs, same options) — `split_validation` separates them. See CalibConfig for the options."""
    if processor is None:
        raise CalibrationError("calibration needs the model's processor to encode images and prompts; pass processor=")
    dtype = next(model.parameters()).dtype
    pairs = load_calibration_pairs(replace(config, n_samples=config.n_samples + config.n_validation))
    rng = random.Random(f"calib-prompts:{config.seed}")
    if config.prompts == "diverse":
        pairs = [CalibPair(p.image_path, diverse_prompt(p.prompt, rng)) for p in pairs]
    n_text = round(config.text_fraction * len(pairs))
    text_at = set(rng.sample(range(len(pairs)), n_text))
    turns = iter(text_only_turns(_default_text(), n_text, rng)) if n_text else iter(())
    samples = []
    for index, pair in enumerate(pairs):
        if index in text_at:  # text-only chat turn: the text scales see text that is not about an image
            samples.append(encode_text_turn(processor, next(turns)))
            continue
        batch = encode_pair(processor, open_image(pair.image_path), pair.prompt)
        if "pixel_values" in batch and batch["pixel_values"].is_floating_point():
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
        samples.append(batch)
    if config.decode_tokens:
        samples = [with_decoded_tokens(model, s, config.decode_tokens) for s in samples]
    return samples


def split_validation(samples: list[dict], config: CalibConfig) -> tuple[list[dict], list[dict]]:
    """(calibration, validation) samples of `build_calibration_inputs(config, ...)`."""
    return samples[: config.n_samples], samples[config.n_samples:]


def encode_text_turn(processor: Any, text: str) -> dict:
    """One text-only user turn in the model's chat template (no image), batch of 1."""
    if hasattr(processor, "encode_text_turn"):
        ids = processor.encode_text_turn(text)
        return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    return dict(processor(text=[processor.apply_chat_template(messages, add_generation_prompt=True)], return_tensors="pt"))


@torch.no_grad()
def with_decoded_tokens(model: Any, sample: dict, n_tokens: int) -> dict:
    """`sample` with the float model's first `n_tokens` greedy tokens appended: one forward over the
    longer sequence shows every layer the activations those decode steps have (causal attention:
    a decoded token's rows equal its rows in the teacher-forced sequence), as calibrating through
    `generate()` does."""
    out = model.generate(**sample, max_new_tokens=n_tokens, do_sample=False)
    new = out[:, sample["input_ids"].shape[1]:]
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    # A decode step reads the token generated before it; the final EOS is never read back.
    new = new[:, [i for i, t in enumerate(new[0].tolist()) if t not in eos]]
    mask = torch.ones_like(new, dtype=sample["attention_mask"].dtype)
    return {**sample, "input_ids": torch.cat([sample["input_ids"], new], dim=1),
            "attention_mask": torch.cat([sample["attention_mask"], mask], dim=1)}


# ---- text-only causal LMs ------------------------------------------------------------------------
def _default_text() -> str:
    try:
        # lazy: only text-only models calibrate on the bundled prose
        from pydoc_data.topics import topics
    except ImportError as exc:  # stripped-down Pythons drop it
        raise CalibrationError("pydoc_data is missing from this Python, so there is no default calibration text; "
                               "pass --calib with a folder of .txt files or a JSONL of {\"text\"} records") from exc
    return "\n\n".join(topics[key].strip() for key in sorted(topics))[EVAL_TEXT_CHARS:]


def load_calibration_texts(config: CalibConfig) -> list[str]:
    """The texts of a text calibration source: the default prose (one text, cut into windows
    later), a folder of .txt/.md files, a JSONL of {"text"} (or {"prompt"}) records, or a
    `datasets` name with a "text" column."""
    source, path = config.source, Path(config.source)
    if source == "default":
        return [_default_text()]
    if path.is_dir():
        texts = [p.read_text(errors="replace") for p in sorted(path.rglob("*")) if p.suffix.lower() in TEXT_SUFFIXES]
    elif path.suffix == ".jsonl":
        if not path.exists():
            raise CalibrationError(f"calibration file {path} does not exist; pass an existing .jsonl of text records")
        texts = []
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            try:
                record = json.loads(line) if line.strip() else {}
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"{path}:{line_no}: expected a JSON object with 'text' ({exc})") from exc
            texts.append(str(record.get("text") or record.get("prompt") or "") if isinstance(record, dict) else "")
    elif path.exists():
        raise CalibrationError(f"calibration source {path} is a file but not .jsonl; pass a folder of .txt files or a .jsonl file")
    else:
        texts = _dataset_texts(source, config.n_samples)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CalibrationError(f"calibration source '{source}' holds no text, and this is a text-only model; "
                               "pass .txt files or a JSONL of {\"text\"} records")
    return texts


def _dataset_texts(name: str, n: int) -> list[str]:
    try:
        import datasets  # noqa: F401
    except ImportError as exc:
        raise CalibrationError(f"calibration source '{name}' is not a folder or .jsonl file, and `datasets` is not installed to fetch it; "
                               "pip install datasets, or pass a local folder/JSONL") from exc
    # optional: only online calibration sets need `datasets`
    from datasets import load_dataset

    try:
        data = load_dataset(name, split=f"train[:{n}]")
    except Exception as exc:  # network / missing dataset: one line for the user
        raise CalibrationError(f"could not load dataset '{name}' ({type(exc).__name__}); use a local folder or JSONL offline") from exc
    return [str(row.get("text") or "") for row in data]


def build_text_calibration_inputs(config: CalibConfig, tokenizer: Any) -> list[dict]:
    """`config.n_samples` windows of TEXT_TOKENS tokens (a shorter text: the whole text), drawn
    with `config.seed` from the consecutive windows of every text."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wrapping the tokenizer
    if tokenizer is None or not callable(tokenizer):
        raise CalibrationError("calibration of a text-only model needs its tokenizer to encode the text; pass processor=")
    windows = []
    for text in load_calibration_texts(config):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        windows += [ids[i:i + TEXT_TOKENS] for i in range(0, len(ids), TEXT_TOKENS) if len(ids[i:i + TEXT_TOKENS]) >= 2]
    chosen = random.Random(config.seed).sample(windows, min(config.n_samples, len(windows)))
    return [{"input_ids": torch.tensor([w]), "attention_mask": torch.ones(1, len(w), dtype=torch.long)} for w in chosen]
