"""demo_web.py in a real browser: the page started on 127.0.0.1 with a model saved
by this project and the edge expert's weights in the official format, driven by
headless Chromium (Debian's chromium + chromium-driver) through selenium: upload a
sample photo, press the button, wait for the caption and the label sheet.

The screenshot is kept under the test's tmp dir; with PRISMER_TEST_ARTIFACTS=1 it
is also copied to tests/artifacts/demo_web.png."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from model import PrismerCaption
from tests.conftest import tiny_size
from tests.expert_files import write_official

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "helpers" / "images" / "chelsea.jpg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page(tmp_path_factory, tokenizer):
    """The page's address while demo_web.py serves it; the process is ended afterwards, pass or fail."""
    root = tmp_path_factory.mktemp("demo_web")
    weights = root / "expert_weights"
    weights.mkdir()
    write_official("edge", weights)
    tokenizer.save_pretrained(root / "tokenizer")
    config = {"prismer_model": tiny_size(len(tokenizer)), "experts": ["edge"], "image_resolution": 64}
    PrismerCaption(config | {"pretrained": False, "tokenizer": str(root / "tokenizer")}).save_pretrained(root / "model")
    port = free_port()
    argv = ["--model", str(root / "model"), "--expert_weights", str(weights), "--port", str(port)]
    env = os.environ | {"GRADIO_TEMP_DIR": str(root / "gradio"), "CUDA_VISIBLE_DEVICES": ""}
    with open(root / "server.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "demo_web.py", *argv], cwd=ROOT, env=env, stdout=log, stderr=log)
        try:
            url = f"http://127.0.0.1:{port}/"
            deadline = time.monotonic() + 60
            while True:
                assert server.poll() is None, (root / "server.log").read_text()
                try:
                    with urllib.request.urlopen(url, timeout=2):
                        break
                except OSError:
                    assert time.monotonic() < deadline, "the page did not come up in 60 s"
                    time.sleep(0.5)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


@pytest.fixture
def browser():
    missing = [tool for tool in ("chromium", "chromedriver") if shutil.which(tool) is None]
    assert not missing, f"{missing} not found: the browser test needs Debian's chromium and chromium-driver (apt)"
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


def test_a_sample_photo_gets_a_caption_and_its_label_sheet(page, browser, tmp_path):
    browser.get(page)
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"))
    browser.find_element(By.CSS_SELECTOR, "#photo input[type=file]").send_keys(str(SAMPLE))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#photo img"))
    browser.find_element(By.CSS_SELECTOR, "#run").click()
    caption = browser.find_element(By.CSS_SELECTOR, "#caption textarea")
    try:
        wait.until(lambda d: caption.get_attribute("value").strip())
        sheet = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#sheet img"))[0]
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", sheet))
        # The sheet holds the photo and the edge label side by side: wider than high.
        width, height = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", sheet)
        assert width > height > 0
    finally:
        shot = tmp_path / "demo_web.png"
        browser.save_screenshot(str(shot))
        if os.environ.get("PRISMER_TEST_ARTIFACTS") == "1":
            (ROOT / "tests" / "artifacts").mkdir(exist_ok=True)
            shutil.copy(shot, ROOT / "tests" / "artifacts" / "demo_web.png")
