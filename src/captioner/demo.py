"""The synthetic offline dataset: large coloured shapes on plain backgrounds, 5 captions each.

Written in Flickr8k's exact on-disk layout, so every later stage runs the same code as on Flickr8k:

    raw/Flicker8k_Dataset/demo_00000.jpg ...
    raw/Flickr8k_text/Flickr8k.token.txt                    NAME.jpg#K<TAB>caption
    raw/Flickr8k_text/Flickr_8k.{train,dev,test}Images.txt  one image name per line
    raw/demo.json                                           the settings; written last = complete

Why it is learnable from VGG16 features with *random* weights: such features mostly carry colour
and coarse layout, so every fact a caption states is a colour or a coarse layout fact (one large
shape at one of five places, or two shapes side by side), colours are saturated, and each image's
five captions state the same facts in five fixed wordings. A model that gets the facts right
reproduces one reference exactly. Vocabulary: 40 words; captions 9-12 words.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from captioner.config import Config
from captioner.io import atomic_write_bytes, log, read_json, write_json

FORMAT = 1  # bump when drawing or wording changes, so old demo data is regenerated
SETTINGS_FILE = "demo.json"
IMAGES_DIR = "Flicker8k_Dataset"  # misspelled as in the real Flickr8k archive
TEXT_DIR = "Flickr8k_text"
SPLITS = ("train", "dev", "test")

COLOURS = {  # saturated RGB, far apart from each other and from the grey backgrounds
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 230),
    "yellow": (245, 225, 20),
    "purple": (140, 40, 190),
    "orange": (250, 135, 0),
}
BACKGROUNDS = {"white": 238, "gray": 128, "black": 22}  # grey level
SHAPES = ("circle", "square", "triangle")
# Position phrase -> shape centre as fractions of the image side (x, y).
POSITIONS = {
    "on the left": (0.28, 0.5),
    "on the right": (0.72, 0.5),
    "at the top": (0.5, 0.28),
    "at the bottom": (0.5, 0.72),
    "in the middle": (0.5, 0.5),
}
SIZES = {"big": 0.23, "small": 0.13}  # radius as a fraction of the image side
SYNONYM = {"big": "large", "small": "little"}
PAIR_RADIUS = 0.16  # two shapes side by side, both medium-sized (no size word)
PAIR_PROBABILITY = 0.3


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    size: str  # "big", "small", or "" for a pair
    position: str  # a POSITIONS phrase


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]  # one shape, or two: left then right


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw the facts of one image uniformly at random."""
    background = str(rng.choice(list(BACKGROUNDS)))
    if rng.random() < PAIR_PROBABILITY:
        left, right = rng.choice(list(COLOURS), size=2, replace=False)  # two different colours
        kinds = rng.choice(SHAPES, size=2)
        return Scene(
            background,
            (
                Shape(str(left), str(kinds[0]), "", "on the left"),
                Shape(str(right), str(kinds[1]), "", "on the right"),
            ),
        )
    shape = Shape(
        str(rng.choice(list(COLOURS))),
        str(rng.choice(SHAPES)),
        str(rng.choice(list(SIZES))),
        str(rng.choice(list(POSITIONS))),
    )
    return Scene(background, (shape,))


def captions(scene: Scene) -> list[str]:
    """Five differently worded captions stating the same facts (9-12 words each)."""
    bg = scene.background
    if len(scene.shapes) == 1:
        s = scene.shapes[0]
        thing, where = f"{s.size} {s.colour} {s.kind}", s.position
        return [
            f"a {thing} {where} on a {bg} background",
            f"a {bg} background with a {thing} {where}",
            f"on {bg} there is a {thing} {where}",
            f"{where} a {thing} sits on {bg}",
            f"one {SYNONYM[s.size]} {s.colour} {s.kind} {where} against {bg}",
        ]
    # With their article: "a red circle", "an orange square".
    left, right = (
        f"{'an' if s.colour[0] in 'aeiou' else 'a'} {s.colour} {s.kind}" for s in scene.shapes
    )
    return [
        f"{left} and {right} on a {bg} background",
        f"a {bg} background with {left} and {right}",
        f"on {bg} there is {left} left of {right}",
        f"{left} next to {right} on {bg}",
        f"two shapes {left} and {right} against {bg}",
    ]


def draw(scene: Scene, side: int, rng: np.random.Generator) -> Image.Image:
    """Render a scene as a side x side RGB image, with small random jitter and noise."""
    level = BACKGROUNDS[scene.background] + rng.integers(-12, 13)
    noise = rng.integers(-8, 9, size=(side, side, 3))  # mild texture so no two images are equal
    image = Image.fromarray(np.clip(level + noise, 0, 255).astype(np.uint8), "RGB")
    pen = ImageDraw.Draw(image)
    for shape in scene.shapes:
        fx, fy = POSITIONS[shape.position]
        radius = (SIZES[shape.size] if shape.size else PAIR_RADIUS) * rng.uniform(0.9, 1.1) * side
        cx, cy = (np.array([fx, fy]) + rng.uniform(-0.04, 0.04, size=2)) * side
        colour = tuple(
            int(c)
            for c in np.clip(
                np.array(COLOURS[shape.colour]) + rng.integers(-20, 21, size=3), 0, 255
            )
        )
        if shape.kind == "circle":
            pen.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
        elif shape.kind == "square":
            half = radius * 0.9  # a square of about the circle's area
            pen.rectangle([cx - half, cy - half, cx + half, cy + half], fill=colour)
        else:  # an upward triangle filling the same bounding box
            pen.polygon(
                [
                    (cx, cy - radius),
                    (cx - radius, cy + radius * 0.85),
                    (cx + radius, cy + radius * 0.85),
                ],
                fill=colour,
            )
    return image


def settings(cfg: Config) -> dict:
    """Everything the generated files depend on; a difference means regenerate."""
    return {"format": FORMAT, "seed": cfg.seed, **asdict(cfg.demo)}


def generate(cfg: Config) -> Path:
    """Write the demo dataset under cfg.raw_dir (Flickr8k layout) and return cfg.raw_dir.

    Deterministic from cfg.seed and cfg.demo; reuses finished data made with the same settings.
    """
    raw, wanted = cfg.raw_dir, settings(cfg)
    marker = raw / SETTINGS_FILE
    if marker.is_file():
        if read_json(marker) == wanted:
            log(f"reusing {raw}")
            return raw
        log(f"{marker}: made with other settings; regenerating the demo dataset")
    marker.unlink(missing_ok=True)
    for folder in (IMAGES_DIR, TEXT_DIR):  # only our own generated files: no stale images
        shutil.rmtree(raw / folder, ignore_errors=True)
    (raw / IMAGES_DIR).mkdir(parents=True)

    counts = dict(
        zip(SPLITS, (cfg.demo.train_images, cfg.demo.dev_images, cfg.demo.test_images), strict=True)
    )
    names = [f"demo_{i:05d}.jpg" for i in range(sum(counts.values()))]
    token_lines = []
    for index, name in enumerate(tqdm(names, desc="demo images", unit="img")):
        rng = np.random.default_rng([cfg.seed, index])  # per image: independent of the others
        scene = sample_scene(rng)
        draw(scene, cfg.demo.image_size, rng).save(raw / IMAGES_DIR / name, quality=90)
        token_lines += [f"{name}#{k}\t{text}" for k, text in enumerate(captions(scene))]

    text_dir = raw / TEXT_DIR
    atomic_write_bytes(text_dir / "Flickr8k.token.txt", ("\n".join(token_lines) + "\n").encode())
    start = 0
    for split, count in counts.items():  # consecutive blocks: images are i.i.d. already
        block = "".join(f"{name}\n" for name in names[start : start + count])
        atomic_write_bytes(text_dir / f"Flickr_8k.{split}Images.txt", block.encode())
        start += count
    write_json(marker, wanted)  # last: its presence means the dataset is complete
    log(f"demo dataset: {len(names)} images ({counts}) in {raw}")
    return raw
