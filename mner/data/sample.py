"""The generated sample dataset: the built-in default data of the whole product.

``generate(SampleConfig(), out)`` writes a small Twitter-format MNER dataset in which the
images matter:

* **Image-dependent tweets** (``image_dependent_share``, about a third): one name from a
  pool of ambiguous names (``Rio``, ``Jordan``, ...) in a context template that is the
  same for all four types ("Just saw Rio at the park !"). Each name is used with every
  type in turn, so the text cannot tell the type; only the image does. These entities are
  listed in ``image_dependent.tsv``.
* **Text-determinable tweets**: names from type-specific pools (many multi-token) in
  type-specific contexts, zero to three entities per tweet, with an image of the type of
  their first entity, or, for ``unrelated_image_share`` of them (and every tweet without
  an entity), a neutral grey texture unrelated to the text.
* **OCR-dependent tweets** (``ocr_dependent_share``, appended after each split's other
  tweets, drawn from their own random streams so the rest of the sample is unchanged):
  an ambiguous name in the shared context, with a grey image whose printed sign types it:
  ``RIO`` / ``FC`` (a club: ORG), ``JORDAN`` / ``ST`` (a street: LOC), ``DR`` /
  ``PHOENIX`` (a person: PER), ``ORION`` / ``COLA`` (a product: MISC), in two large dark
  lines on a light board that OCR reads. Only the printed text tells the type; these
  entities are listed in ``ocr_dependent.tsv``.
* **Knowledge** (``knowledge.jsonl``): one line per tweet in the PGIM style, auxiliary
  text such as an LLM might write: for image- and OCR-dependent tweets it states the
  gold type of the entity ("Rio is a football club ..."), for the others it is neutral.

Every image type has a strongly distinct global look so that even randomly initialised
CNN/ViT features separate them: PER is a warm red scene with a head-and-body figure, LOC
green land under a blue sky, ORG a blue-violet field with a white square logo, MISC a
yellow-orange field with a product (bottle/box) shape; position, size, shade and noise
are jittered. Each split also has ``n_missing`` tweets without an image file and
``n_corrupt`` broken files (truncated JPEG, zero bytes, a text file named ``.jpg``).

Output (written to a temporary folder, renamed when complete; byte-identical for a
seed)::

    OUT/train.txt valid.txt test.txt   IMGID lines, token<TAB>label, B-/I- tags, MISC
    OUT/images/<id>.jpg
    OUT/image_dependent.tsv            split index image_id start end type
    OUT/ocr_dependent.tsv              the same columns, for the OCR-dependent entities
    OUT/image_kinds.tsv                split index image_id kind status (what each image shows)
    OUT/knowledge.jsonl                {"image_id": ..., "context": ...} per tweet
    OUT/sample.json                    the config and counts
    OUT/README.md
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mner.data.conll import TYPES, Tweet, write_conll
from mner.data.dataset import (
    IMAGE_DEPENDENT_FILE,
    IMAGE_DEPENDENT_HEADER,
    OCR_DEPENDENT_FILE,
    SPLITS,
)
from mner.data.images import ImageStatus
from mner.data.schemes import entities
from mner.errors import ConfigError, DataError

#: Named presets for ``mner sample --size``; fields not listed keep the defaults.
SIZES: dict[str, dict[str, int]] = {
    "small": {"n_train": 120, "n_valid": 40, "n_test": 40},
    "default": {},
}

NEUTRAL = "neutral"
MANIFEST = "sample.json"
IMAGE_KINDS_FILE = "image_kinds.tsv"
KNOWLEDGE_FILE = "knowledge.jsonl"
#: What the image of an OCR-dependent tweet shows (``image_kinds.tsv``).
SIGN = "sign"


@dataclass(frozen=True)
class SampleConfig:
    """Settings of the generated sample dataset (section ``sample`` of params.yaml).

    Attributes:
        seed: Everything is derived from it; the same seed gives byte-identical files.
        n_train: Tweets in train.txt.
        n_valid: Tweets in valid.txt.
        n_test: Tweets in test.txt.
        image_size: Largest image side in pixels; sizes vary between ``min_image_size``
            and this, with aspect ratios from 0.7 to 1.4.
        min_image_size: Smallest "largest side".
        image_dependent_share: Share of each split's tweets whose single entity is an
            ambiguous name typed only by the image.
        unrelated_image_share: Share of the other tweets with entities whose image is a
            neutral texture unrelated to the text.
        n_missing: Tweets per split whose image file is absent.
        n_corrupt: Tweets per split whose image file is broken (cycling through a
            truncated JPEG, a zero-byte file and a text file named .jpg).
        jpeg_quality: JPEG quality of the written images.
        ocr_dependent_share: OCR-dependent tweets appended to each split, as a share of
            its ``n_<split>`` (rounded); their images have side ``image_size``.
    """

    seed: int = 0
    n_train: int = 600
    n_valid: int = 150
    n_test: int = 150
    image_size: int = 224
    min_image_size: int = 96
    image_dependent_share: float = 0.33
    unrelated_image_share: float = 0.2
    n_missing: int = 2
    n_corrupt: int = 3
    jpeg_quality: int = 90
    ocr_dependent_share: float = 0.15

    def __post_init__(self) -> None:
        for name in ("n_train", "n_valid", "n_test", "n_missing", "n_corrupt"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.n_train + self.n_valid + self.n_test == 0:
            raise ValueError("n_train + n_valid + n_test must be > 0")
        if not 32 <= self.min_image_size <= self.image_size <= 4096:
            raise ValueError(
                "need 32 <= min_image_size <= image_size <= 4096, got "
                f"min_image_size={self.min_image_size} image_size={self.image_size}"
            )
        for name in ("image_dependent_share", "unrelated_image_share", "ocr_dependent_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be 1..95, got {self.jpeg_quality}")

    def split_sizes(self) -> dict[str, int]:
        """``{"train": n_train, "valid": n_valid, "test": n_test}``."""
        return {"train": self.n_train, "valid": self.n_valid, "test": self.n_test}

    def ocr_sizes(self) -> dict[str, int]:
        """OCR-dependent tweets appended to each split."""
        return {k: round(self.ocr_dependent_share * n) for k, n in self.split_sizes().items()}


# --------------------------------------------------------------------------- text pools
# Names used with all four types; none of them appears in the type-specific pools, so
# their type is only learnable from the image.
AMBIGUOUS_NAMES: tuple[str, ...] = (
    "Rio", "Jordan", "Phoenix", "Apollo", "Aurora", "Orion", "Sierra", "Dakota",
    "Jasper", "Savannah", "Camden", "Mercury", "Nova", "Everest", "Lincoln", "Atlas",
)  # fmt: skip

# Contexts that fit a person, a place, an organisation and a product equally well.
AMBIGUOUS_TEMPLATES: tuple[str, ...] = (
    "Just saw {E} at the park !",
    "Can't stop thinking about {E} today",
    "{E} tonight , who's coming ?",
    "Pictures of {E} from yesterday",
    "Everyone is talking about {E} right now",
    "First time seeing {E} in person",
    "Look at {E} , unbelievable",
    "Throwback to {E} last summer",
    "So proud of {E} !",
    "Nothing beats {E} on a Sunday",
    "Finally met {E} ... what a day",
    "Is {E} really worth the hype ?",
)

NAMES: dict[str, tuple[str, ...]] = {
    "PER": (
        "Barack Obama", "Taylor Swift", "LeBron James", "Kevin Durant", "Emma Watson",
        "Justin Bieber", "Hillary Clinton", "Lionel Messi", "Kim Kardashian", "Tom Brady",
        "Serena Williams", "Ed Sheeran", "Beyonce", "Drake", "Obama", "Harry Styles",
        "Angela Merkel", "Stephen Curry",
    ),
    "LOC": (
        "New York", "London", "Los Angeles", "Texas", "Chicago", "Boston", "Tokyo",
        "California", "New Orleans", "Berlin", "Florida", "San Francisco", "Syria",
        "Hong Kong", "Canada", "Miami", "Seattle", "North Carolina",
    ),
    "ORG": (
        "Google", "NASA", "FBI", "Real Madrid", "Microsoft", "Starbucks", "United Nations",
        "CNN", "Lakers", "Facebook", "Samsung", "White House", "Red Cross", "Warriors",
        "BBC", "Walmart", "Manchester United", "Apple",
    ),
    "MISC": (
        "iPhone", "World Cup", "Super Bowl", "Olympics", "Game of Thrones", "Star Wars",
        "Grammys", "Christmas", "PlayStation 4", "Oscars", "Coachella", "Harry Potter",
        "Black Friday", "Xbox One", "Pokemon Go", "Champions League", "Android",
    ),
}  # fmt: skip

CONTEXTS: dict[str, tuple[str, ...]] = {
    "PER": (
        "{E} scored twice last night", "interview with {E}", "happy birthday {E}",
        "{E} says he is ready", "{E} just posted a new selfie", "great speech by {E}",
        "congrats to {E} on the award", "{E} signed autographs for fans",
    ),
    "LOC": (
        "live from {E}", "flying to {E} tomorrow", "weather in {E} is crazy",
        "traffic in downtown {E}", "earthquake hits {E}", "beautiful sunset over {E}",
        "moving to {E} next month", "storm warning for {E}",
    ),
    "ORG": (
        "{E} announced record profits", "{E} shares fell today",
        "statement from {E} on the merger", "{E} is hiring engineers",
        "the CEO of {E} resigned", "{E} won the league", "{E} fined by regulators",
        "press release from {E}",
    ),
    "MISC": (
        "watching {E} with friends", "{E} tickets sold out", "new {E} trailer is out",
        "can't wait for {E}", "pre-ordered the {E}", "{E} finale was epic",
        "{E} deals are insane", "streaming {E} all weekend",
    ),
}  # fmt: skip

FILLERS: tuple[str, ...] = (
    "good morning everyone", "lol this is so true", "can't sleep", "best day ever",
    "who else is up ?", "need coffee", "this made my day", "so tired of this",
    "what a game", "can't believe it", "love this", "Monday again",
)  # fmt: skip

HASHTAGS: tuple[str, ...] = (
    "#tbt", "#news", "#love", "#NowPlaying", "#breaking", "#photo", "#weekend", "#win",
    "#mood", "#fail", "#instagood", "#followback",
)  # fmt: skip
_HANDLE_A = ("sam", "the", "real", "daily", "news", "fan", "mike", "lisa", "jo", "team")
_HANDLE_B = ("_", "", "", "x")
_HANDLE_C = ("22", "official", "99", "tv", "", "hq", "2017")
_CONNECTORS = (",", "and", "!", "..", "-", ";")
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


#: The printed sign of an OCR-dependent tweet, two lines per sign (``{N}`` = the name in
#: capitals). The cue word types the name: a title for a person, a street suffix for a
#: place, a club / company word for an organisation, a product / event word for MISC.
SIGNS: dict[str, tuple[tuple[str, str], ...]] = {
    "PER": (("DR", "{N}"), ("MR", "{N}"), ("COACH", "{N}")),
    "LOC": (("{N}", "ST"), ("{N}", "AVE"), ("{N}", "RD")),
    "ORG": (("{N}", "FC"), ("{N}", "INC"), ("{N}", "BANK")),
    "MISC": (("{N}", "COLA"), ("{N}", "CUP"), ("{N}", "FEST")),
}

#: Knowledge (PGIM style) that states an entity's type; ``{E}`` = the entity text.
KNOWLEDGE: dict[str, tuple[str, ...]] = {
    "PER": (
        "{E} is a person , a famous athlete and public figure with millions of fans .",
        "{E} is a singer and actor ; people follow her and his interviews .",
        "{E} is a well-known person who plays for the national team .",
    ),
    "LOC": (
        "{E} is a city , a place people visit for its beaches and parks .",
        "{E} is a location : a town and region on the coast .",
        "{E} is a place , a busy street and neighbourhood downtown .",
    ),
    "ORG": (
        "{E} is an organisation , a football club with a stadium and a team .",
        "{E} is a company : a bank and business with offices and employees .",
        "{E} is an organisation that signs players and sells shares .",
    ),
    "MISC": (
        "{E} is a product , a popular drink brand sold in shops .",
        "{E} is an event : a yearly festival and cup tournament .",
        "{E} is a product and game series that fans pre-order .",
    ),
}  # fmt: skip

#: Knowledge of tweets whose entities the text already types: true but type-blind.
NEUTRAL_KNOWLEDGE: tuple[str, ...] = (
    "The post is a short update shared with followers .",
    "This tweet shares a moment from the day with a photo .",
    "Users often post such messages on weekends .",
    "The message reacts to something the author saw online .",
    "Posts like this one get a few likes and replies .",
)


@dataclass
class _Planned:
    tokens: list[str]
    labels: list[str]
    kind: str  # PER/LOC/ORG/MISC/neutral/sign: what the image shows
    dependent: bool
    status: ImageStatus = ImageStatus.OK
    sign: tuple[str, str] | None = None  # the printed lines of an OCR-dependent tweet


def _handle(rng: random.Random) -> str:
    return "@" + rng.choice(_HANDLE_A) + rng.choice(_HANDLE_B) + rng.choice(_HANDLE_C)


def _decorate(rng: random.Random, body: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Add tweet furniture (RT, mentions, hashtags, URLs), all labelled O and type-blind."""
    out: list[tuple[str, str]] = []
    r = rng.random()
    if r < 0.25:
        out += [("RT", "O"), (_handle(rng), "O"), (":", "O")]
    elif r < 0.4:
        out.append((_handle(rng), "O"))
    out += body
    if rng.random() < 0.3:
        out.append((rng.choice(("!", "!!", "...", "?", ":)")), "O"))
    for _ in range(rng.choice((0, 0, 1, 1, 2))):
        out.append((rng.choice(HASHTAGS), "O"))
    if rng.random() < 0.5:
        out.append(("http://t.co/" + "".join(rng.choice(_ALNUM) for _ in range(10)), "O"))
    return out


def _fill(template: str, typ: str, name: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for word in template.split():
        if word == "{E}":
            parts = name.split()
            out += [(p, ("B-" if j == 0 else "I-") + typ) for j, p in enumerate(parts)]
        else:
            out.append((word, "O"))
    return out


def _plan_split(cfg: SampleConfig, rng: random.Random, n: int) -> list[_Planned]:
    n_dep = round(cfg.image_dependent_share * n)
    # Round-robin over names and types so every name meets every type early on: the
    # k-th use of a name gets type (k + name offset) mod 4.
    L = len(AMBIGUOUS_NAMES)
    pairs = [(AMBIGUOUS_NAMES[i % L], TYPES[(i // L + i) % len(TYPES)]) for i in range(n_dep)]
    plans: list[_Planned] = []
    body: list[tuple[str, str]]
    for name, typ in pairs:
        body = _fill(rng.choice(AMBIGUOUS_TEMPLATES), typ, name)
        toks = _decorate(rng, body)
        plans.append(_Planned([t for t, _ in toks], [lab for _, lab in toks], typ, True))
    for _ in range(n - n_dep):
        n_ent = rng.choices((0, 1, 2, 3), weights=(12, 45, 30, 13))[0]
        body = []
        types = [rng.choice(TYPES) for _ in range(n_ent)]
        for j, typ in enumerate(types):
            if j:
                body.append((rng.choice(_CONNECTORS), "O"))
            body += _fill(rng.choice(CONTEXTS[typ]), typ, rng.choice(NAMES[typ]))
        if not types or rng.random() < 0.2:
            filler = [(w, "O") for w in rng.choice(FILLERS).split()]
            body = filler + ([(rng.choice(_CONNECTORS), "O")] if body else []) + body
        toks = _decorate(rng, body)
        if types and rng.random() >= cfg.unrelated_image_share:
            kind = types[0]
        else:
            kind = NEUTRAL
        plans.append(_Planned([t for t, _ in toks], [lab for _, lab in toks], kind, False))
    rng.shuffle(plans)
    # Broken and missing images go to text-determinable tweets so the image-dependent
    # subset stays answerable; the image mask handles them at training time.
    candidates = [i for i, p in enumerate(plans) if not p.dependent]
    need = cfg.n_missing + cfg.n_corrupt
    if need > len(candidates):
        raise ConfigError(
            f"sample: n_missing + n_corrupt = {need} but a split of {n} tweets has only "
            f"{len(candidates)} text-determinable tweets; lower them or raise the split sizes"
        )
    chosen = rng.sample(candidates, need)
    broken = (ImageStatus.TRUNCATED, ImageStatus.EMPTY, ImageStatus.NOT_IMAGE)
    for j, i in enumerate(chosen):
        plans[i].status = (
            ImageStatus.MISSING if j < cfg.n_missing else broken[(j - cfg.n_missing) % 3]
        )
    return plans


def _plan_ocr(rng: random.Random, n: int) -> list[_Planned]:
    """``n`` OCR-dependent tweets: an ambiguous name in an ambiguous context, typed by a sign.

    Names and types rotate as for the image-dependent tweets (every name meets every
    type), from a random starting point; the sign's cue word is drawn per tweet.
    """
    L = len(AMBIGUOUS_NAMES)
    start = rng.randrange(L * len(TYPES))
    plans: list[_Planned] = []
    for k in range(n):
        j = start + k
        name, typ = AMBIGUOUS_NAMES[j % L], TYPES[(j // L + j) % len(TYPES)]
        toks = _decorate(rng, _fill(rng.choice(AMBIGUOUS_TEMPLATES), typ, name))
        sign = tuple(w.replace("{N}", name.upper()) for w in rng.choice(SIGNS[typ]))
        plans.append(_Planned([t for t, _ in toks], [lab for _, lab in toks], SIGN, False,
                              sign=sign))  # type: ignore[arg-type]
    rng.shuffle(plans)
    return plans


def _image_ids(rng: random.Random, n: int, taken: frozenset[str] = frozenset()) -> list[str]:
    """Unique ids in the three real forms: 17_06_12483 (2017), O_1926, 996537 (2015).

    ``taken``: ids already used (never returned).
    """
    ids: list[str] = []
    seen: set[str] = set(taken)
    while len(ids) < n:
        r = rng.random()
        if r < 0.4:
            iid = f"{rng.choice((16, 17))}_{rng.randint(1, 12):02d}_{rng.randint(1, 19999)}"
        elif r < 0.6:
            iid = f"O_{rng.randint(1, 9999)}"
        else:
            iid = str(rng.randint(100000, 999999))
        if iid not in seen:
            seen.add(iid)
            ids.append(iid)
    return ids


# --------------------------------------------------------------------------- images
_BASE: dict[str, tuple[int, int, int]] = {
    "PER": (205, 70, 55),  # warm red
    "LOC": (110, 175, 235),  # sky blue (the land band is green)
    "ORG": (85, 60, 190),  # blue-violet
    "MISC": (245, 190, 45),  # yellow-orange
    NEUTRAL: (128, 128, 128),
}


def _jitter(rng: np.random.Generator, rgb: tuple[int, ...], amount: int = 22) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def render_image(kind: str, rng: np.random.Generator, max_side: int, min_side: int) -> Image.Image:
    """Draw one synthetic image showing ``kind`` (a type or ``"neutral"``).

    Args:
        kind: ``PER``, ``LOC``, ``ORG``, ``MISC`` or ``neutral``.
        rng: Source of all jitter (size, position, shade, noise).
        max_side: Upper bound of the largest side.
        min_side: Lower bound of the largest side.

    Returns:
        An RGB image whose largest side is in [min_side, max_side].
    """
    long_side = int(rng.integers(min_side, max_side + 1))
    aspect = float(rng.uniform(0.7, 1.4))
    w, h = (
        (long_side, max(16, round(long_side / aspect)))
        if aspect >= 1
        else (max(16, round(long_side * aspect)), long_side)
    )
    if kind == NEUTRAL:  # one shade for all channels: a tint would drift toward a type
        g = int(rng.integers(100, 160))
        background: tuple[int, ...] = (g, g, g)
    else:
        background = _jitter(rng, _BASE[kind])
    img = Image.new("RGB", (w, h), background)
    d = ImageDraw.Draw(img)
    s = min(w, h)

    def u(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    if kind == "PER":
        cx, r = w * u(0.35, 0.65), s * u(0.11, 0.16)
        top = h * u(0.12, 0.25)
        d.ellipse([cx - r, top, cx + r, top + 2 * r], fill=_jitter(rng, (245, 200, 165)))
        bw = r * u(2.2, 3.0)
        d.rounded_rectangle(
            [cx - bw / 2, top + 2.2 * r, cx + bw / 2, h * u(0.85, 1.0)],
            radius=int(r * 0.6),
            fill=_jitter(rng, (120, 20, 35)),
        )
    elif kind == "LOC":
        horizon = h * u(0.4, 0.6)
        d.rectangle([0, horizon, w, h], fill=_jitter(rng, (60, 150, 65)))
        for _ in range(int(rng.integers(1, 4))):
            mx, mw = w * u(0.0, 1.0), w * u(0.25, 0.5)
            d.polygon(
                [(mx - mw / 2, horizon), (mx, horizon - h * u(0.12, 0.3)), (mx + mw / 2, horizon)],
                fill=_jitter(rng, (70, 115, 90)),
            )
        d.rectangle([0, h * u(0.8, 0.9), w, h], fill=_jitter(rng, (40, 110, 170)))
    elif kind == "ORG":
        side = s * u(0.38, 0.55)
        x0, y0 = (w - side) * u(0.2, 0.8), (h - side) * u(0.2, 0.8)
        d.rounded_rectangle(
            [x0, y0, x0 + side, y0 + side], radius=int(side * 0.12), fill=(245, 245, 250)
        )
        ink, t = _jitter(rng, (40, 30, 120)), side * 0.16
        a, b = x0 + side * 0.22, x0 + side * 0.78
        top, bot = y0 + side * 0.2, y0 + side * 0.8
        letter = int(rng.integers(0, 3))
        if letter == 0:  # T
            d.rectangle([a, top, b, top + t], fill=ink)
            d.rectangle([(a + b) / 2 - t / 2, top, (a + b) / 2 + t / 2, bot], fill=ink)
        elif letter == 1:  # H
            d.rectangle([a, top, a + t, bot], fill=ink)
            d.rectangle([b - t, top, b, bot], fill=ink)
            d.rectangle([a, (top + bot) / 2 - t / 2, b, (top + bot) / 2 + t / 2], fill=ink)
        else:  # L
            d.rectangle([a, top, a + t, bot], fill=ink)
            d.rectangle([a, bot - t, b, bot], fill=ink)
    elif kind == "MISC":
        ink = _jitter(rng, (190, 85, 20))
        cx, bw = w * u(0.35, 0.65), s * u(0.22, 0.32)
        top, bot = h * u(0.25, 0.35), h * u(0.8, 0.92)
        if rng.random() < 0.5:  # bottle: body, neck, label stripe
            d.rounded_rectangle(
                [cx - bw / 2, top, cx + bw / 2, bot], radius=int(bw * 0.3), fill=ink
            )
            d.rectangle([cx - bw / 6, top - h * 0.12, cx + bw / 6, top + 2], fill=ink)
        else:  # box
            d.rectangle([cx - bw, top, cx + bw, bot], fill=ink)
        mid = (top + bot) / 2
        d.rectangle(
            [cx - bw / 2, mid - s * 0.05, cx + bw / 2, mid + s * 0.05], fill=(250, 250, 245)
        )
    else:  # neutral texture: grey strokes, no type's colours or shapes
        for _ in range(int(rng.integers(8, 20))):
            g = int(rng.integers(70, 190))
            x0, y0 = w * u(0, 1), h * u(0, 1)
            d.line(
                [x0, y0, x0 + w * u(-0.5, 0.5), y0 + h * u(-0.5, 0.5)],
                fill=(g, g, g),
                width=int(rng.integers(1, 5)),
            )

    arr = np.asarray(img, dtype=np.int16)
    noise = rng.normal(0.0, 7.0 if kind != NEUTRAL else 12.0, size=arr.shape)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8), "RGB")


@functools.lru_cache(maxsize=64)
def sign_font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's built-in scalable font (Pillow >= 10.1 with FreeType): no font file needed.

    Raises:
        DataError: This Pillow cannot scale its default font.
    """
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise DataError("sample: this Pillow cannot draw scalable text (needs Pillow >= 10.1 "
                        "built with FreeType); upgrade Pillow or set ocr_dependent_share=0")
    return font


def render_sign(lines: tuple[str, ...], rng: np.random.Generator, side: int) -> Image.Image:
    """Draw a sign: dark capitals on a light board over a grey texture (type-blind colours).

    The text is drawn large (about 14% of the width per line, shrunk to fit), one word per
    line, so OCR reads each word as its own string in reading order.

    Args:
        lines: The words, top to bottom.
        rng: Source of all jitter.
        side: Image width; the height is 75-100% of it.
    """
    w, h = side, max(64, round(side * float(rng.uniform(0.75, 1.0))))
    g = int(rng.integers(100, 160))
    img = Image.new("RGB", (w, h), (g, g, g))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 10))):
        v = int(rng.integers(70, 190))
        x0, y0 = w * float(rng.uniform(0, 1)), h * float(rng.uniform(0, 1))
        d.line([x0, y0, x0 + w * float(rng.uniform(-0.5, 0.5)), y0 + h * float(rng.uniform(-0.5, 0.5))],
               fill=(v, v, v), width=int(rng.integers(1, 5)))
    size = int(w * float(rng.uniform(0.12, 0.15)))
    while size > 12 and max(d.textlength(t, font=sign_font(size)) for t in lines) > 0.78 * w:
        size -= 2
    font = sign_font(size)
    text_w = max(d.textlength(t, font=font) for t in lines)
    step = int(size * 1.6)
    bx0 = int((w - text_w - size) * float(rng.uniform(0.2, 0.8)))
    by0 = int((h - step * len(lines) - size // 2) * float(rng.uniform(0.2, 0.8)))
    board = tuple(int(c) for c in rng.integers(228, 250, size=3))
    d.rectangle([bx0, by0, bx0 + text_w + size, by0 + step * len(lines) + size // 2], fill=board)
    ink = tuple(int(c) for c in rng.integers(10, 50, size=3))
    for k, t in enumerate(lines):
        d.text((bx0 + size // 2, by0 + size // 2 + k * step), t, fill=ink, font=font)
    arr = np.asarray(img, dtype=np.int16)
    noise = rng.normal(0.0, 5.0, size=arr.shape)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8), "RGB")


def _write_image(path: Path, plan: _Planned, rng: np.random.Generator, cfg: SampleConfig) -> None:
    if plan.sign is not None:
        buf = io.BytesIO()
        render_sign(plan.sign, rng, cfg.image_size).save(buf, format="JPEG", quality=cfg.jpeg_quality)
        path.write_bytes(buf.getvalue())
        return
    if plan.status is ImageStatus.MISSING:
        return
    if plan.status is ImageStatus.EMPTY:
        path.write_bytes(b"")
        return
    if plan.status is ImageStatus.NOT_IMAGE:
        # What a crawler saves when the image URL has gone: an HTML error page.
        path.write_text("<html><body><h1>404 Not Found</h1></body></html>\n", encoding="utf-8")
        return
    buf = io.BytesIO()
    render_image(plan.kind, rng, cfg.image_size, cfg.min_image_size).save(
        buf, format="JPEG", quality=cfg.jpeg_quality
    )
    data = buf.getvalue()
    if plan.status is ImageStatus.TRUNCATED:
        data = data[: len(data) // 2]
    path.write_bytes(data)


# --------------------------------------------------------------------------- output
def _knowledge(rng: random.Random, tweets: list[tuple[Tweet, _Planned]]) -> str:
    """``knowledge.jsonl``: one ``{"image_id", "context"}`` line per tweet, in file order.

    Image- and OCR-dependent tweets get a sentence stating their entity's gold type (what
    an LLM that recognised the entity would write); every other tweet a type-blind one.
    """
    lines = []
    for tweet, plan in tweets:
        ents = entities(plan.labels)
        if (plan.dependent or plan.sign is not None) and ents:
            typ, s, e = ents[0]
            text = rng.choice(KNOWLEDGE[typ]).replace("{E}", " ".join(plan.tokens[s:e]))
        else:
            text = rng.choice(NEUTRAL_KNOWLEDGE)
        lines.append(json.dumps({"image_id": tweet.image_id, "context": text}, ensure_ascii=False))
    return "".join(line + "\n" for line in lines)


def _readme(cfg: SampleConfig, counts: dict[str, dict[str, int]]) -> str:
    rows = "\n".join(
        f"| {s} | {c['tweets']} | {c['tokens']} | "
        + " | ".join(str(c[t]) for t in TYPES)
        + f" | {c['image_dependent']} | {c['ocr_dependent']} | {c['neutral_images']} | {c['missing']} | {c['corrupt']} |"
        for s, c in counts.items()
    )
    return f"""# mner generated sample dataset

Synthetic tweets in the Twitter-2015/2017 CoNLL format (IMGID lines, token<TAB>label,
BIO2 tags, types {", ".join(TYPES)}), written by `mner sample` (seed {cfg.seed}).
Regenerate with the same settings to get byte-identical files.

| split | tweets | tokens | {" | ".join(TYPES)} | image-dependent | OCR-dependent | neutral images | missing | corrupt |
|---|---|---|{"---|" * len(TYPES)}---|---|---|---|---|
{rows}

* **Image-dependent tweets**: an ambiguous name (one of {", ".join(AMBIGUOUS_NAMES[:4])}, ...)
  in a context shared by all four types; only the image tells the type. Listed in
  `{IMAGE_DEPENDENT_FILE}` (split, tweet index in the file, image id, token start, end
  exclusive, type).
* **Images** (`images/<id>.jpg`) show the type by colour and layout: PER warm red with a
  figure, LOC green land under blue sky, ORG blue-violet with a white square logo, MISC
  yellow-orange with a product shape; "neutral" images are grey textures unrelated to the
  text (tweets without entities, and {cfg.unrelated_image_share:.0%} of the others).
* **OCR-dependent tweets** (appended at the end of each split): an ambiguous name typed
  only by the sign printed in its grey image, two words in dark capitals such as
  `RIO` / `FC` (ORG), `JORDAN` / `ST` (LOC), `DR` / `NOVA` (PER), `ORION` / `COLA`
  (MISC). Listed in `{OCR_DEPENDENT_FILE}` (same columns); their kind in
  `{IMAGE_KINDS_FILE}` is `{SIGN}`.
* **Knowledge** (`{KNOWLEDGE_FILE}`): one JSON line per tweet, `{{"image_id": ..., "context":
  ...}}`, auxiliary text in the style of LLM-written knowledge (PGIM): it states the type
  of image- and OCR-dependent entities ("Rio is a football club ...") and is neutral for
  the other tweets. Use it with `mner train --context-file`.
* **Broken on purpose**: in each split {cfg.n_missing} images are missing and
  {cfg.n_corrupt} are corrupt (truncated JPEG, zero bytes, an HTML page named .jpg).
  `{IMAGE_KINDS_FILE}` lists what each image shows and its expected status.

This is test and demo data, not a benchmark: scores on it say nothing about real tweets.
"""


def generate(cfg: SampleConfig, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Generate the sample dataset into ``out``.

    Args:
        cfg: The settings.
        out: Output folder. It may be absent, empty, or a previous sample (recognised by
            its ``sample.json``), which is replaced.
        overwrite: Replace ``out`` even when it holds other files.

    Returns:
        ``out``.

    Raises:
        DataError: If ``out`` holds other files and ``overwrite`` is False.
        ConfigError: If a split is too small for ``n_missing + n_corrupt``.
    """
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise DataError(f"{out}: exists and is not a folder; choose another --out")
        if any(out.iterdir()) and not (out / MANIFEST).is_file() and not overwrite:
            raise DataError(
                f"{out}: folder is not empty and is not a previous mner sample; choose an "
                "empty folder or pass --force to replace it"
            )
    out.parent.mkdir(parents=True, exist_ok=True)

    rng = random.Random(f"mner-sample-{cfg.seed}")
    sizes = cfg.split_sizes()
    ids = _image_ids(rng, sum(sizes.values()))
    # The OCR-dependent tweets come from their own streams (ids, text, images): the
    # rest of the sample stays byte-identical to a sample without them.
    ocr_sizes = cfg.ocr_sizes()
    ocr_ids = _image_ids(random.Random(f"mner-sample-{cfg.seed}-ocr"), sum(ocr_sizes.values()),
                         frozenset(ids))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        counts: dict[str, dict[str, int]] = {}
        dep_rows: list[str] = []
        ocr_rows: list[str] = []
        kind_rows: list[str] = []
        ocr_kind_rows: list[str] = []
        knowledge: list[tuple[Tweet, _Planned]] = []
        offset = ocr_offset = 0
        for split_no, split in enumerate(SPLITS):
            n = sizes[split]
            plans = _plan_split(cfg, random.Random(f"mner-sample-{cfg.seed}-{split}"), n)
            img_rng = np.random.default_rng([cfg.seed, split_no])
            tweets = []
            for i, plan in enumerate(plans):
                iid = ids[offset + i]
                tweets.append(Tweet(iid, tuple(plan.tokens), tuple(plan.labels), "", 0, i))
                _write_image(tmp / "images" / f"{iid}.jpg", plan, img_rng, cfg)
                kind_rows.append(f"{split}\t{i}\t{iid}\t{plan.kind}\t{plan.status.value}")
                if plan.dependent:
                    for typ, s, e in entities(plan.labels):
                        dep_rows.append(f"{split}\t{i}\t{iid}\t{s}\t{e}\t{typ}")
            offset += n
            ocr_plans = _plan_ocr(random.Random(f"mner-sample-{cfg.seed}-{split}-ocr"), ocr_sizes[split])
            ocr_rng = np.random.default_rng([cfg.seed, split_no, 1])
            for j, plan in enumerate(ocr_plans):
                i, iid = n + j, ocr_ids[ocr_offset + j]
                tweets.append(Tweet(iid, tuple(plan.tokens), tuple(plan.labels), "", 0, i))
                _write_image(tmp / "images" / f"{iid}.jpg", plan, ocr_rng, cfg)
                ocr_kind_rows.append(f"{split}\t{i}\t{iid}\t{plan.kind}\t{plan.status.value}")
                for typ, s, e in entities(plan.labels):
                    ocr_rows.append(f"{split}\t{i}\t{iid}\t{s}\t{e}\t{typ}")
            ocr_offset += len(ocr_plans)
            plans = plans + ocr_plans
            knowledge += list(zip(tweets, plans, strict=True))
            write_conll(tmp / f"{split}.txt", tweets)
            c = {"tweets": len(plans), "tokens": sum(len(p.tokens) for p in plans)}
            for t in TYPES:
                c[t] = sum(1 for p in plans for typ, _, _ in entities(p.labels) if typ == t)
            c["image_dependent"] = sum(p.dependent for p in plans)
            c["ocr_dependent"] = len(ocr_plans)
            c["neutral_images"] = sum(p.kind == NEUTRAL for p in plans)
            c["missing"] = sum(p.status is ImageStatus.MISSING for p in plans)
            c["corrupt"] = sum(p.status.broken for p in plans)
            counts[split] = c
        header = "\t".join(IMAGE_DEPENDENT_HEADER) + "\n"
        (tmp / IMAGE_DEPENDENT_FILE).write_text(
            header + "".join(r + "\n" for r in dep_rows), encoding="utf-8"
        )
        (tmp / OCR_DEPENDENT_FILE).write_text(
            header + "".join(r + "\n" for r in ocr_rows), encoding="utf-8"
        )
        (tmp / IMAGE_KINDS_FILE).write_text(
            "split\tindex\timage_id\tkind\tstatus\n"
            + "".join(r + "\n" for r in kind_rows + ocr_kind_rows),
            encoding="utf-8",
        )
        (tmp / KNOWLEDGE_FILE).write_text(
            _knowledge(random.Random(f"mner-sample-{cfg.seed}-knowledge"), knowledge), encoding="utf-8"
        )
        from mner.config import to_dict

        (tmp / MANIFEST).write_text(
            json.dumps({"config": to_dict(cfg), "counts": counts}, indent=2) + "\n",
            encoding="utf-8",
        )
        (tmp / "README.md").write_text(_readme(cfg, counts), encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a dataset folder should not be
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` folder to ``out``, replacing what was there."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def read_image_kinds(data_dir: str | os.PathLike) -> dict[str, tuple[str, str]]:
    """Read ``image_kinds.tsv`` of a generated sample: ``{image_id: (kind, status)}``.

    Tests of the vision stage use it to check that features separate the image types and
    that broken files get the expected status.
    """
    path = Path(data_dir) / IMAGE_KINDS_FILE
    if not path.is_file():
        raise DataError(f"{path}: no such file; this folder is not a generated mner sample")
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        _, _, iid, kind, status = line.split("\t")
        out[iid] = (kind, status)
    return out
