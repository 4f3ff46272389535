"""Small real datasets on disk in the official layout, for the dataset tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.labels import Instances, Words, label_file
from common.modalities import EXPERTS

ALL_EXPERTS = ["depth", "normal", "seg_coco", "seg_ade", "edge", "obj_detection", "ocr_detection"]
SQUARE = (8, 12, 28, 32)  # left, top, right, bottom of the labelled square in a 48x40 image
SEG_CLASS = 5
DET_INSTANCE, DET_CLASS = 3, 17
OCR_WORD = 2


def square_image(w: int = 48, h: int = 40) -> Image.Image:
    """White square on dark grey: every photometric op keeps it the brightest
    region (and geometric ops fill black)."""
    x = np.full((h, w, 3), 64, np.uint8)
    l, t, r, b = SQUARE
    x[t:b, l:r] = 255
    return Image.fromarray(x)


def square_map(inside: int, outside: int, w: int = 48, h: int = 40, mode: str = "L") -> Image.Image:
    x = np.full((h, w), outside, np.uint8)
    l, t, r, b = SQUARE
    x[t:b, l:r] = inside
    if mode == "RGB":
        x = np.repeat(x[..., None], 3, axis=2)
    return Image.fromarray(x, mode)


def write_labels(label_path: Path, dataset: str, image: str, experts=ALL_EXPERTS) -> None:
    """Every expert marks the same square as the image, written by its label kind."""
    for name in experts:
        path = label_file(label_path, name, dataset, image)
        if name in ("depth", "edge"):
            label = square_map(255, 0)
        elif name == "normal":
            label = square_map(200, 10, mode="RGB")
        elif name in ("seg_coco", "seg_ade"):
            label = np.asarray(square_map(SEG_CLASS, 255))
        elif name == "obj_detection":
            # instance 9 is named but absent from the PNG: harmless
            label = Instances(np.asarray(square_map(DET_INSTANCE, 255)), {DET_INSTANCE: DET_CLASS, 9: 1})
        elif name == "ocr_detection":
            feature = torch.linspace(-1, 1, 64)
            label = Words(np.asarray(square_map(OCR_WORD, 255)), {OCR_WORD: {"text": "stop", "features": feature}})
        EXPERTS[name].kind.write(path, label)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def coco_world(root: Path, n: int = 4, experts=ALL_EXPERTS) -> dict:
    """COCO captions + VQAv2 + VG QA + NoCaps lists with images and labels; returns a config."""
    data, labels = root / "data", root / "labels"
    images = []
    for i in range(n):
        name = f"train2014/COCO_train2014_{i:012d}.jpg"
        path = data / "vqav2" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        square_image().save(path, quality=95)
        write_labels(labels, "vqav2", name, experts)
        images.append(name)
    vg_name = "VG_100K/1.jpg"
    (data / "vg" / "VG_100K").mkdir(parents=True)
    square_image().save(data / "vg" / vg_name)
    write_labels(labels, "vg", vg_name, experts)
    (data / "nocaps" / "val").mkdir(parents=True)
    square_image().save(data / "nocaps" / "val" / "0.jpg")
    write_labels(labels, "nocaps", "val/0.jpg", experts)

    captions = [{"image": im, "caption": f"A red square number {i}."} for i, im in enumerate(images)]
    write_json(data / "coco_karpathy_train.json", captions)
    write_json(data / "coco_karpathy_test.json", [{"image": im} for im in images[:2]])
    write_json(data / "nocaps_val.json", [{"image": "val/0.jpg", "img_id": 0}])
    write_json(
        data / "vqav2_train_val.json",
        [
            {
                "image": images[0],
                "question": "what colour is the square",
                "answer": ["red", "crimson"],
                "weight": [0.7, 0.3],
                "question_id": 1,
                "dataset": "vqa",
            },
            {
                "image": images[1],
                "question": "is it a square?",
                "answer": ["yes"],
                "weight": [1.0],
                "question_id": 2,
                "dataset": "vqa",
            },
        ],
    )
    vg = [{"image": vg_name, "question": "What shape?", "answer": ["square"], "dataset": "vg"}]
    write_json(data / "vg_qa.json", vg)
    test = [{"image": images[0], "question": "what colour", "question_id": 7, "dataset": "vqa"}]
    write_json(data / "vqav2_test.json", test)
    write_json(data / "answer_list.json", ["red", "blue", "square"])
    return {
        "dataset": "coco",
        "data_path": str(data),
        "label_path": str(labels),
        "experts": list(experts),
        "image_resolution": 64,
        "prefix": "A picture of",
        "datasets": ["vqav2", "vg"],
    }


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    square_image().save(buf, "JPEG")
    return buf.getvalue()


def img2dataset_folders(root: Path, name: str, sizes: list[int], labels: Path | None = None) -> None:
    """img2dataset folder output: <name>/00000/000000001.jpg + .txt (+ .json), shard s holding sizes[s] samples."""
    for s, size in enumerate(sizes):
        folder = root / name / f"{s:05d}"
        folder.mkdir(parents=True)
        for i in range(size):
            key = f"{s:05d}{i:04d}"
            (folder / f"{key}.jpg").write_bytes(jpeg_bytes())
            (folder / f"{key}.txt").write_text(f"{name} caption {key}.\nsecond line ignored")
            (folder / f"{key}.json").write_text(json.dumps({"key": key}))
            if labels is not None:
                write_labels(labels, name, f"{s:05d}/{key}.jpg", ["depth"])


def write_tar(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    """A webdataset tar: members `<key>.<ext>`, in order."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def img2dataset_tars(root: Path, name: str, sizes: list[int], labels: Path | None = None, stats: bool = False) -> None:
    """img2dataset webdataset output: <name>/00000.tar holding 000000001.jpg/.txt/.json, shard s holding sizes[s]
    samples; with `stats` also the `00000_stats.json` img2dataset writes beside each shard."""
    (root / name).mkdir(parents=True)
    for s, size in enumerate(sizes):
        keys = [f"{s:05d}{i:04d}" for i in range(size)]
        samples = {k: {"jpg": jpeg_bytes(), "txt": f"{name} caption {k}".encode(), "json": b"{}"} for k in keys}
        write_tar(root / name / f"{s:05d}.tar", samples)
        if stats:
            counts = {"count": size + 1, "successes": size, "failed_to_download": 1, "failed_to_resize": 0}
            (root / name / f"{s:05d}_stats.json").write_text(json.dumps(counts))
        if labels is not None:
            for k in keys:
                write_labels(labels, name, f"{s:05d}/{k}.jpg", ["depth"])
