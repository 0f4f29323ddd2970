"""easy-VQA off the calibration distribution: re-worded questions and re-rendered shapes, built at
run time from the TEST split only (never train), deterministic for a seed.

easy-VQA asks 24 question templates (the same 24 in train and test) about 64x64 images of one
axis-aligned shape (circle, rectangle, upright triangle) in an 8-colour palette on a plain light
background. From the test questions we read back each test image's facts (shape, colour); then:

- new wordings: the same question (type, asked word, negation) in templates easy-VQA never uses;
- new renderings: the same facts drawn again with PIL in the palette read from the test images, at
  other sizes and positions, rotated, on gradient / two-tone / speckled backgrounds;
- both.

Every item is paired with an in-distribution one (same image facts, same question meaning), so the
four subsets differ only by the shift; answers stay in easy-VQA's 13-word vocabulary.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mquant.demo.easyvqa import VQAItem, load_split
from mquant.errors import ConfigError

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SUBSETS = ("in-distribution", "new-wordings", "new-renderings", "both")
IMAGE_PIXELS = 64  # easy-VQA's image size; the processor resizes to 112 as for the originals
_SUPERSAMPLE = 4  # draw 4x larger and downsample: anti-aliased edges like easy-VQA's

_S = r"(?P<s>" + "|".join(SHAPES) + ")"
_C = r"(?P<c>" + "|".join(COLORS) + ")"


@dataclass(frozen=True)
class Meaning:
    """What a question asks: `kind` 'shape' | 'color' | 'has-shape' | 'has-color'; `word` the asked
    shape/colour (or the hint in 'what color is the circle?'); `negated` flips a yes/no answer."""

    kind: str
    word: str | None = None
    negated: bool = False


# easy-VQA's 24 templates (train and test use exactly these), as patterns -> meaning.
_PARSE = [
    (r"what shape (is in the image|is present|does the image contain)\?", "shape", None, False),
    (rf"what is the {_C} shape\?", "shape", "c", False),
    (r"what (color is|is the color of) the shape\?", "color", None, False),
    (rf"what (color is|is the color of) the {_S}\?", "color", "s", False),
    (rf"(is there a|does the image contain a|is a) {_S}( in the image| present)?\?", "has-shape", "s", False),
    (rf"(is there not a|does the image not contain a|is no) {_S}( in the image| present)?\?", "has-shape", "s", True),
    (rf"(is there a|does the image contain a|is a) {_C} shape( in the image| present)?\?", "has-color", "c", False),
    (rf"(is there not a|does the image not contain a|is no) {_C} shape( in the image| present)?\?", "has-color", "c", True),
]

# New wordings: none of them is an easy-VQA template (tests check against every train question).
_REWORD = {
    ("shape", False, False): ["which shape can you see?", "name the shape shown in the picture.", "what kind of shape is drawn here?",
                              "what form does the object in this picture have?"],
    ("shape", True, False): ["which shape is {w}?", "what is the {w} object in the picture?", "name the {w} shape."],
    ("color", False, False): ["which color does the shape have?", "what colour is the object?", "name the color of the shape in the picture.",
                              "what is the shape's color?"],
    ("color", True, False): ["which color is the {w}?", "what colour is the {w} in the picture?", "name the color of the {w}."],
    ("has-shape", True, False): ["can you see a {w}?", "does the picture show a {w}?", "is a {w} drawn in this picture?", "do you see a {w} here?"],
    ("has-shape", True, True): ["is it true that there is no {w}?", "does the picture lack a {w}?", "is there no {w} in this picture?"],
    ("has-color", True, False): ["can you see a {w} shape?", "is the shape {w}?", "does the picture show a {w} object?", "do you see a {w} shape here?"],
    ("has-color", True, True): ["is it true that there is no {w} shape?", "does the picture lack a {w} shape?", "is the shape not {w}?"],
}


def parse_question(question: str) -> Meaning:
    """The meaning of one easy-VQA question; a question outside its 24 templates is a ConfigError."""
    for pattern, kind, group, negated in _PARSE:
        match = re.fullmatch(pattern, question.strip().lower())
        if match:
            word = match.group(group) if group else None
            return Meaning(kind, word, negated)
    raise ConfigError(f"question {question!r} is not one of easy-VQA's templates; only easy-VQA test questions can be re-worded")


def answer_for(meaning: Meaning, shape: str, color: str) -> str:
    """The answer a question of this meaning has about an image of this shape and colour."""
    if meaning.kind in ("shape", "color"):
        return shape if meaning.kind == "shape" else color
    present = meaning.word == (shape if meaning.kind == "has-shape" else color)
    return "yes" if present != meaning.negated else "no"


def reword(meaning: Meaning, rng: random.Random) -> str:
    """A question with the same meaning in one of the new templates."""
    templates = _REWORD[(meaning.kind, meaning.word is not None, meaning.negated)]
    return rng.choice(templates).format(w=meaning.word)


@dataclass(frozen=True)
class ImageFacts:
    image_path: str
    image_id: int
    shape: str
    color: str


def _modal_color(path: str) -> tuple[int, int, int]:
    """The shape's exact colour: the most frequent pixel that is not the (majority) background."""
    with Image.open(path) as image:
        counts = Counter(map(tuple, np.asarray(image.convert("RGB")).reshape(-1, 3).tolist()))
    ranked = counts.most_common(2)
    return ranked[1][0] if len(ranked) > 1 else ranked[0][0]


def test_image_facts() -> list[ImageFacts]:
    """(shape, colour) of every test image whose questions state both, in image-id order. Read from
    the test questions and checked for consistency: every test question's answer must follow."""
    items = load_split("test")
    known: dict[str, dict[str, str]] = {}
    for item in items:
        meaning, facts = parse_question(item.question), known.setdefault(item.image_path, {})
        if meaning.kind in ("shape", "color"):
            facts[meaning.kind] = item.answer
            if meaning.word:  # the hint names the other fact
                facts["color" if meaning.kind == "shape" else "shape"] = meaning.word
        elif (item.answer == "yes") != meaning.negated:
            facts["shape" if meaning.kind == "has-shape" else "color"] = meaning.word
    out = [ImageFacts(p, int(Path(p).stem), f["shape"], f["color"]) for p, f in known.items() if len(f) == 2]
    return sorted(out, key=lambda f: f.image_id)


def palette(facts: list[ImageFacts], per_color: int = 5) -> dict[str, tuple[int, int, int]]:
    """easy-VQA's palette, read from the test images: each colour name's most common shape pixel."""
    votes: dict[str, Counter] = {}
    for fact in facts:
        if sum(votes.get(fact.color, Counter()).values()) < per_color:
            votes.setdefault(fact.color, Counter())[_modal_color(fact.image_path)] += 1
    missing = [c for c in COLORS if c not in votes]
    if missing:
        raise ConfigError(f"the easy-VQA test split shows no {', '.join(missing)} shape; the installed easy-vqa data is incomplete")
    return {name: counter.most_common(1)[0][0] for name, counter in votes.items()}


def _light(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(200, 255) for _ in range(3))


def _background(rng: random.Random, size: int) -> Image.Image:
    """A light background easy-VQA never uses: a gradient, two tones split at an angle, or speckles."""
    style, a, b = rng.choice(("gradient", "two-tone", "speckle")), _light(rng), _light(rng)
    image = Image.new("RGB", (size, size), a)
    draw = ImageDraw.Draw(image)
    if style == "gradient":
        for y in range(size):
            t = y / (size - 1)
            draw.line([(0, y), (size, y)], fill=tuple(round(a[i] * (1 - t) + b[i] * t) for i in range(3)))
    elif style == "two-tone":
        cut = rng.uniform(0.2, 0.8) * size
        draw.polygon([(0, cut + rng.uniform(-0.3, 0.3) * size), (size, cut + rng.uniform(-0.3, 0.3) * size), (size, size), (0, size)], fill=b)
    else:
        for _ in range(size * size // 40):
            x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0.5, 2.0) * _SUPERSAMPLE
            draw.ellipse([x - r, y - r, x + r, y + r], fill=b)
    return image


def _shape_points(shape: str, cx: float, cy: float, radius: float, angle: float, aspect: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        corners = [(math.cos(angle + k * 2 * math.pi / 3), math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
    else:  # rectangle: half-sides 1 x aspect, rotated
        corners = [(sx * math.cos(angle) - sy * aspect * math.sin(angle), sx * math.sin(angle) + sy * aspect * math.cos(angle))
                   for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    return [(cx + radius * x, cy + radius * y) for x, y in corners]


def render(shape: str, rgb: tuple[int, int, int], rng: random.Random) -> Image.Image:
    """One new rendering: size 5-30 px radius (easy-VQA: mostly 10-20), anywhere in the frame,
    rotated by any angle, on a new background; drawn supersampled, then reduced to 64x64."""
    size = IMAGE_PIXELS * _SUPERSAMPLE
    image = _background(rng, size)
    radius = rng.uniform(5, 30) * _SUPERSAMPLE
    margin = radius * 0.8  # a shape may touch the border but stays mostly visible
    cx, cy = rng.uniform(margin, size - margin), rng.uniform(margin, size - margin)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=rgb)
    else:
        draw.polygon(_shape_points(shape, cx, cy, radius, rng.uniform(0, 2 * math.pi), rng.uniform(0.4, 1.0)), fill=rgb)
    return image.resize((IMAGE_PIXELS, IMAGE_PIXELS), Image.Resampling.BOX)  # 4x4 means: anti-aliased edges, exact interior


def build_ood_subsets(out_dir: str | Path, n_per_subset: int, seed: int = 0, questions_per_image: int = 4) -> dict[str, list[VQAItem]]:
    """The four paired subsets of `n_per_subset` questions each; renderings are written as PNGs to
    `out_dir` (the caller owns it). Same seed, same items and pixels."""
    if n_per_subset < 1 or questions_per_image < 1:
        raise ConfigError(f"need at least 1 question per subset and per image, got {n_per_subset}, {questions_per_image}")
    facts = test_image_facts()
    colors = palette(facts)
    by_image: dict[str, list[VQAItem]] = {}
    for item in load_split("test"):
        by_image.setdefault(item.image_path, []).append(item)
    rng = random.Random(f"easy-vqa-ood:{seed}")
    chosen = rng.sample(facts, min(len(facts), math.ceil(n_per_subset / questions_per_image)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    subsets: dict[str, list[VQAItem]] = {name: [] for name in SUBSETS}
    for fact in chosen:
        image_rng = random.Random(f"easy-vqa-ood:{seed}:{fact.image_id}")
        rendered = out_dir / f"{fact.image_id}.png"
        render(fact.shape, colors[fact.color], image_rng).save(rendered)
        for item in image_rng.sample(by_image[fact.image_path], min(questions_per_image, len(by_image[fact.image_path]))):
            meaning = parse_question(item.question)
            if answer_for(meaning, fact.shape, fact.color) != item.answer:
                raise ConfigError(f"test question {item.question!r} about image {fact.image_id} contradicts its other questions")
            new_question = reword(meaning, image_rng)
            subsets["in-distribution"].append(item)
            subsets["new-wordings"].append(VQAItem(item.image_path, new_question, item.answer))
            subsets["new-renderings"].append(VQAItem(str(rendered), item.question, item.answer))
            subsets["both"].append(VQAItem(str(rendered), new_question, item.answer))
    return {name: items[:n_per_subset] for name, items in subsets.items()}
