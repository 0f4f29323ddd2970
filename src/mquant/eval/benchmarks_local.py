"""Loaders for benchmark data a user already has on disk, in each benchmark's released format,
turned into one `BenchItem` shape; and `score_predictions` to score a model's answers.

Nothing here downloads: users bring TextVQA / DocVQA / OCRBench / MME files themselves.
Every malformed input raises `InputError` naming the file (and record) and what is wrong.
"""

from __future__ import annotations

import base64
import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mquant.errors import InputError
from mquant.eval import scorers

_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


@dataclass(frozen=True)
class BenchItem:
    """One question: the image file, the prompt text, accepted answers, benchmark extras."""

    image_path: Path
    question: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"{path}: file not found; pass the benchmark's annotation JSON")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); re-download the annotation file") from exc


def _data_list(doc: Any, path: Path) -> list[Any]:
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise InputError(f"{path}: expected an object with a 'data' list (the released format)")
    return doc["data"]


def _field(record: Any, key: str, kind: type | tuple[type, ...], path: Path, index: int) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise InputError(f"{path}: record {index} has no '{key}' field")
    value = record[key]
    if not isinstance(value, kind):
        raise InputError(f"{path}: record {index} field '{key}' has type {type(value).__name__}")
    return value


def _answers(record: Any, path: Path, index: int, required: bool) -> list[str]:
    if not required and (not isinstance(record, dict) or record.get("answers") is None):
        return []
    value = _field(record, "answers", (list, str), path, index)
    answers = [value] if isinstance(value, str) else value
    if not all(isinstance(a, str) for a in answers) or (required and not answers):
        raise InputError(f"{path}: record {index} 'answers' must be a non-empty list of strings")
    return list(answers)


def _check_images(items: list[BenchItem], source: Path) -> list[BenchItem]:
    missing = [item.image_path for item in items if not item.image_path.is_file()]
    if missing:
        raise InputError(
            f"{source}: {len(missing)} image(s) not found, first {missing[0]}; pass the right image folder"
        )
    return items


def load_textvqa(
    json_path: str | Path, image_dir: str | Path, require_answers: bool = True, check_images: bool = True
) -> list[BenchItem]:
    """TextVQA `TextVQA_0.5.1_<split>.json`: `data` records with `question`, `image_id` and
    `answers` (10 human answers); images are `<image_dir>/<image_id>.jpg`."""
    path, images = Path(json_path), Path(image_dir)
    items = []
    for i, rec in enumerate(_data_list(_read_json(path), path)):
        image_id = _field(rec, "image_id", str, path, i)
        items.append(
            BenchItem(
                image_path=images / f"{image_id}.jpg",
                question=_field(rec, "question", str, path, i),
                answers=_answers(rec, path, i, require_answers),
                meta={"question_id": rec.get("question_id", i), "image_id": image_id},
            )
        )
    return _check_images(items, path) if check_images else items


def load_docvqa(
    json_path: str | Path,
    image_root: str | Path | None = None,
    require_answers: bool = True,
    check_images: bool = True,
) -> list[BenchItem]:
    """DocVQA `<split>_v1.0.json`: `data` records with `question`, `image` (a path such as
    `documents/abc.png`, relative to `image_root`, default the JSON's folder) and `answers`."""
    path = Path(json_path)
    root = path.parent if image_root is None else Path(image_root)
    items = []
    for i, rec in enumerate(_data_list(_read_json(path), path)):
        items.append(
            BenchItem(
                image_path=root / _field(rec, "image", str, path, i),
                question=_field(rec, "question", str, path, i),
                answers=_answers(rec, path, i, require_answers),
                meta={"question_id": rec.get("questionId", i), "doc_id": rec.get("docId")},
            )
        )
    return _check_images(items, path) if check_images else items


def load_ocrbench(
    json_path: str | Path, image_root: str | Path | None = None, check_images: bool = True
) -> list[BenchItem]:
    """OCRBench `OCRBench.json`: a list of records with `image_path` (relative to `image_root`,
    default the JSON's folder), `question`, `answers`, `type` (the category) and `dataset_name`
    (which selects the HME100k rule)."""
    path = Path(json_path)
    root = path.parent if image_root is None else Path(image_root)
    doc = _read_json(path)
    if not isinstance(doc, list):
        raise InputError(f"{path}: expected a JSON list of OCRBench records")
    items = []
    for i, rec in enumerate(doc):
        category = _field(rec, "type", str, path, i)
        if category not in scorers.OCRBENCH_CATEGORIES:
            raise InputError(f"{path}: record {i} has unknown OCRBench type {category!r}")
        items.append(
            BenchItem(
                image_path=root / _field(rec, "image_path", str, path, i),
                question=_field(rec, "question", str, path, i),
                answers=_answers(rec, path, i, True),
                meta={"type": category, "dataset_name": _field(rec, "dataset_name", str, path, i),
                      "id": rec.get("id", i)},
            )
        )  # fmt: skip
    return _check_images(items, path) if check_images else items


def _mme_pairs(txt: Path) -> list[tuple[str, str]]:
    """One MME question file: lines `question<TAB>yes|no`, usually two per image."""
    pairs = []
    for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        question, sep, answer = line.rpartition("\t")
        if not sep or answer.strip().lower() not in ("yes", "no"):
            raise InputError(f"{txt}: line {n} is not 'question<TAB>yes|no'")
        pairs.append((question.strip(), answer.strip()))
    return pairs


def _find_image(folder: Path, stem: str, txt: Path) -> Path:
    for suffix in _IMAGE_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise InputError(f"{txt}: no image named {stem}.jpg/.png in {folder}")


def load_mme_folder(root: str | Path) -> list[BenchItem]:
    """MME release layout: one folder per subtask; either `images/` + `questions_answers_YN/`
    (artwork, celebrity, landmark, posters, scene) or images and `.txt` files side by side."""
    base = Path(root)
    if not base.is_dir():
        raise InputError(f"{base}: MME folder not found; pass MME_Benchmark_release_version")
    items = []
    for subtask_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        qa_dir = subtask_dir / "questions_answers_YN"
        image_dir = subtask_dir / "images" if qa_dir.is_dir() else subtask_dir
        for txt in sorted((qa_dir if qa_dir.is_dir() else subtask_dir).glob("*.txt")):
            image = _find_image(image_dir, txt.stem, txt)
            for question, answer in _mme_pairs(txt):
                meta = {"subtask": subtask_dir.name, "image_id": f"{subtask_dir.name}/{image.name}"}
                items.append(BenchItem(image, question, [answer], meta))
    if not items:
        raise InputError(f"{base}: no subtask folders with question .txt files; is this the MME root?")
    return items


def load_mme_tsv(tsv_path: str | Path, image_dir: str | Path | None = None) -> list[BenchItem]:
    """MME as one TSV (VLMEvalKit `MME.tsv`, or lmms-eval's MME exported with `question_id`):
    columns `question`, `answer`, `category` and either `image` (base64; a short numeric value
    refers to the row with that `index`, as VLMEvalKit de-duplicates images) or `image_path`
    (relative to the TSV's folder). Base64 images are written once to `image_dir` (default
    `<tsv stem>_images/` beside the TSV). Questions are paired for acc+ by `question_id` when
    present, else by image."""
    path = Path(tsv_path)
    if not path.is_file():
        raise InputError(f"{path}: file not found; pass the MME .tsv file")
    csv.field_size_limit(sys.maxsize)  # base64 images exceed csv's 128 KB default field size
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    columns = set(rows[0]) if rows else set()
    missing = {"question", "answer", "category"} - columns
    if missing or not columns & {"image", "image_path"}:
        raise InputError(
            f"{path}: needs columns question, answer, category and image or image_path; "
            f"missing {sorted(missing) or ['image/image_path']}"
        )
    out_dir = path.parent / f"{path.stem}_images" if image_dir is None else Path(image_dir)
    by_index = {row.get("index", str(i)): row for i, row in enumerate(rows)}
    items = []
    for i, row in enumerate(rows):
        if row.get("image"):  # embedded bytes win: VLMEvalKit's image_path names its own cache
            image_id = _resolve_index(row, by_index, path, i)
            image = _write_b64_image(by_index[image_id]["image"], out_dir / f"{image_id}.jpg", path, i)
        elif row.get("image_path"):
            image, image_id = path.parent / row["image_path"], row["image_path"]
        else:
            raise InputError(f"{path}: row {i} has neither image data nor an image_path")
        # lmms-eval's question_id is the image file name, shared by an image's two questions
        image_id = row.get("question_id") or image_id
        items.append(
            BenchItem(image, row["question"], [row["answer"]],
                      {"subtask": row["category"], "image_id": f"{row['category']}/{image_id}",
                       "index": row.get("index", str(i))})
        )  # fmt: skip
    return _check_images(items, path)


def _resolve_index(row: dict[str, str], by_index: dict[str, dict[str, str]], path: Path, i: int) -> str:
    """The index of the row holding this row's image bytes (itself unless it is a reference)."""
    value = (row.get("image") or "").strip()
    if len(value) <= 64:  # VLMEvalKit stores the other row's index instead of repeating bytes
        if value not in by_index or len(by_index[value].get("image") or "") <= 64:
            raise InputError(f"{path}: row {i} image {value!r} is neither base64 nor a row index")
        return value
    return row.get("index", str(i))


def _write_b64_image(data: str, target: Path, path: Path, i: int) -> Path:
    if not target.is_file():
        try:
            raw = base64.b64decode(data, validate=False)
        except ValueError as exc:
            raise InputError(f"{path}: row {i} image is not valid base64 ({exc})") from exc
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(raw)
    return target


TASKS = ("textvqa", "vqav2", "docvqa", "ocrbench", "mme", "easy_vqa")


def score_predictions(task: str, items: Sequence[BenchItem], predictions: Sequence[str]) -> dict[str, Any]:
    """Score `predictions` (one reply per item, same order) with the task's official metric.

    Returns a dict whose `score` is the headline number: mean VQA accuracy (textvqa, vqav2),
    mean ANLS (docvqa), total out of 1000 (ocrbench), perception + cognition (mme), mean
    first-word exact match (easy_vqa); plus per-category details where the benchmark has them."""
    name = task.lower().replace("-", "_")
    if name not in TASKS:
        raise InputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if len(items) != len(predictions):
        raise InputError(f"{len(items)} items but {len(predictions)} predictions; pass one per item")
    if not items:
        raise InputError(f"no items to score for task {task!r}")
    if any(not item.answers for item in items):
        raise InputError(f"{task}: some items have no answers (a test split?); score a split with answers")
    if name in ("textvqa", "vqav2", "docvqa", "easy_vqa"):
        metric = {"docvqa": scorers.anls, "easy_vqa": scorers.exact_match}.get(name, scorers.vqa_accuracy)
        per_item = [metric(p, item.answers) for p, item in zip(predictions, items)]
        return {"score": sum(per_item) / len(per_item), "per_item": per_item, "n": len(per_item)}
    if name == "ocrbench":
        result = scorers.ocrbench_score(
            predictions, [i.answers for i in items],
            [_meta(i, "type", task) for i in items], [_meta(i, "dataset_name", task) for i in items],
        )  # fmt: skip
        return {"score": result["total"], **result}
    result = scorers.mme_scores(
        predictions, [i.answers[0] for i in items],
        [_meta(i, "subtask", task) for i in items], [_meta(i, "image_id", task) for i in items],
    )  # fmt: skip
    return {"score": result["total"], **result}


def _meta(item: BenchItem, key: str, task: str) -> str:
    if key not in item.meta:
        raise InputError(f"{task}: item for {item.image_path} has no meta[{key!r}]; load it with this module")
    return str(item.meta[key])
