"""`pip install .` ships what the library reads beside its packages: an installed
model must find its named sizes and the datasets their label spaces."""

from fnmatch import fnmatch
from pathlib import Path

import pytest
from PIL import Image

from common.label_space import DEFAULT_PATH
from model.config import SIZES_FILE

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parent.parent
# Run from a checkout only: the tests, and the sandbox whose recipes are in configs/.
REPO_ONLY = {"tests", "sandbox"}


@pytest.fixture(scope="module")
def setuptools_cfg():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_library_package_is_installed(setuptools_cfg):
    tops = [d for d in ROOT.iterdir() if (d / "__init__.py").is_file() and d.name not in REPO_ONLY]
    found = {".".join(p.parent.relative_to(ROOT).parts) for top in tops for p in top.rglob("__init__.py")}
    assert {"common", "model", "dataset", "experts", "helpers"} <= found
    assert found <= set(setuptools_cfg["packages"])


@pytest.mark.parametrize("path", [SIZES_FILE, *sorted(DEFAULT_PATH.iterdir())], ids=lambda p: p.name)
def test_data_files_read_beside_a_package_ship_with_it(setuptools_cfg, path):
    package = ".".join(path.parent.relative_to(ROOT).parts)
    assert package in setuptools_cfg["packages"]
    assert path.name in setuptools_cfg["package-data"][package]


SAMPLES = ROOT / "helpers" / "images"


def test_sample_photos_are_small_credited_and_shipped(setuptools_cfg):
    photos = sorted(p for p in SAMPLES.iterdir() if p.name != "README.md")
    credits = (SAMPLES / "README.md").read_text(encoding="utf-8")
    assert 3 <= len(photos) <= 5 and sum(p.stat().st_size for p in photos) < 600_000
    assert "helpers.images" in setuptools_cfg["packages"]
    shipped = setuptools_cfg["package-data"]["helpers.images"]
    assert "README.md" in shipped
    for photo in photos:
        with Image.open(photo) as img:
            assert img.format == "JPEG" and max(img.size) <= 640, photo.name
        assert f"`{photo.name}`" in credits
        assert any(fnmatch(photo.name, pattern) for pattern in shipped), photo.name
