"""`pip install .` ships what the library reads beside its packages: an installed
model must find its named sizes and the datasets their label spaces."""

from pathlib import Path

import pytest

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
