"""The page served at / in a real headless browser (Debian's chromium + chromedriver, Selenium)."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest
from test_serve import running

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM and DRIVER):
        pytest.fail("the page test needs chromium and chromedriver (make test installs them: apt-get install "
                    "chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def test_page_shows_the_stream_and_answers_a_question(tiny_adapter, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with running(tiny_adapter) as (base, _):
        stream_id = httpx.post(base + "/v1/streams", json={"source": "synthetic", "fps": 20, "chunk_frames": 4}).json()["id"]
        driver = browser()
        try:
            driver.get(base + "/")
            wait = WebDriverWait(driver, 30)
            wait.until(lambda d: stream_id in d.find_element(By.ID, "streams").text)
            wait.until(lambda d: "ingested" in d.find_element(By.ID, "status").text)
            status = driver.find_element(By.ID, "status").text
            assert "seen" in status and "allocated" in status and "peak memory" in status, status
            assert "NaN" not in status and "undefined" not in status, status
            bars = driver.find_elements(By.CSS_SELECTOR, "#layers div")
            assert len(bars) == tiny_adapter.num_layers
            driver.find_element(By.ID, "question").send_keys("What was said?")
            driver.find_element(By.CSS_SELECTOR, "#ask button").click()
            answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#answers .answer[data-done='1']"))
            assert answer.text.strip() and "TTFT" in answer.get_attribute("title")
            kept_width = driver.execute_script("return document.getElementById('kept').width")
            assert kept_width >= 4  # one column per frame seen
            time.sleep(0.2)
            driver.save_screenshot(str(tmp_path / "page.png"))
        finally:
            driver.quit()


def test_page_behind_an_api_key_shows_the_live_frame_once_the_key_is_typed(tmp_path):
    """Every data route checks the key, the live frame too: the page fetches it with the key
    (an <img src> could not send one) and lists the streams as soon as the key is typed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from tiny_llava_ov import tiny_llava_onevision

    from hermes_policy.models import load_adapter

    adapter = load_adapter(tiny_llava_onevision(tmp_path / "llava", layers=2), device="cpu")
    with running(adapter, budget=40, api_key="page-key") as (base, _):
        stream_id = httpx.post(base + "/v1/streams", headers={"Authorization": "Bearer page-key"},
                               json={"source": "synthetic", "fps": 10, "chunk_frames": 2}).json()["id"]
        assert httpx.get(f"{base}/v1/streams/{stream_id}/frame.jpg").status_code == 401
        driver = browser()
        try:
            driver.get(base + "/")
            wait = WebDriverWait(driver, 30)
            wait.until(lambda d: "API key" in d.find_element(By.ID, "message").text)  # refused without it
            key = driver.find_element(By.ID, "key")
            key.send_keys("page-key")
            driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
            wait.until(lambda d: stream_id in d.find_element(By.ID, "streams").text)
            wait.until(lambda d: d.execute_script("return document.getElementById('video').naturalWidth") > 0)
            assert driver.find_element(By.ID, "message").text == ""
        finally:
            driver.quit()
