"""Per-core generation speed of the synthetic world (target: >= 200 scenes/s
at 128 px), split into drawing, encoding and writing:

    python benchmarks/world.py [--scenes 256]

One process, one chunk at a time, into a temp folder (the data lists, label
spaces and tokenizer that `generate` writes once at the end are not timed).
`write ms` is the chunk's time minus drawing and encoding (an estimate: the
files, the JSON records and OCR sidecars). Writing is sensitive to the disk: while another job flushed gigabytes of
checkpoints, the same 128 px scenes came out at ~130 scenes/s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sandbox import world  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=256)
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 128, 224])
    args = p.parse_args(argv)
    rows = []
    for res in args.resolutions:
        cfg = world.WorldConfig(train_scenes=args.scenes - 1, test_scenes=1, resolution=res)
        t = time.perf_counter()
        scenes = [world.make_scene(cfg, i)[1] for i in range(args.scenes)]
        draw = time.perf_counter() - t
        t = time.perf_counter()
        for out in scenes:
            world._encode(out["rgb"], "JPEG", quality=cfg.jpeg_quality)
            for key in ("depth", "normal", "edge", "seg", "inst", "ocr"):
                world._encode(out[key], "PNG", compress_level=1)
        encode = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as d:
            world._check_root(Path(d), cfg)
            t = time.perf_counter()
            for chunk in range(-(-args.scenes // world.CHUNK)):
                world._write_chunk((cfg, Path(d), chunk))
            total = time.perf_counter() - t
        n = args.scenes
        rest = total - draw - encode  # files, records, OCR sidecars
        rows.append(
            {"px": res, "rate": n / total, "draw": 1e3 * draw / n, "encode": 1e3 * encode / n, "rest": 1e3 * rest / n}
        )
    print(f"\n{'px':>4} {'scenes/s/core':>13} {'draw ms':>8} {'encode ms':>9} {'write ms':>8}")
    for r in rows:
        print(f"{r['px']:>4} {r['rate']:>13.0f} {r['draw']:>8.2f} {r['encode']:>9.2f} {r['rest']:>8.2f}")
    return rows


if __name__ == "__main__":
    main()
