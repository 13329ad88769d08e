"""The web demo in a real browser: `python -m infer.app` on loopback, driven by headless Chromium
(Debian's chromium + chromium-driver, selenium): upload an image, type an instruction, press Edit,
and the edited image that comes back has the input's size.

Skipped, with the reason, where chromium, chromedriver, selenium or gradio is missing (.ci/run
installs them). Set EDITMGT_DEMO_SCREENSHOT=PATH to keep the page's screenshot (the README's)."""

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _missing() -> str | None:
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "chromium / chromedriver not installed (apt-get install chromium chromium-driver)"
    for module in ("selenium", "gradio"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} not installed (pip install {module})"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_missing() is not None, reason=str(_missing()))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO,
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "infer.app", "--host", "127.0.0.1", "--port", str(port),
                                 "--max-batch-size", "2"], cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 900                     # loading and the warm-up compile come first
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"infer.app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"infer.app did not answer on {url}:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500",
                "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
                "--metrics-recording-only", "--no-proxy-server",
                # names resolve to nothing but loopback: the page can reach only the app
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE localhost"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def _image_bytes(driver, img) -> bytes:
    src = img.get_attribute("src")
    if src.startswith("data:"):
        return base64.b64decode(src.split(",", 1)[1])
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(src, timeout=30) as r:
        return r.read()


def test_upload_edit_and_the_result_has_the_input_size(app_url, browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    # a non-square input (150x100) so that a size mix-up shows
    src = np.asarray(Image.open(os.path.join(REPO, "examples", "shapes.png")).convert("RGB").resize((150, 100)))
    path = tmp_path / "input.png"
    Image.fromarray(src).save(path)

    browser.get(app_url)
    wait = WebDriverWait(browser, 120)
    upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]")))
    upload.send_keys(str(path))
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image img")))
    box = browser.find_element(By.CSS_SELECTOR, "#instruction textarea")
    box.send_keys("paint the orange circle at the top cyan")
    browser.find_element(By.CSS_SELECTOR, "#edit").click()
    img = WebDriverWait(browser, 900).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, "#edited img")))
    WebDriverWait(browser, 60).until(lambda d: "x100" in d.find_element(By.CSS_SELECTOR, "#info textarea")
                                     .get_attribute("value"))
    info = browser.find_element(By.CSS_SELECTOR, "#info textarea").get_attribute("value")
    edited = Image.open(io.BytesIO(_image_bytes(browser, img)))
    assert edited.size == (150, 100), (edited.size, info)
    assert info.startswith("150x100")
    overlay = browser.find_element(By.CSS_SELECTOR, "#overlay img")
    assert Image.open(io.BytesIO(_image_bytes(browser, overlay))).size == (150, 100)
    time.sleep(1)
    shot = tmp_path / "demo.png"
    browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] > 0
    keep = os.environ.get("EDITMGT_DEMO_SCREENSHOT")
    if keep:
        shutil.copy2(shot, keep)
