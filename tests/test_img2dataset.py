"""The real img2dataset, fed a URL list like the official CC3M+SBU / CC12M ones,
downloads from a server on 127.0.0.1 into both layouts pre-training reads
(folders and webdataset tars); the pre-training dataset then streams every
good sample with its caption. A broken image and a missing URL are counted in
img2dataset's stats and never reach the loader."""

from __future__ import annotations

import functools
import http.server
import io
import json
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataset import create_dataset, create_loader

# (width, height, colour) of each good image; its caption names its index.
GOOD = [(48, 32, (200, 30, 30)), (32, 48, (30, 200, 30)), (40, 40, (30, 30, 200)), (64, 24, (200, 200, 30))]
GOOD += [(20, 60, (30, 200, 200)), (50, 30, (200, 30, 200)), (36, 36, (120, 120, 120))]
CAPTIONS = [f"a photo: number {i}." for i in range(len(GOOD))]
# pre_caption of each (first letter up, ':' and '.' stripped), written out by hand.
EXPECTED = sorted(f"A photo number {i}" for i in range(len(GOOD)))
SIZE = 64  # --image_size; the test model input is 32


@pytest.fixture(scope="module")
def offline_env():
    """No fetch may leave the machine: albumentations' update check and wandb
    are switched off, and any other HTTP(S) request outside 127.0.0.1 is sent
    to a closed local port (spawned img2dataset workers inherit this)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NO_ALBUMENTATIONS_UPDATE", "1")
        mp.setenv("WANDB_MODE", "disabled")
        for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            mp.setenv(var, "http://127.0.0.1:9")
        mp.setenv("no_proxy", "127.0.0.1")
        mp.setenv("NO_PROXY", "127.0.0.1")
        yield


@pytest.fixture(scope="module")
def url_rows(tmp_path_factory, offline_env):
    """A URL list (url, caption) served from 127.0.0.1: the good images, one
    file that is not an image, one URL that answers 404."""
    www = tmp_path_factory.mktemp("www")
    for i, (w, h, colour) in enumerate(GOOD):
        buf = io.BytesIO()
        Image.new("RGB", (w, h), colour).save(buf, "JPEG", quality=95)
        (www / f"good{i}.jpg").write_bytes(buf.getvalue())
    (www / "broken.jpg").write_bytes(b"<html>this is not an image</html>")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    rows = [{"url": f"{base}/good{i}.jpg", "caption": c} for i, c in enumerate(CAPTIONS)]
    rows.insert(2, {"url": f"{base}/broken.jpg", "caption": "a broken file"})
    rows.insert(5, {"url": f"{base}/missing.jpg", "caption": "a missing file"})
    yield rows
    server.shutdown()


def write_url_list(rows, path, input_format: str) -> None:
    """The list in the format img2dataset reads: the official lists are JSON
    arrays of {url, caption}; parquet is the other common form."""
    if input_format == "json":
        path.write_text(json.dumps(rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize(
    "output_format, input_format, name, root_key",
    [("files", "json", "cc3m_sgu", "cc3m_data_path"), ("webdataset", "parquet", "cc12m", "cc12m_data_path")],
)
def test_img2dataset_shards_stream_into_pretraining(tmp_path, url_rows, output_format, input_format, name, root_key):
    from img2dataset import download

    url_list = tmp_path / f"urls.{input_format}"
    write_url_list(url_rows, url_list, input_format)
    download(  # the README's command, scaled down
        url_list=str(url_list),
        input_format=input_format,
        url_col="url",
        caption_col="caption",
        output_folder=str(tmp_path / name),
        output_format=output_format,
        image_size=SIZE,
        resize_mode="border",
        encode_format="jpg",
        encode_quality=95,
        number_sample_per_shard=4,
        processes_count=1,
        thread_count=4,
        timeout=5,
        retries=0,
    )

    stats = [json.loads(p.read_text()) for p in sorted((tmp_path / name).glob("*_stats.json"))]
    assert len(stats) == 3  # 9 URLs, 4 per shard
    totals = {k: sum(s[k] for s in stats) for k in ("count", "successes", "failed_to_download", "failed_to_resize")}
    assert totals == {"count": 9, "successes": 7, "failed_to_download": 1, "failed_to_resize": 1}
    shards = sorted(p.name for p in (tmp_path / name).iterdir() if p.is_dir() or p.suffix == ".tar")
    assert shards == (
        ["00000", "00001", "00002"] if output_format == "files" else ["00000.tar", "00001.tar", "00002.tar"]
    )
    if output_format == "files":  # --image_size, border mode: the whole image in a SIZE square, padded white
        tall = Image.open(
            next(p for p in (tmp_path / name).rglob("*.txt") if p.read_text() == CAPTIONS[4]).with_suffix(".jpg")
        )
        assert tall.size == (SIZE, SIZE)
        assert min(tall.getpixel((2, SIZE // 2))) > 235 and tall.getpixel((SIZE // 2, SIZE // 2))[1] > 150

    config = {
        root_key: str(tmp_path),
        "label_path": None,
        "experts": ["none"],
        "image_resolution": 32,
        "datasets": [name],
        "seed": 0,
    }
    loader = create_loader(create_dataset("pretrain", config), 1, 0, train=True, max_bad_fraction=0.0)
    captions, shapes = [], set()
    for experts, batch_captions in loader:
        captions += batch_captions
        shapes.add(tuple(experts["rgb"].shape[1:]))
    assert sorted(captions) == EXPECTED
    assert shapes == {(3, 32, 32)} and loader.skipped == 0 and loader.seen == 7
