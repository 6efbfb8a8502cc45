"""The clerk's page in a real headless Chromium, against a real uvicorn server.

A meter in SoftHSM2 prints a label; the clerk uploads it (VALID), uploads it
again (DUPLICATE), then uploads a label whose indicium has one byte of its
signed part changed (FORGED).
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from conftest import require_service

from meter.cli import workflows
from meter.cli.home import Home
from meter.indicium import RateCategory, decode
from meter.label import render_label
from meter.postoffice.service import ServiceConfig, create_app
from meter.psd import IssueRequest
from tests import _direct as direct

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Without the background-networking flags Chromium's own connections are refused
# by the closed network and it may not start.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
ADDRESS = ["Jane Q. Public", "1234 Main St.", "Springfield, IL 62704"]

pytestmark = [pytest.mark.browser, pytest.mark.softhsm]


@pytest.fixture
def server(provisioned: Home, tmp_path: Path) -> Iterator[str]:
    """The service on the provisioned home's certificates, on a free loopback port."""
    app = create_app(
        ServiceConfig(
            cert_dir=provisioned.certs,
            store=tmp_path / "postoffice" / "replay",
            ledger=tmp_path / "postoffice" / "registers.sqlite",
        )
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here, so no other process can take the port
    port = sock.getsockname()[1]
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uvicorn_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(400):
            if uvicorn_server.started or not thread.is_alive():
                break
            threading.Event().wait(0.025)
        assert uvicorn_server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}/"
    finally:
        uvicorn_server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def browser() -> Iterator[object]:
    require_service(
        CHROMIUM.exists() and CHROMEDRIVER.exists(),
        f"Debian chromium ({CHROMIUM}) and chromium-driver ({CHROMEDRIVER})",
    )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,1600"):
            options.add_argument(flag)
        os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
        try:
            yield driver
        finally:
            driver.quit()


def issue_label(home: Home) -> Path:
    direct.credit(home, 10_000)
    request = IssueRequest(
        postage=730,
        rate_category=RateCategory.FIRST_CLASS_LETTER,
        origin_zip="94043",
        destination_zip="62704",
        destination_plus4="1234",
        delivery_point="23",
        address=ADDRESS,
    )
    return direct.issue_label(home, request)


def altered_label(genuine: Path, out: Path) -> Path:
    """The genuine label's indicium with one byte of the address digest changed, reprinted."""
    from meter.label import decode_image

    data = bytearray(decode_image(genuine))
    data[70] ^= 0x01  # inside the signed part (address digest): the signature no longer fits
    info = workflows.label_info(decode(bytes(data)), ADDRESS)
    out.write_bytes(render_label(bytes(data), info).png)
    return out


def upload(driver: object, path: Path) -> tuple[str, str, str]:
    """Choose the file on the page; wait for the answer; (verdict, reason, postage)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    assert hasattr(driver, "find_element")
    result = driver.find_element(By.ID, "result")
    before = int(result.get_attribute("data-count") or "0")
    driver.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(driver, 30).until(
        lambda d: int(d.find_element(By.ID, "result").get_attribute("data-count")) > before
    )
    return (
        driver.find_element(By.ID, "verdict").text,
        driver.find_element(By.ID, "reason").text,
        driver.find_element(By.ID, "field-postage").text,
    )


def test_clerk_sees_valid_then_duplicate_then_forged(
    provisioned: Home, server: str, browser: object, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    genuine = issue_label(provisioned)
    forged = altered_label(genuine, tmp_path / "forged.png")
    assert hasattr(browser, "get")
    browser.get(server)
    assert browser.find_element(By.ID, "verdict").text == "\u2014"

    verdict, reason, postage = upload(browser, genuine)
    assert (verdict, reason, postage) == ("VALID", "every check passed", "$0.730")
    preview = browser.find_element(By.ID, "label-preview")
    assert preview.is_displayed() and preview.get_attribute("src").startswith("blob:")
    assert browser.find_element(By.ID, "field-origin").text == "94043"
    assert browser.find_element(By.ID, "field-destination").text.startswith("62704-1234")

    verdict, reason, postage = upload(browser, genuine)
    assert verdict == "DUPLICATE" and "already accepted" in reason and postage == "$0.730"

    verdict, reason, _ = upload(browser, forged)
    assert verdict == "FORGED" and "signature does not verify" in reason


def test_clerk_can_paste_hex_and_sees_bad_input_explained(
    provisioned: Home, server: str, browser: object, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    genuine = issue_label(provisioned)
    from meter.label import decode_image

    assert hasattr(browser, "get")
    browser.get(server)
    browser.find_element(By.ID, "hex").send_keys(decode_image(genuine).hex())
    browser.find_element(By.ID, "verify-hex").click()
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.ID, "result").get_attribute("data-count") == "1"
    )
    assert browser.find_element(By.ID, "verdict").text == "VALID"
    assert browser.find_element(By.ID, "field-sequence").text == "1"
    assert not browser.find_element(By.ID, "preview").is_displayed()

    not_a_label = tmp_path / "notes.png"
    not_a_label.write_bytes(b"this is not an image")
    verdict, reason, _ = upload(browser, not_a_label)
    assert verdict == "NOT CHECKED" and "not an image file" in reason
    assert not browser.find_element(By.ID, "fields").is_displayed()
