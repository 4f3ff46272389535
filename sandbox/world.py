"""A built-in synthetic world: seeded scenes written in the official on-disk
formats, so the real loaders, engine and metrics train and score on it.

Why: real Prismer needs COCO, pretrained networks and six expert models; this
world needs nothing. Each scene is a room (wall, floor, a lighting gradient)
with 1-5 objects (shapes x colours x sizes) standing at distinct depths, far
ones drawn first so near ones occlude them, and sometimes a sign with a
printed word. Every expert's label is the scene's exact ground truth.

Layout under `root` (what `configs/world_*.yaml` point at):
  data/vqav2/{train2014,val2014}/COCO_<split>2014_<id>.jpg   images
  data/coco_karpathy_{train,test}.json, coco_karpathy_test_gt.json
  data/vqav2_train_val.json, vqav2_test.json, answer_list.json
  labels/<expert>/vqav2/<image>.png (+ .json: detection classes, OCR words)
  label_spaces/label_features.safetensors, label_names.json
  tokenizer/   a RoBERTa-style BPE trained on the world's text
  scenes.json  every scene's facts; world.json  the config, written last

Label features are hashed from the class name or word (`name_feature`):
deterministic 64-d unit vectors, NOT CLIP text features.

Scene i draws from its own generator seeded by (seed, i), so scenes can be
made in any order and by any number of processes. Generation runs in chunks;
a chunk's record is written (atomically) only after all its files, so an
interrupted run redoes at most the unfinished chunks, writing identical bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from common.files import atomic_write
from common.label_space import FEATURE_DIM, SAFETENSORS_NAME
from common.labels import NONE_ID, Instances, Words, label_file
from common.modalities import EXPERTS
from dataset.text import pre_caption, pre_question

log = logging.getLogger(__name__)

SHAPES = ("cube", "sphere", "cone", "cylinder")
COLOURS = {
    "red": (200, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (225, 200, 40),
    "purple": (140, 60, 170),
    "white": (235, 235, 235),
}
SIZES = {"small": 0.15, "large": 0.25}  # object height as a fraction of the image side
WORDS = ("stop", "exit", "open", "cafe", "shop", "sale", "push", "pull")
WALLS = {"grey": (150, 150, 155), "beige": (205, 190, 160), "teal": (90, 140, 140)}
FLOORS = {"wooden": (135, 95, 60), "dark": (70, 70, 75), "tiled": (180, 180, 170)}
NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight")
MAX_OBJECTS = 8
TOKENIZER_VOCAB = 1000  # the world recipes' vocab_size
# Semantic classes (seg_coco and seg_ade spaces) and detection classes of the world.
SEG_CLASSES = ("floor", "wall", "sign", *SHAPES)
DET_CLASSES = (*SHAPES, "sign")
CHUNK = 128
MIN_VISIBLE = 0.4  # of an object's own area; else the layout is redrawn
QUESTION_TYPES = ("colour", "shape", "count", "yes/no", "closer", "sign")


class WorldConfigError(ValueError):
    """A world config that cannot produce a valid world."""


@dataclass(frozen=True)
class WorldConfig:
    """What the world looks like; every value is checked before generating."""

    seed: int = 0
    train_scenes: int = 2000
    test_scenes: int = 200
    resolution: int = 128
    # The smallest patch size a model reading this world uses: images below it make no token.
    patch_size: int = 16
    min_objects: int = 1
    max_objects: int = 4
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    sizes: tuple[str, ...] = tuple(SIZES)
    words: tuple[str, ...] = WORDS
    sign_fraction: float = 0.3
    captions_per_image: int = 5
    questions_per_image: int = 4
    jpeg_quality: int = 90
    # Answer-balanced questions (`_plan`): over the images that receive a question text, its
    # answers are near uniform, so an image-blind prior scores about chance. False is the
    # original generator, byte for byte.
    balance: bool = False

    def __post_init__(self):
        def bad(msg):
            raise WorldConfigError(f"world config: {msg}")

        for name in ("seed", "train_scenes", "test_scenes", "resolution", "patch_size", "min_objects", "max_objects"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                bad(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.min_objects < 1:
            bad(f"min_objects is {self.min_objects}, but every caption describes at least one object")
        if not self.min_objects <= self.max_objects <= MAX_OBJECTS:
            bad(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got {self.min_objects}..{self.max_objects}")
        if self.resolution < max(self.patch_size, 32):
            bad(
                f"resolution {self.resolution} is below the patch size {self.patch_size} (or 32 px, the least drawable)"
            )
        if self.train_scenes < 1 or self.test_scenes < 1:
            bad(f"need at least one train and one test scene, got {self.train_scenes} and {self.test_scenes}")
        if self.train_scenes + self.test_scenes >= 10**12:
            bad("more scenes than 12-digit COCO ids can name")
        for name, known in (("shapes", SHAPES), ("colours", COLOURS), ("sizes", SIZES)):
            values = getattr(self, name)
            unknown = [v for v in values if v not in known]
            if unknown or not values or len(set(values)) != len(values):
                bad(f"{name} {list(values)} must be distinct names from {list(known)}")
        if len(self.shapes) * len(self.colours) < 2:
            bad("need at least two shape/colour combinations for yes/no questions")
        if not 0.0 <= self.sign_fraction <= 1.0:
            bad(f"sign_fraction {self.sign_fraction} is not in [0, 1]")
        if self.sign_fraction > 0 and (not self.words or not all(w.isalpha() and w.islower() for w in self.words)):
            bad(f"signs need printed words of lower-case letters, got {list(self.words)}")
        if self.captions_per_image < 1 or self.questions_per_image < 1:
            bad("need at least one caption and one question per image")
        if not 1 <= self.jpeg_quality <= 100:
            bad(f"jpeg_quality {self.jpeg_quality} is not in 1..100")
        if not isinstance(self.balance, bool):
            bad(f"balance must be true or false, got {self.balance!r}")

    @classmethod
    def from_dict(cls, d: dict) -> WorldConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise WorldConfigError(f"world config: unknown key(s) {unknown}; known: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def to_dict(self) -> dict:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        if not self.balance:  # the key is newer than the original worlds: their config files stay as they were
            del d["balance"]
        return d

    @property
    def num_scenes(self) -> int:
        return self.train_scenes + self.test_scenes


# ------------------------------------------------------------------ features


def name_feature(name: str) -> np.ndarray:
    """A deterministic 64-d unit vector hashed from `name` (not a CLIP feature:
    unrelated names get unrelated vectors)."""
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(FEATURE_DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


def write_label_spaces(folder: Path) -> None:
    """The world's label spaces in the form `load_label_spaces` reads."""
    import torch
    from safetensors.torch import save_file

    names = {"coco": list(SEG_CLASSES), "ade": list(SEG_CLASSES), "detection": list(DET_CLASSES)}
    tensors = {f"{s}.features": torch.from_numpy(np.stack([name_feature(n) for n in v])) for s, v in names.items()}
    tensors["background.features"] = torch.from_numpy(name_feature("<background>"))[None]
    meta = {"features": "sha256-hashed names (sandbox.world.name_feature), not CLIP"}
    atomic_write(folder / SAFETENSORS_NAME, lambda p: save_file(tensors, p, metadata=meta))
    _atomic_bytes(folder / "label_names.json", json.dumps(names, indent=1).encode())


# ------------------------------------------------------------------- files


def _atomic_bytes(path: Path, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def _encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kw)
    return buf.getvalue()


def image_name(index: int, cfg: WorldConfig) -> str:
    """COCO-style names, so the engine parses ids from them: train scenes in
    train2014, test scenes in val2014 (as Karpathy's test split); id = index + 1."""
    split = "train" if index < cfg.train_scenes else "val"
    return f"{split}2014/COCO_{split}2014_{index + 1:012d}.jpg"


# ------------------------------------------------------------------ layout


@functools.cache
def _word_mask(word: str) -> np.ndarray:
    """The word printed in black on white, as a bool mask cropped to its ink."""
    font = ImageFont.load_default(size=24)
    img = Image.new("L", (24 * len(word) + 8, 40), 0)
    ImageDraw.Draw(img).text((4, 4), word, fill=255, font=font)
    ink = np.asarray(img) > 127
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _layout(cfg: WorldConfig, rng: np.random.Generator, plan: dict | None = None) -> dict:
    """Scene facts in image fractions: objects far to near (distinct depths).
    A balanced world's `plan` fixes the objects' colours and shapes (far to near)
    and the sign's word; positions and sizes are drawn here either way."""
    horizon = rng.uniform(0.35, 0.5)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1)) if plan is None else len(plan["objects"])
    # Distinct base rows (= depths), at least 0.05 apart so 'closer' is unambiguous.
    lo, hi = horizon + 0.12, 0.96
    gaps = rng.dirichlet(np.ones(n + 1)) * (hi - lo - 0.05 * (n - 1))
    bases = lo + np.cumsum(gaps[:n]) + 0.05 * np.arange(n)
    objects = []
    for i, base in enumerate(bases):
        closeness = (base - horizon) / (1 - horizon)
        size = str(rng.choice(cfg.sizes))
        h = SIZES[size] * (0.7 + 0.5 * closeness)
        shape = str(rng.choice(cfg.shapes)) if plan is None else plan["objects"][i][1]
        w = h * (0.8 if shape == "cylinder" else 0.95 if shape == "cone" else 1.0)
        x = rng.uniform(0.08 + w / 2, 0.92 - w / 2)
        objects.append(
            {
                "shape": shape,
                "colour": str(rng.choice(cfg.colours)) if plan is None else plan["objects"][i][0],
                "size": size,
                "box": [float(x - w / 2), float(base - h), float(x + w / 2), float(base)],
                "closeness": float(closeness),
            }
        )
    sign = None
    if plan is None:
        word = str(rng.choice(cfg.words)) if rng.random() < cfg.sign_fraction else None
    else:
        word = plan["word"]
    if word is not None:
        w, h = 0.12 * len(word) + 0.06, 0.13
        x, y = rng.uniform(0.04, 0.96 - w), rng.uniform(0.03, max(0.031, horizon - h - 0.04))
        sign = {"word": word, "box": [float(x), float(y), float(x + w), float(y + h)]}
    light = rng.uniform(-0.35, 0.35, size=2)
    return {
        "horizon": float(horizon),
        "wall": str(rng.choice(list(WALLS))),
        "floor": str(rng.choice(list(FLOORS))),
        "light": [float(light[0]), float(light[1])],
        "objects": objects,
        "sign": sign,
    }


# ------------------------------------------------------------------ drawing


def _px(box, R) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (int(round(v * R)) for v in box)
    return max(x0, 0), max(y0, 0), min(max(x1, x0 + 1), R), min(max(y1, y0 + 1), R)


def _shape(shape: str, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Mask (h, w) and unit normals (h, w, 3; x right, y up, z to the camera)
    of a shape filling an h x w box."""
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    u = (u + 0.5) / w * 2 - 1  # -1..1 left to right
    v = (v + 0.5) / h  # 0..1 top to bottom
    normal = np.zeros((h, w, 3), np.float32)
    if shape == "sphere":
        r2 = u**2 + (2 * v - 1) ** 2
        mask = r2 <= 1
        normal[..., 0], normal[..., 1] = u, 1 - 2 * v
        normal[..., 2] = np.sqrt(np.clip(1 - r2, 0, 1))
    elif shape == "cube":
        mask = np.ones((h, w), bool)
        top = v < 0.22
        normal[..., 2] = ~top
        normal[..., 1] = top
    elif shape == "cylinder":
        top = (u**2 + ((v - 0.1) / 0.1) ** 2) <= 1
        mask = (v >= 0.1) | top
        normal[..., 0] = u
        normal[..., 2] = np.sqrt(np.clip(1 - u**2, 0, 1))
        normal[top] = (0, 1, 0)
    else:  # cone: apex at the top centre
        mask = np.abs(u) <= v
        normal[..., 0] = 0.9 * u
        normal[..., 1] = 0.45
        normal[..., 2] = np.sqrt(np.clip(1 - 0.81 * u**2 - 0.2, 0, 1))
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True) + 1e-6
    return mask, normal


def render(scene: dict, R: int) -> dict[str, np.ndarray]:
    """Image and every expert's ground truth (uint8 arrays) of a laid-out scene,
    plus `visible`: each object's visible fraction of its own area."""
    yy = (np.arange(R, dtype=np.float32)[:, None] + 0.5) / R
    xx = (np.arange(R, dtype=np.float32)[None, :] + 0.5) / R
    hz = scene["horizon"]
    lx, ly = scene["light"]
    light = np.array([lx, 0.6, 0.75], np.float32)
    light /= np.linalg.norm(light)
    floor = yy >= hz
    gradient = 1 + lx * (xx - 0.5) * 1.2 + ly * (yy - 0.5)
    base = np.where(floor[..., None], FLOORS[scene["floor"]], WALLS[scene["wall"]]).astype(np.float32)
    rgb = base * gradient[..., None] * np.where(floor, 1.0 - 0.25 * (1 - (yy - hz) / (1 - hz)), 1.0)[..., None]
    closeness = np.clip((yy - hz) / (1 - hz), 0, 1)
    depth = np.broadcast_to(np.where(floor, 40 + 200 * closeness, 25), (R, R)).copy()
    normal = np.zeros((R, R, 3), np.float32)
    normal[...] = np.where(floor[..., None], (0, 1, 0), (0, 0, 1))
    seg = np.broadcast_to(np.where(floor, 0, 1), (R, R)).astype(np.uint8)
    inst = np.full((R, R), NONE_ID, np.uint8)
    ocr = np.full((R, R), NONE_ID, np.uint8)
    ink = np.zeros((R, R), bool)

    sign = scene["sign"]
    if sign is not None:
        x0, y0, x1, y1 = _px(sign["box"], R)
        rgb[y0:y1, x0:x1] = (240, 235, 220)
        seg[y0:y1, x0:x1] = SEG_CLASSES.index("sign")
        inst[y0:y1, x0:x1] = len(scene["objects"])
        word = _word_mask(sign["word"])
        pad = max(1, (y1 - y0) // 6)
        th, tw = y1 - y0 - 2 * pad, x1 - x0 - 2 * pad
        if th > 0 and tw > 0:
            text = np.asarray(Image.fromarray(word).resize((tw, th), Image.BILINEAR)) > 0
            ink[y0 + pad : y1 - pad, x0 + pad : x1 - pad] = text
            ocr[y0 + pad : y1 - pad, x0 + pad : x1 - pad] = 0
            rgb[ink] = (20, 20, 20)

    areas = []
    for i, obj in enumerate(scene["objects"]):  # far to near: later ones occlude
        x0, y0, x1, y1 = _px(obj["box"], R)
        mask, n = _shape(obj["shape"], y1 - y0, x1 - x0)
        areas.append(int(mask.sum()))
        shade = 0.45 + 0.55 * np.clip(n @ light, 0, 1)
        colour = np.asarray(COLOURS[obj["colour"]], np.float32)
        win = (slice(y0, y1), slice(x0, x1))
        rgb[win][mask] = colour * shade[mask][:, None]
        d = 40 + 200 * obj["closeness"] + 12 * n[..., 2]  # rounded shapes bulge toward the camera
        depth[win][mask] = d[mask]
        normal[win][mask] = n[mask]
        seg[win][mask] = SEG_CLASSES.index(obj["shape"])
        inst[win][mask] = i
        ocr[win][mask] = NONE_ID
        ink[win][mask] = False

    counts = np.bincount(inst.ravel(), minlength=256)
    visible = [float(counts[i] / max(a, 1)) for i, a in enumerate(areas)]
    # Edges: where the semantic or instance map changes, and the printed strokes.
    ids = seg.astype(np.int32) * 256 + inst
    edge = np.zeros((R, R), bool)
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    edge[1:, :] |= ids[1:, :] != ids[:-1, :]
    edge |= ink & ~np.roll(ink, 1, axis=1)
    return {
        "rgb": np.clip(rgb, 0, 255).astype(np.uint8),
        "depth": np.clip(depth, 0, 255).astype(np.uint8),
        "normal": np.clip((normal + 1) * 127.5, 0, 255).astype(np.uint8),
        "edge": edge.astype(np.uint8) * 255,
        "seg": seg,
        "inst": inst,
        "ocr": ocr,
        "visible": visible,
        "sign_visible": float((ocr == 0).sum() / max(1, ((ocr == 0) | ink).sum())) if sign else 1.0,
    }


def make_scene(cfg: WorldConfig, index: int) -> tuple[dict, dict]:
    """(facts, rendered arrays) of scene `index`; a layout where an object is
    mostly hidden or the sign's text is covered is drawn again."""
    rng = np.random.default_rng([cfg.seed, index])
    plan = _plan(cfg, rng) if cfg.balance else None
    for _ in range(50):
        scene = _layout(cfg, rng, plan)
        out = render(scene, cfg.resolution)
        if min(out["visible"]) >= MIN_VISIBLE and out["sign_visible"] >= 0.9:
            break
        # A balanced plan may ask about its sign: redraw the layout rather than drop it.
        if plan is None and scene["sign"] is not None and min(out["visible"]) >= MIN_VISIBLE:
            scene["sign"] = None  # keep the objects, drop the covered sign
            out = render(scene, cfg.resolution)
            break
    else:  # pragma: no cover - a config that cannot fit its objects
        raise WorldConfigError(f"scene {index}: no layout keeps every object visible; allow fewer objects")
    scene["captions"] = captions(scene, rng, cfg.captions_per_image)
    scene["questions"] = questions(scene, rng, cfg) if plan is None else balanced_questions(scene, rng, plan, cfg)
    return scene, out


# -------------------------------------------------------------------- text


def _plural(shape: str) -> str:
    return shape + "s"


def _phrase(obj: dict, size: bool = True) -> str:
    return f"{obj['size'] + ' ' if size else ''}{obj['colour']} {obj['shape']}"


def _groups(objects: list[dict]) -> str:
    """'two red cubes and a blue sphere': objects grouped by colour and shape, most first."""
    groups = Counter((o["colour"], o["shape"]) for o in objects)
    parts = [
        f"{NUMBERS[k]} {c} {_plural(s)}" if k > 1 else f"a {c} {s}"
        for (c, s), k in sorted(groups.items(), key=lambda kv: -kv[1])
    ]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions(scene: dict, rng: np.random.Generator, k: int) -> list[str]:
    """`k` distinct templated descriptions, all true of the scene."""
    objs = scene["objects"]
    near, far = objs[-1], objs[0]
    n = len(objs)
    things = "object" if n == 1 else "objects"
    pool = [
        f"{_groups(objs)} on a {scene['floor']} floor",
        f"{NUMBERS[n]} {things} in a room with a {scene['wall']} wall",
        f"a {_phrase(near)} is the closest object to the camera",
        f"{_groups(objs)} in front of a {scene['wall']} wall",
        f"a room with {_groups(objs)}",
    ]
    if n > 1:
        pool += [
            f"a {_phrase(near)} in front of a {_phrase(far)}",
            f"a {_phrase(far, False)} behind a {_phrase(near, False)}",
        ]
    else:
        pool.append(f"a single {_phrase(near)} standing on the floor")
    if scene["sign"] is not None:
        word = scene["sign"]["word"]
        pool += [f"a sign that says {word} above {_groups(objs)}", f"{_groups(objs)} under a {word} sign"]
    order = rng.permutation(len(pool))
    picks = [pool[i] for i in order[:k]]
    while len(picks) < k:  # fewer templates than asked: repeat (COCO has duplicates too)
        picks.append(pool[order[len(picks) % len(pool)]])
    return picks


def questions(scene: dict, rng: np.random.Generator, cfg: WorldConfig) -> list[dict]:
    """VQA questions, each with its one true answer and a type."""
    objs = scene["objects"]
    shapes, colours = Counter(o["shape"] for o in objs), Counter(o["colour"] for o in objs)
    pool = []
    for o in objs:
        if shapes[o["shape"]] == 1:
            pool.append(("colour", f"what colour is the {o['shape']}?", o["colour"]))
        if colours[o["colour"]] == 1:
            pool.append(("shape", f"what shape is the {o['colour']} object?", o["shape"]))
    shape = str(rng.choice(cfg.shapes))
    pool.append(("count", f"how many {_plural(shape)} are there?", str(shapes[shape])))
    pool.append(("count", "how many objects are there?", str(len(objs))))
    present = {(o["colour"], o["shape"]) for o in objs}
    if rng.random() < 0.5:
        c, s = sorted(present)[int(rng.integers(len(present)))]
    else:
        c, s = str(rng.choice(cfg.colours)), str(rng.choice(cfg.shapes))
    pool.append(("yes/no", f"is there a {c} {s}?", "yes" if (c, s) in present else "no"))
    unique = [o for o in objs if sum(p["colour"] == o["colour"] and p["shape"] == o["shape"] for p in objs) == 1]
    if len(unique) >= 2:
        a, b = (unique[i] for i in rng.choice(len(unique), 2, replace=False))
        closer = max(a, b, key=lambda o: o["closeness"])
        q = f"which is closer, the {_phrase(a, False)} or the {_phrase(b, False)}?"
        pool.append(("closer", q, _phrase(closer, False)))
    if scene["sign"] is not None:
        pool.append(("sign", "what does the sign say?", scene["sign"]["word"]))
    order = rng.permutation(len(pool))[: cfg.questions_per_image]
    return [{"type": pool[i][0], "question": pool[i][1], "answer": pool[i][2]} for i in order]


def _plan(cfg: WorldConfig, rng: np.random.Generator) -> dict:
    """A balanced scene's plan: its sign's word, its question types (at most one
    of each), the count question with an answer drawn uniformly, and objects
    (colour, shape), far to near, that make that answer true.

    Only counts need the scene built around them. The other answers come out
    near uniform per question text from the draws' symmetry (every colour and
    shape alike, pairs asked in random order) and from how `balanced_questions`
    picks their subjects; which types an image gets is drawn before its objects,
    so it cannot depend on their answers."""
    word = str(rng.choice(cfg.words)) if rng.random() < cfg.sign_fraction else None
    types = [t for t in QUESTION_TYPES if t != "sign" or word is not None]
    types = [types[i] for i in rng.permutation(len(types))[: cfg.questions_per_image]]
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    shapes = [str(rng.choice(cfg.shapes)) for _ in range(n)]
    count = None
    if "count" in types:
        if rng.random() < 1 / (len(cfg.shapes) + 1):  # as often as any one shape's count
            count = ("how many objects are there?", n)
        else:
            shape = str(rng.choice(cfg.shapes))
            others = [s for s in cfg.shapes if s != shape]
            k = int(rng.integers(0 if others else cfg.min_objects, cfg.max_objects + 1))
            n = int(rng.integers(max(k, cfg.min_objects), cfg.max_objects + 1)) if others else k
            shapes = [shape] * k + [str(rng.choice(others)) for _ in range(n - k)]
            count = (f"how many {_plural(shape)} are there?", k)
    shapes = [shapes[i] for i in rng.permutation(n)]
    objects = [(str(rng.choice(cfg.colours)), s) for s in shapes]
    return {"word": word, "types": types, "count": count, "objects": objects}


def balanced_questions(scene: dict, rng: np.random.Generator, plan: dict, cfg: WorldConfig) -> list[dict]:
    """The questions of a balanced scene's plan, in its type order; a colour,
    shape or closer question is left out where no object makes its text
    unambiguous. A yes/no question is 'yes' half the time (about a random
    object) and otherwise about a colour-shape pair the scene lacks."""
    objs = scene["objects"]
    shapes, colours = Counter(o["shape"] for o in objs), Counter(o["colour"] for o in objs)
    present = {(o["colour"], o["shape"]) for o in objs}
    unique = [o for o in objs if sum(p["colour"] == o["colour"] and p["shape"] == o["shape"] for p in objs) == 1]
    picked = []
    for kind in plan["types"]:
        if kind == "colour":
            pool = [o for o in objs if shapes[o["shape"]] == 1]
            if pool:
                o = pool[int(rng.integers(len(pool)))]
                picked.append((kind, f"what colour is the {o['shape']}?", o["colour"]))
        elif kind == "shape":
            pool = [o for o in objs if colours[o["colour"]] == 1]
            if pool:
                o = pool[int(rng.integers(len(pool)))]
                picked.append((kind, f"what shape is the {o['colour']} object?", o["shape"]))
        elif kind == "count":
            question, k = plan["count"]
            picked.append((kind, question, str(k)))
        elif kind == "yes/no":
            absent = [(c, s) for c in cfg.colours for s in cfg.shapes if (c, s) not in present]
            if absent and rng.random() < 0.5:
                c, s = absent[int(rng.integers(len(absent)))]
            else:
                o = objs[int(rng.integers(len(objs)))]
                c, s = o["colour"], o["shape"]
            picked.append((kind, f"is there a {c} {s}?", "yes" if (c, s) in present else "no"))
        elif kind == "closer" and len(unique) >= 2:
            a, b = (unique[i] for i in rng.choice(len(unique), 2, replace=False))
            closer = max(a, b, key=lambda o: o["closeness"])
            q = f"which is closer, the {_phrase(a, False)} or the {_phrase(b, False)}?"
            picked.append((kind, q, _phrase(closer, False)))
        elif kind == "sign":
            picked.append((kind, "what does the sign say?", scene["sign"]["word"]))
    return [{"type": t, "question": q, "answer": a} for t, q, a in picked]


def answer_choices(question: dict, cfg: WorldConfig) -> int:
    """How many answers a world question of this text can have: a guess among
    them is right 1 time in this many (the chance level of its type)."""
    kind = question["type"]
    if kind == "count":
        lo = cfg.min_objects if question["question"] == "how many objects are there?" else 0
        return cfg.max_objects + 1 - lo
    sizes = {"colour": len(cfg.colours), "shape": len(cfg.shapes), "sign": len(cfg.words)}
    return sizes.get(kind, 2)  # yes/no; closer names its two candidates


def answer_list(cfg: WorldConfig) -> list[str]:
    """Every answer a world question can have."""
    combos = [f"{c} {s}" for c in cfg.colours for s in cfg.shapes]
    counts = [str(i) for i in range(cfg.max_objects + 1)]
    words = list(cfg.words) if cfg.sign_fraction > 0 else []
    return [*cfg.colours, *cfg.shapes, *counts, "yes", "no", *combos, *words]


# ----------------------------------------------------------------- writing


def _write(path: Path, data: bytes, made: set) -> None:
    """A plain write: scene files need no rename of their own, since a chunk
    counts as done only once its record exists, and an unfinished chunk is
    written again from the start (same bytes) when generation resumes."""
    if path.parent not in made:
        path.parent.mkdir(parents=True, exist_ok=True)
        made.add(path.parent)
    with open(path, "wb") as f:
        f.write(data)


def write_scene(cfg: WorldConfig, root: Path, index: int, made: set | None = None) -> dict:
    """Write scene `index`'s image and labels; returns its record."""
    made = set() if made is None else made
    scene, out = make_scene(cfg, index)
    name = image_name(index, cfg)
    data, labels = root / "data" / "vqav2", root / "labels"
    _write(data / name, _encode(out["rgb"], "JPEG", quality=cfg.jpeg_quality), made)
    classes = {i: DET_CLASSES.index(o["shape"]) for i, o in enumerate(scene["objects"])}
    words = {}
    if scene["sign"] is not None:
        classes[len(scene["objects"])] = DET_CLASSES.index("sign")
        word = scene["sign"]["word"]
        words[0] = {"text": word, "features": name_feature(word)}
    found = {
        "depth": Image.fromarray(out["depth"], "L"),
        "normal": Image.fromarray(out["normal"], "RGB"),
        "edge": Image.fromarray(out["edge"], "L"),
        "seg_coco": out["seg"],
        "seg_ade": out["seg"],
        "obj_detection": Instances(out["inst"], classes),
        "ocr_detection": Words(out["ocr"], words),
    }
    for expert, label in found.items():
        EXPERTS[expert].kind.write(label_file(labels, expert, "vqav2", name), label)
    return {"index": index, "image": name, **scene}


def _write_chunk(args) -> int:
    cfg, root, chunk = args
    start, stop = chunk * CHUNK, min((chunk + 1) * CHUNK, cfg.num_scenes)
    made: set = set()
    records = [write_scene(cfg, root, i, made) for i in range(start, stop)]
    _atomic_bytes(_chunk_file(root, chunk), json.dumps(records).encode())
    return stop - start


def _chunk_file(root: Path, chunk: int) -> Path:
    return root / "progress" / f"chunk_{chunk:06d}.json"


def is_complete(root: str | Path, cfg: WorldConfig | None = None) -> bool:
    """True when `root` holds a finished world (of `cfg`, if given)."""
    path = Path(root) / "world.json"
    if not path.is_file():
        return False
    return cfg is None or json.loads(path.read_text())["config"] == cfg.to_dict()


def _check_root(root: Path, cfg: WorldConfig) -> None:
    """A partial or finished world of another config must not be mixed with this one."""
    path = root / "progress" / "config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != cfg.to_dict():
            diff = sorted(k for k in old.keys() | cfg.to_dict().keys() if old.get(k) != cfg.to_dict().get(k))
            raise WorldConfigError(
                f"{root} holds a world of another config (differs in {diff}); remove it or pick another root"
            )
    else:
        _atomic_bytes(path, json.dumps(cfg.to_dict(), indent=1).encode())


def generate(cfg: WorldConfig, root: str | Path, workers: int | None = None, progress: bool = True) -> Path:
    """Generate (or finish generating) the world of `cfg` under `root`."""
    root = Path(root)
    if is_complete(root, cfg):
        log.info("world already complete at %s", root)
        return root
    _check_root(root, cfg)
    for stale in root.rglob(".*.tmp"):  # left by an interrupted run; never renamed into place
        stale.unlink()
    chunks = -(-cfg.num_scenes // CHUNK)
    todo = [c for c in range(chunks) if not _chunk_file(root, c).is_file()]
    if len(todo) < chunks:
        log.info("resuming: %d of %d chunks already written", chunks - len(todo), chunks)
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    bar = tqdm(
        total=cfg.num_scenes, initial=(chunks - len(todo)) * CHUNK, desc="world", unit="scene", disable=not progress
    )
    jobs = [(cfg, root, c) for c in todo]
    t0 = time.perf_counter()
    if workers == 1:
        for job in jobs:
            bar.update(_write_chunk(job))
    else:
        with get_context("spawn").Pool(workers) as pool:
            for n in pool.imap_unordered(_write_chunk, jobs):
                bar.update(n)
    bar.close()
    if todo:
        rate = sum(min(CHUNK, cfg.num_scenes - c * CHUNK) for c in todo) / (time.perf_counter() - t0)
        log.info("scenes written at %.0f scenes/s (%.0f per process)", rate, rate / workers)
    _finish(cfg, root, chunks)
    return root


def _finish(cfg: WorldConfig, root: Path, chunks: int) -> None:
    """The data lists, label spaces and tokenizer from the chunk records; world.json last."""
    from model.tokenizer import train_tokenizer

    records = [r for c in range(chunks) for r in json.loads(_chunk_file(root, c).read_text())]
    train = [r for r in records if r["index"] < cfg.train_scenes]
    test = [r for r in records if r["index"] >= cfg.train_scenes]
    data = root / "data"

    def dump(name, obj):
        _atomic_bytes(data / name, json.dumps(obj).encode())

    dump("coco_karpathy_train.json", [{"image": r["image"], "caption": c} for r in train for c in r["captions"]])
    dump("coco_karpathy_test.json", [{"image": r["image"], "caption": r["captions"]} for r in test])
    dump(
        "coco_karpathy_test_gt.json",
        {
            "info": {"description": "Prismer synthetic world"},
            "images": [{"id": r["index"] + 1, "file_name": r["image"]} for r in test],
            "annotations": [
                {"image_id": r["index"] + 1, "id": 10 * r["index"] + j, "caption": c}
                for r in test
                for j, c in enumerate(r["captions"])
            ],
        },
    )

    def qa(r, j, q, is_test):
        entry = {"image": r["image"], "question": q["question"], "question_id": 100 * (r["index"] + 1) + j}
        entry |= {"dataset": "vqa", "question_type": q["type"]}
        # Train lists carry each distinct answer with its weight; test entries ten human answers.
        return entry | ({"answer": [q["answer"]] * 10} if is_test else {"answer": [q["answer"]], "weight": [1.0]})

    dump("vqav2_train_val.json", [qa(r, j, q, False) for r in train for j, q in enumerate(r["questions"])])
    dump("vqav2_test.json", [qa(r, j, q, True) for r in test for j, q in enumerate(r["questions"])])
    dump("answer_list.json", answer_list(cfg))
    write_label_spaces(root / "label_spaces")
    # The texts in the form the model reads them: cleaned captions, "<s>Question?",
    # " Answer</s>" (capitalised, as the VQA head writes answers).
    texts = [pre_caption(c) for r in train for c in r["captions"]]
    texts += [pre_question(q["question"]) for r in train for q in r["questions"]]
    texts += [" " + a.capitalize() for a in answer_list(cfg)] * 20
    train_tokenizer(texts, TOKENIZER_VOCAB, root / "tokenizer")
    _atomic_bytes(root / "scenes.json", json.dumps(records).encode())
    _atomic_bytes(root / "world.json", json.dumps({"config": cfg.to_dict(), "scenes": len(records)}, indent=1).encode())
    log.info("world complete at %s: %d train, %d test scenes", root, len(train), len(test))


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description="Generate the synthetic world.")
    p.add_argument("--root", default="data/world")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a WorldConfig field")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import yaml

    values = {}
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise WorldConfigError(f"--set {item!r} is not key=value")
        values[key] = yaml.safe_load(raw)
    return generate(WorldConfig.from_dict(values), args.root, args.workers)


if __name__ == "__main__":
    main()
