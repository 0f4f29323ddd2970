"""Standard VLM benchmark metrics, following each benchmark's official scoring rules.

Why re-implement instead of importing: the official scripts are not packaged, and a quantized
model is only comparable to published numbers if the scoring rules (normalisation quirks
included) are the same. Each function below says which official behaviour it reproduces.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Sequence

from mquant.errors import InputError

# --------------------------------------------------------------------------------------------
# VQA accuracy (VQAv2 / TextVQA), EvalAI answer processor
# --------------------------------------------------------------------------------------------

# The official contraction table (keys are the apostrophe-less spellings people type). Entries
# with capitals in the official table can never match after lower-casing, so they are omitted;
# "somebody'd" -> "somebodyd" is an official quirk kept on purpose.
_CONTRACTIONS_TEXT = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll
let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've
mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock
oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's
somethingd=something'd somethingd've=something'd've something'dve=something'd've
somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've
therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've
theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's
whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd
whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll
whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've
wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've
youll=you'll youre=you're youve=you've
"""
CONTRACTIONS: dict[str, str] = dict(pair.split("=", 1) for pair in _CONTRACTIONS_TEXT.split())
NUMBER_WORDS: dict[str, str] = {
    w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())
}
NUMBER_WORDS["none"] = "0"
ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = list(';/[]"{}()=+\\_->,<@`?!')
# Official regex: "(?!<=\d)" was meant as a look-behind but is a look-ahead that always holds, so
# every period not followed by a digit is removed ("3.5" survives, "end." loses its period).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d)(\,)+(?=\d)")


def _strip_punctuation(text: str) -> str:
    """Official rule: a mark touching a space (or any text with a digit,digit comma) is deleted;
    otherwise it becomes a space, so "red/blue" -> "red blue" but "red / blue" -> "red  blue"."""
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if delete_all or (mark + " " in text or " " + mark in text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out)


def normalize_vqa_answer(text: str) -> str:
    """EvalAI / MMF answer processor used for VQAv2 and TextVQA, applied to predictions and
    ground truths alike: lower-case, drop ',' '?', split "'s", punctuation, number words -> digits,
    drop articles, restore contractions."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_punctuation(text)
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy: for each of the n leave-one-out subsets of the human answers,
    min(#matches / 3, 1); the mean over subsets. With 10 humans of which k agree with the
    prediction this is (k * min((k-1)/3, 1) + (10-k) * min(k/3, 1)) / 10 (k=2 -> 0.6)."""
    if not answers:
        raise InputError("vqa_accuracy got no ground-truth answers; score a split that has answers")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    total = 0.0
    for left_out in range(len(gts)):
        matches = sum(1 for j, gt in enumerate(gts) if j != left_out and gt == pred)
        total += min(1.0, matches / 3.0)
    return total / len(gts)


# --------------------------------------------------------------------------------------------
# ANLS (DocVQA)
# --------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert / delete / substitute, all cost 1), two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _anls_normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity for one question (DocVQA definition):
    NL = lev(gt, pred) / max(|gt|, |pred|) on lower-cased, whitespace-collapsed strings;
    similarity = 1 - NL if NL < threshold else 0; the max over ground truths."""
    if not answers:
        raise InputError("anls got no ground-truth answers; score a split that has answers")
    pred = _anls_normalize(prediction)
    best = 0.0
    for answer in answers:
        gt = _anls_normalize(answer)
        length = max(len(gt), len(pred))
        distance = 0.0 if length == 0 else levenshtein(gt, pred) / length
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


# --------------------------------------------------------------------------------------------
# OCRBench
# --------------------------------------------------------------------------------------------

OCRBENCH_RECOGNITION = (
    "Regular Text Recognition",
    "Irregular Text Recognition",
    "Artistic Text Recognition",
    "Handwriting Recognition",
    "Digit String Recognition",
    "Non-Semantic Text Recognition",
)
OCRBENCH_CATEGORIES = OCRBENCH_RECOGNITION + (
    "Scene Text-centric VQA",
    "Doc-oriented VQA",
    "Key Information Extraction",
    "Handwritten Mathematical Expression Recognition",
)


def ocrbench_match(prediction: str, answers: Sequence[str] | str, dataset_name: str) -> int:
    """Official OCRBench rule: 1 if any ground truth is a substring of the prediction.
    HME100k (LaTeX formulas) is case-sensitive with all spaces removed on both sides; every
    other source is case-insensitive with newlines turned into spaces."""
    gts = [answers] if isinstance(answers, str) else list(answers)
    if dataset_name == "HME100k":
        pred = prediction.strip().replace("\n", " ").replace(" ", "")
        return int(any(gt.strip().replace("\n", " ").replace(" ", "") in pred for gt in gts))
    pred = prediction.lower().strip().replace("\n", " ")
    return int(any(gt.lower().strip().replace("\n", " ") in pred for gt in gts))


def ocrbench_score(
    predictions: Sequence[str],
    answers: Sequence[Sequence[str] | str],
    categories: Sequence[str],
    dataset_names: Sequence[str],
) -> dict[str, object]:
    """Sum of per-item matches: `total` (out of 1000 on the full benchmark), `text_recognition`
    (the six recognition categories, out of 300) and `per_category` counts."""
    _same_length(predictions, answers, categories, dataset_names, what="ocrbench_score")
    per_category: dict[str, int] = {c: 0 for c in OCRBENCH_CATEGORIES}
    counts: dict[str, int] = defaultdict(int)
    for pred, gts, category, source in zip(predictions, answers, categories, dataset_names):
        if category not in per_category:
            raise InputError(
                f"unknown OCRBench category {category!r}; expected one of {list(OCRBENCH_CATEGORIES)}"
            )
        per_category[category] += ocrbench_match(pred, gts, source)
        counts[category] += 1
    return {
        "total": sum(per_category.values()),
        "text_recognition": sum(per_category[c] for c in OCRBENCH_RECOGNITION),
        "per_category": per_category,
        "per_category_count": dict(counts),
        "n": len(predictions),
    }


# --------------------------------------------------------------------------------------------
# MME
# --------------------------------------------------------------------------------------------

MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters",
    "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_yes_no(reply: str) -> str:
    """Yes/no extraction used by the MME tooling in lmms-eval (superset of the official script):
    exact "yes"/"no" after lower-casing and dropping periods, single-letter "y"/"n", otherwise
    whichever of "yes"/"no" occurs in the first four characters; else "other"."""
    text = reply.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_scores(
    predictions: Sequence[str],
    answers: Sequence[str],
    subtasks: Sequence[str],
    image_ids: Sequence[str],
) -> dict[str, object]:
    """Per subtask: acc = correct questions / questions, acc+ = images whose questions are all
    correct / images, score = 100*acc + 100*acc+. Perception / cognition totals sum the subtask
    scores of their official subtask lists (subtasks outside both lists are reported only)."""
    _same_length(predictions, answers, subtasks, image_ids, what="mme_scores")
    by_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for pred, gt, subtask, image in zip(predictions, answers, subtasks, image_ids):
        gt_label = gt.lower().strip().replace(".", "")
        if gt_label not in ("yes", "no"):
            raise InputError(f"MME ground truth must be yes/no, got {gt!r} in subtask {subtask!r}")
        by_image[subtask][image].append(mme_yes_no(pred) == gt_label)
    per_subtask: dict[str, dict[str, float]] = {}
    for subtask, images in by_image.items():
        flags = [ok for oks in images.values() for ok in oks]
        acc = sum(flags) / len(flags)
        acc_plus = sum(all(oks) for oks in images.values()) / len(images)
        per_subtask[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus)}
    lookup = {name.lower(): s for name, s in per_subtask.items()}
    perception = sum(lookup[n.lower()]["score"] for n in MME_PERCEPTION if n.lower() in lookup)
    cognition = sum(lookup[n.lower()]["score"] for n in MME_COGNITION if n.lower() in lookup)
    return {
        "perception": perception,
        "cognition": cognition,
        "total": perception + cognition,
        "per_subtask": per_subtask,
        "n": len(predictions),
    }


# --------------------------------------------------------------------------------------------
# Exact match (one-word answers, easy-VQA)
# --------------------------------------------------------------------------------------------


def first_word(text: str) -> str:
    """First whitespace-separated word, lower-cased, surrounding punctuation removed."""
    words = text.strip().split()
    return words[0].strip(string.punctuation).lower() if words else ""


def exact_match(prediction: str, answers: Sequence[str] | str) -> float:
    """1.0 if the prediction's first word equals (case-insensitively) any answer, else 0.0:
    chat models answer "Circle." or "circle, it is" for a one-word label."""
    gts = [answers] if isinstance(answers, str) else list(answers)
    pred = first_word(prediction)
    return float(bool(pred) and any(pred == gt.strip().lower() for gt in gts))


def _same_length(*columns: Sequence[object], what: str) -> None:
    lengths = {len(c) for c in columns}
    if len(lengths) != 1:
        raise InputError(f"{what}: inputs have different lengths {sorted(lengths)}; pass one per item")
