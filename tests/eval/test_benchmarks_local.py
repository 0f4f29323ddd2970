"""Local benchmark loaders on tiny fixtures in each released format, and score dispatch."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from mquant.errors import InputError
from mquant.eval.benchmarks_local import (
    BenchItem,
    load_docvqa,
    load_mme_folder,
    load_mme_tsv,
    load_ocrbench,
    load_textvqa,
    score_predictions,
)

FAKE_JPEG = b"\xff\xd8\xff\xe0fake"


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(FAKE_JPEG)
    return path


def _write_json(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def test_textvqa_load_and_score(tmp_path: Path) -> None:
    _touch(tmp_path / "img" / "abc.jpg")
    record = {"question": "what brand?", "image_id": "abc", "question_id": 7,
              "answers": ["nokia", "nokia"] + ["sony"] * 8}  # fmt: skip
    path = _write_json(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [record]})
    items = load_textvqa(path, tmp_path / "img")
    assert items == [BenchItem(tmp_path / "img" / "abc.jpg", "what brand?", record["answers"],
                               {"question_id": 7, "image_id": "abc"})]  # fmt: skip
    result = score_predictions("textvqa", items, ["Nokia"])
    assert result["score"] == pytest.approx(0.6) and result["n"] == 1


def test_textvqa_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        load_textvqa(tmp_path / "missing.json", tmp_path)
    bad = _write_json(tmp_path / "bad.json", {"data": [{"question": "q", "answers": ["a"]}]})
    with pytest.raises(InputError, match=r"bad.json: record 0 has no 'image_id'"):
        load_textvqa(bad, tmp_path)
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match="not valid JSON"):
        load_textvqa(tmp_path / "broken.json", tmp_path)
    no_img = _write_json(tmp_path / "v.json", {"data": [{"question": "q", "image_id": "zz", "answers": ["a"]}]})
    with pytest.raises(InputError, match="1 image"):
        load_textvqa(no_img, tmp_path)
    test_split = _write_json(tmp_path / "t.json", {"data": [{"question": "q", "image_id": "zz"}]})
    assert load_textvqa(test_split, tmp_path, require_answers=False, check_images=False)[0].answers == []


def test_docvqa_load_and_score(tmp_path: Path) -> None:
    _touch(tmp_path / "documents" / "d1.png")
    record = {"questionId": 3, "question": "date?", "image": "documents/d1.png", "docId": 9,
              "answers": ["hello world"]}  # fmt: skip
    path = _write_json(tmp_path / "val_v1.0.json", {"dataset_split": "val", "data": [record]})
    items = load_docvqa(path)
    assert items[0].image_path == tmp_path / "documents" / "d1.png"
    assert items[0].meta == {"question_id": 3, "doc_id": 9}
    assert score_predictions("docvqa", items, ["hello wrld"])["score"] == pytest.approx(10 / 11)
    with pytest.raises(InputError, match="'data' list"):
        load_docvqa(_write_json(tmp_path / "x.json", [record]))
    with pytest.raises(InputError, match="'answers' must be a non-empty list"):
        load_docvqa(_write_json(tmp_path / "y.json", {"data": [{**record, "answers": [3]}]}))


def test_ocrbench_load_and_score(tmp_path: Path) -> None:
    _touch(tmp_path / "IIIT5K" / "1.png")
    _touch(tmp_path / "HME100k" / "2.jpg")
    records = [
        {"dataset_name": "IIIT5K", "id": 0, "image_path": "IIIT5K/1.png", "question": "what is written?",
         "answers": ["CHINA"], "type": "Regular Text Recognition"},
        {"dataset_name": "HME100k", "id": 1, "image_path": "HME100k/2.jpg", "question": "latex?",
         "answers": "x ^ { 2 }", "type": "Handwritten Mathematical Expression Recognition"},
    ]  # fmt: skip
    items = load_ocrbench(_write_json(tmp_path / "OCRBench.json", records))
    assert items[1].answers == ["x ^ { 2 }"] and items[1].meta["dataset_name"] == "HME100k"
    result = score_predictions("ocrbench", items, ["it says china", "x^{2}"])
    assert result["score"] == 2 and result["text_recognition"] == 1
    with pytest.raises(InputError, match="unknown OCRBench type"):
        load_ocrbench(_write_json(tmp_path / "o.json", [{**records[0], "type": "Other"}]))


def test_mme_folder_both_layouts(tmp_path: Path) -> None:
    root = tmp_path / "MME"
    _touch(root / "artwork" / "images" / "10.jpg")
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "10.txt").write_text(
        "Is this by Monet? Please answer yes or no.\tYes\nIs this by Dali? Please answer yes or no.\tNo\n"
    )
    _touch(root / "count" / "5.png")
    (root / "count" / "5.txt").write_text("Are there two cats?\tYes\nAre there three cats?\tNo\n")
    items = load_mme_folder(root)
    assert [i.meta["subtask"] for i in items] == ["artwork"] * 2 + ["count"] * 2
    assert items[2].image_path == root / "count" / "5.png"
    assert items[0].meta["image_id"] == "artwork/10.jpg"
    result = score_predictions("mme", items, ["Yes", "No", "Yes", "Yes"])
    assert result["per_subtask"]["artwork"]["score"] == pytest.approx(200.0)
    assert result["per_subtask"]["count"]["score"] == pytest.approx(50.0)
    assert result["score"] == pytest.approx(250.0)


def test_mme_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="MME folder not found"):
        load_mme_folder(tmp_path / "nope")
    _touch(tmp_path / "color" / "1.jpg")
    (tmp_path / "color" / "1.txt").write_text("Is it red? yes\n")
    with pytest.raises(InputError, match=r"1.txt: line 1 is not 'question<TAB>yes\|no'"):
        load_mme_folder(tmp_path)
    (tmp_path / "color" / "1.txt").write_text("Is it red?\tyes\n")
    (tmp_path / "color" / "3.txt").write_text("Is it blue?\tno\n")
    with pytest.raises(InputError, match="no image named 3"):
        load_mme_folder(tmp_path)


def test_mme_tsv_paths_and_base64(tmp_path: Path) -> None:
    _touch(tmp_path / "imgs" / "a.jpg")
    (tmp_path / "paths.tsv").write_text(
        "index\tquestion\tanswer\tcategory\timage_path\n"
        "0\tIs it a cat?\tYes\tcolor\timgs/a.jpg\n1\tIs it a dog?\tNo\tcolor\timgs/a.jpg\n"
    )
    items = load_mme_tsv(tmp_path / "paths.tsv")
    assert items[0].meta["image_id"] == items[1].meta["image_id"] == "color/imgs/a.jpg"
    assert score_predictions("mme", items, ["yes", "yes"])["per_subtask"]["color"]["acc_plus"] == 0.0

    _touch(tmp_path / "imgs" / "b.jpg")
    header = "question_id\tquestion\tanswer\tcategory\timage_path\n"
    (tmp_path / "qid.tsv").write_text(
        header + "q.png\tIs it red?\tYes\tcolor\timgs/b.jpg\nq.png\tIs it blue?\tNo\tcolor\timgs/b.jpg\n"
    )
    assert {i.meta["image_id"] for i in load_mme_tsv(tmp_path / "qid.tsv")} == {"color/q.png"}
    (tmp_path / "qid.tsv").write_text(header + "q.png\tIs it red?\tYes\tcolor\timgs/b.jpg\nq\tx\tNo\tcolor\t\n")
    with pytest.raises(InputError, match="row 1 has neither image data nor an image_path"):
        load_mme_tsv(tmp_path / "qid.tsv")

    b64 = base64.b64encode(FAKE_JPEG * 20).decode()
    (tmp_path / "MME.tsv").write_text(
        "index\timage\tquestion\tanswer\tcategory\n"
        f"0\t{b64}\tIs it a cat?\tYes\tOCR\n1\t0\tIs it a dog?\tNo\tOCR\n"
    )
    items = load_mme_tsv(tmp_path / "MME.tsv")
    assert items[0].image_path == items[1].image_path == tmp_path / "MME_images" / "0.jpg"
    assert items[0].image_path.read_bytes() == FAKE_JPEG * 20
    result = score_predictions("mme", items, ["Yes", "No"])
    assert result["perception"] == pytest.approx(200.0)
    (tmp_path / "bad.tsv").write_text("question\tanswer\nq\tyes\n")
    with pytest.raises(InputError, match="needs columns"):
        load_mme_tsv(tmp_path / "bad.tsv")


def test_score_predictions_dispatch_errors(tmp_path: Path) -> None:
    item = BenchItem(tmp_path / "x.jpg", "what shape?", ["circle"], {})
    assert score_predictions("easy-vqa", [item, item], ["Circle.", "square"])["score"] == 0.5
    with pytest.raises(InputError, match="unknown task"):
        score_predictions("gqa", [item], ["a"])
    with pytest.raises(InputError, match="1 items but 2 predictions"):
        score_predictions("textvqa", [item], ["a", "b"])
    with pytest.raises(InputError, match="no meta\\['type'\\]"):
        score_predictions("ocrbench", [item], ["circle"])
