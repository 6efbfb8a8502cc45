"""The clerk's page in a real headless Chromium, against a real uvicorn server.

A meter in SoftHSM2 prints real labels; the clerk drops them on the page,
checks them (which records nothing), accepts one with the counter's station
key, and sees what to do when something goes wrong. A hostile page on another
origin tries to record a piece behind the clerk's back and must fail.

One Chromium serves the whole module (it is the slow part); every test gets
its own meter, server and origin, so no page state (sessionStorage) leaks
from one test into the next.
"""

from __future__ import annotations

import base64
import html
import http.client
import json
import os
import re
import socket
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from PIL import Image
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meter.cli import workflows
from meter.cli.home import Home
from meter.indicium import RateCategory, decode
from meter.label import decode_image, render_label
from meter.postoffice.service import ServiceConfig, create_app
from meter.postoffice.stations import StationRegistry
from meter.psd import IssueRequest
from tests import _direct as direct
from tests.conftest import require_service

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
CHECKING = "checking\u2026"
WAIT_S = 30

pytestmark = [pytest.mark.browser, pytest.mark.softhsm]


# --- the server, as the counter would run it ----------------------------------------------


@dataclass
class Seen:
    """One request as it reached the server, and the status it was answered with."""

    method: str
    path: str
    origin: str | None
    status: int | None = None


class RequestLog:
    """Wraps the real application and notes every HTTP request and its answer's status.

    It changes nothing; it lets a test prove that a hostile page's requests did
    reach the server (so "nothing was recorded" is not just "nothing arrived").
    """

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._lock = threading.Lock()
        self._seen: list[Seen] = []

    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        origin = headers.get(b"origin")
        entry = Seen(scope["method"], scope["path"], origin.decode() if origin else None)
        with self._lock:
            self._seen.append(entry)

        async def noted(message: Message) -> None:
            if message["type"] == "http.response.start":
                entry.status = message["status"]
            await send(message)

        await self._app(scope, receive, noted)


@dataclass
class Served:
    """A running uvicorn server: where it is, what reached it, how to stop it."""

    url: str
    log: RequestLog
    stop: Callable[[], None]
    stations: StationRegistry
    keys: dict[str, str] = field(default_factory=dict)


def run_uvicorn(app: ASGIApp) -> tuple[str, Callable[[], None]]:
    """The app served on a free loopback port in a thread; (its URL, a function to stop it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here, so no other process can take the port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(400):
        if server.started or not thread.is_alive():
            break
        threading.Event().wait(0.025)
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            server.should_exit = True
            thread.join(timeout=10)
            sock.close()

    if not server.started:
        stop()
        raise AssertionError("uvicorn did not start")
    return f"http://127.0.0.1:{port}/", stop


def start_server(home: Home, tmp_path: Path, **limits: Any) -> Served:
    """The service on the home's certificates, with a key for station counter-1 and one
    for an auditor; `limits` are further ServiceConfig fields."""
    stations = StationRegistry(tmp_path / "postoffice" / "stations.json")
    keys = {
        "counter-1": stations.add("counter-1", role="station"),
        "auditor": stations.add("books", role="auditor"),
    }
    app = create_app(
        ServiceConfig(
            cert_dir=home.certs,
            store=tmp_path / "postoffice" / "replay",
            ledger=tmp_path / "postoffice" / "registers.sqlite",
            stations=stations.path,
            allowed_hosts=("127.0.0.1", "localhost"),
            **limits,
        )
    )
    log = RequestLog(app)
    url, stop = run_uvicorn(log)
    return Served(url, log, stop, stations, keys)


@pytest.fixture
def server(provisioned: Home, tmp_path: Path) -> Iterator[Served]:
    served = start_server(provisioned, tmp_path)
    try:
        yield served
    finally:
        served.stop()


# --- the browser ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> Iterator[WebDriver]:
    require_service(
        CHROMIUM.exists() and CHROMEDRIVER.exists(),
        f"Debian chromium ({CHROMIUM}) and chromium-driver ({CHROMEDRIVER})",
    )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # The console, read by the tests: no Content-Security-Policy violation, no key.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,1600"):
            options.add_argument(flag)
        os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
        try:
            yield driver
        finally:
            driver.quit()


@pytest.fixture
def browser(chromium: WebDriver) -> Iterator[WebDriver]:
    """The module's Chromium on a blank page, its console emptied; checked for CSP faults."""
    chromium.get("about:blank")
    console(chromium)  # reading empties it
    yield chromium
    blocked = [message for message in console(chromium) if "Content Security" in message]
    assert not blocked, f"the page broke its own Content-Security-Policy: {blocked}"


def console(driver: WebDriver) -> list[str]:
    """The browser console's messages since the last call (reading empties it)."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [str(entry["message"]) for entry in entries]


def open_page(driver: WebDriver, served: Served) -> None:
    driver.get(served.url)
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "verdict").text)


def text(driver: WebDriver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def shown(driver: WebDriver, element_id: str) -> bool:
    return driver.find_element(By.ID, element_id).is_displayed()


def painted_count(driver: WebDriver) -> int:
    return int(driver.find_element(By.ID, "result").get_attribute("data-count") or "0")


def wait_painted(driver: WebDriver, before: int) -> str:
    """Wait until an answer newer than `before` is on the page; the verdict word."""
    WebDriverWait(driver, WAIT_S).until(lambda d: painted_count(d) > before)
    return text(driver, "verdict")


def choose_file(driver: WebDriver, path: Path) -> str:
    """The clerk picks the label with the file chooser; the verdict word once it paints."""
    before = painted_count(driver)
    driver.find_element(By.ID, "file").send_keys(str(path))
    return wait_painted(driver, before)


def check_hex(driver: WebDriver, hex_text: str) -> str:
    before = painted_count(driver)
    box = driver.find_element(By.ID, "hex")
    box.clear()
    box.send_keys(hex_text)
    driver.find_element(By.ID, "check-hex").click()
    return wait_painted(driver, before)


# What the page shows, read in the same script turn as the drop, before any answer can
# arrive: what the clerk sees "at once".
SNAPSHOT_JS = """
const $ = (id) => document.getElementById(id);
return {
  verdict: $("verdict").textContent, advice: $("advice").textContent,
  reason: $("reason").textContent, queue: $("queue").textContent,
  facts_hidden: $("facts").hidden, fields_hidden: $("fields").hidden,
  accept_hidden: $("accept").hidden, caption: $("preview-caption").textContent,
  picture: $("label-preview").getAttribute("src") || "", preview_hidden: $("preview").hidden,
  state: $("result").dataset.state
};
"""

DROP_JS = """
const [drops] = arguments;
const zone = document.getElementById("drop-zone");
for (const files of drops) {
  const transfer = new DataTransfer();
  for (const f of files) {
    const bytes = Uint8Array.from(atob(f.data), (c) => c.charCodeAt(0));
    transfer.items.add(new File([bytes], f.name, {type: "image/png"}));
  }
  zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
}
"""


def drop(driver: WebDriver, *drops: list[Path]) -> dict[str, Any]:
    """Drop label files on the drop zone as a real drag would (one drop per list, in
    order, in one script turn); the page as it stands right after the last drop."""
    payload = [
        [{"name": p.name, "data": base64.b64encode(p.read_bytes()).decode()} for p in files]
        for files in drops
    ]
    snapshot: dict[str, Any] = driver.execute_script(DROP_JS + SNAPSHOT_JS, payload)
    return snapshot


# Holds the answers of /v1/check inside the page until the test releases them: the request
# really reaches the server and its answer really arrives (counted in `arrived`), but the
# page's code does not see it. A slow server, made deterministic.
HOLD_CHECKS_JS = """
const real = window.fetch.bind(window);
window.__hold = {held: [], arrived: 0};
window.fetch = (url, init) => {
  const answer = real(url, init);
  if (!String(url).includes("/v1/check")) { return answer; }
  answer.then(() => { window.__hold.arrived += 1; }, () => { window.__hold.arrived += 1; });
  return new Promise((resolve, reject) => {
    window.__hold.held.push(() => answer.then(resolve, reject));
  });
};
window.__release = () => { for (const go of window.__hold.held.splice(0)) { go(); } };
"""


# --- labels ----------------------------------------------------------------------------------


def issue_label(home: Home, credit: bool = True) -> Path:
    if credit:
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
    data = bytearray(decode_image(genuine))
    data[70] ^= 0x01  # inside the signed part (address digest): the signature no longer fits
    info = workflows.label_info(decode(bytes(data)), ADDRESS)
    out.write_bytes(render_label(bytes(data), info).png)
    return out


def blank_picture(out: Path) -> Path:
    """A real PNG with no barcode on it: what a scanner gives when the label is upside down."""
    Image.new("L", (600, 400), 255).save(out)
    return out


# --- the tests -------------------------------------------------------------------------------


def test_checking_records_nothing_and_shows_what_the_indicium_says(
    provisioned: Home, server: Served, browser: WebDriver, tmp_path: Path
) -> None:
    genuine = issue_label(provisioned)
    forged = altered_label(genuine, tmp_path / "forged.png")
    open_page(browser, server)
    assert text(browser, "verdict") == "\u2014"

    assert choose_file(browser, genuine) == "VALID"
    assert text(browser, "reason").startswith("every check passed")
    assert text(browser, "field-postage") == "$0.730"
    assert text(browser, "field-origin") == "94043"
    assert text(browser, "field-destination").startswith("62704-1234")
    preview = browser.find_element(By.ID, "label-preview")
    assert preview.is_displayed() and (preview.get_attribute("src") or "").startswith("blob:")
    # Looking is not accepting: the same label checked again is still VALID.
    assert choose_file(browser, genuine) == "VALID"
    assert "postage is good" not in browser.find_element(By.TAG_NAME, "body").text.lower()

    assert choose_file(browser, forged) == "FORGED"
    assert "signature does not verify" in text(browser, "reason")
    assert "do not accept" in text(browser, "advice")
    assert not shown(browser, "accept")


def test_a_new_label_clears_the_old_verdict_at_once(
    provisioned: Home, server: Served, browser: WebDriver
) -> None:
    first, second = issue_label(provisioned), issue_label(provisioned)
    open_page(browser, server)
    assert choose_file(browser, first) == "VALID"
    old_picture = browser.find_element(By.ID, "label-preview").get_attribute("src")
    assert shown(browser, "facts") and shown(browser, "accept")

    browser.execute_script(HOLD_CHECKS_JS)
    before = painted_count(browser)
    at_once = drop(browser, [second])
    # Nothing of the first piece's verdict is left under the second label's picture.
    assert at_once["verdict"] == CHECKING and at_once["state"] == "checking"
    assert "Check that the postage" not in at_once["advice"] and at_once["reason"] == ""
    assert at_once["facts_hidden"] and at_once["fields_hidden"] and at_once["accept_hidden"]
    assert at_once["caption"] == f"Label: {second.name}" and not at_once["preview_hidden"]
    assert at_once["picture"].startswith("blob:") and at_once["picture"] != old_picture

    # The server's answer has arrived but is held: the page still says it is checking.
    WebDriverWait(browser, WAIT_S).until(
        lambda d: d.execute_script("return window.__hold.arrived") == 1
    )
    still = browser.execute_script(SNAPSHOT_JS)
    assert still["verdict"] == CHECKING and still["facts_hidden"] and still["accept_hidden"]
    assert painted_count(browser) == before

    browser.execute_script("window.__release()")
    assert wait_painted(browser, before) == "VALID"
    assert text(browser, "field-sequence") == "2"  # the second label's verdict, not the first's
    assert text(browser, "preview-caption") == f"Label: {second.name}"


def test_labels_dropped_while_busy_wait_their_turn(
    provisioned: Home, server: Served, browser: WebDriver
) -> None:
    first, second, third = (issue_label(provisioned) for _ in range(3))
    open_page(browser, server)
    before = painted_count(browser)
    # Two drops in one turn: the second arrives while the first is being checked. The
    # third comes in the same drop as the second (two files dragged at once).
    at_once = drop(browser, [first], [second, third])
    assert at_once["verdict"] == CHECKING and at_once["caption"] == f"Label: {first.name}"
    assert at_once["queue"] == f"2 waiting: {second.name}, {third.name}"

    assert wait_painted(browser, before) == "VALID"
    assert text(browser, "field-sequence") == "1"
    # The first verdict stays until the clerk moves on: it is not swept away by the queue.
    assert text(browser, "queue").startswith("2 waiting")
    assert text(browser, "next") == "Check next label (2 waiting)"

    for sequence, label in (("2", second), ("3", third)):
        before = painted_count(browser)
        browser.find_element(By.ID, "next").send_keys(Keys.ENTER)  # keyboard, as a clerk may
        assert wait_painted(browser, before) == "VALID"
        assert text(browser, "field-sequence") == sequence
        assert text(browser, "preview-caption") == f"Label: {label.name}"
    assert not shown(browser, "queue") and not shown(browser, "next")


def test_the_clerk_accepts_a_piece_with_the_station_key(
    provisioned: Home, server: Served, browser: WebDriver
) -> None:
    label = issue_label(provisioned)
    key = server.keys["counter-1"]
    open_page(browser, server)
    assert shown(browser, "station-key")
    assert "No station key" in text(browser, "station-status")

    assert choose_file(browser, label) == "VALID"
    assert text(browser, "fact-postage") == "$0.730"
    assert text(browser, "fact-rate") == "First-Class Mail letter"
    assert text(browser, "fact-destination") == "62704-1234, delivery point 23"
    assert (
        "Check that the postage $0.730 pays for a First-Class Mail letter to 62704 "
        "before accepting" in text(browser, "advice")
    )

    # Without a key, Accept asks for it and records nothing.
    browser.find_element(By.ID, "accept").click()
    assert "station key" in text(browser, "advice")
    assert browser.switch_to.active_element.get_attribute("id") == "station-key"

    def enter_key(value: str) -> str:
        field_ = browser.find_element(By.ID, "station-key")
        field_.send_keys(value, Keys.ENTER)
        WebDriverWait(browser, WAIT_S).until(
            lambda d: "Checking the key" not in text(d, "station-message")
        )
        return text(browser, "station-message")

    assert "enter this counter's station key" in enter_key("pos1_00000000_" + "A" * 43)
    assert "not a counter's" in enter_key(server.keys["auditor"])
    assert enter_key(key) == ""
    assert text(browser, "station-status") == "Station: counter-1"
    assert not shown(browser, "station-panel")
    # The key is kept for this tab only, and nowhere in the page after it was entered.
    assert browser.execute_script("return sessionStorage.getItem('postoffice.stationKey')") == key
    assert browser.execute_script("return localStorage.length + document.cookie.length") == 0
    assert key not in browser.page_source
    assert browser.execute_script("return document.getElementById('station-key').value") == ""

    # Focus is back on Accept; the clerk presses Enter.
    assert browser.switch_to.active_element.get_attribute("id") == "accept"
    before = painted_count(browser)
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    assert wait_painted(browser, before) == "ACCEPTED"
    assert text(browser, "advice").startswith("Accepted at counter-1, 20")
    accepts = [s for s in server.log.seen() if s.path == "/v1/cancel"]
    assert [s.status for s in accepts] == [200], "exactly one cancel, when Accept was pressed"

    assert choose_file(browser, label) == "DUPLICATE"
    assert re.search(r"First accepted 20\S+ \S+ at counter-1", text(browser, "advice"))
    assert "do not accept" in text(browser, "advice") and not shown(browser, "accept")

    # A reload keeps the station (the same tab); "Change station" forgets the key.
    open_page(browser, server)
    WebDriverWait(browser, WAIT_S).until(
        lambda d: text(d, "station-status") == "Station: counter-1"
    )
    browser.find_element(By.ID, "change-station").click()
    assert browser.execute_script("return sessionStorage.length") == 0
    assert shown(browser, "station-key")
    assert all(key not in message for message in console(browser))


def test_a_withdrawn_key_is_asked_for_again_and_records_nothing(
    provisioned: Home, server: Served, browser: WebDriver
) -> None:
    label = issue_label(provisioned)
    open_page(browser, server)
    browser.find_element(By.ID, "station-key").send_keys(server.keys["counter-1"], Keys.ENTER)
    WebDriverWait(browser, WAIT_S).until(
        lambda d: text(d, "station-status") == "Station: counter-1"
    )
    assert choose_file(browser, label) == "VALID"

    server.stations.revoke("counter-1")
    before = painted_count(browser)
    browser.find_element(By.ID, "accept").click()
    wait_painted(browser, before)
    assert "enter this counter's station key" in text(browser, "advice")
    assert "nothing was recorded" in text(browser, "advice")
    assert shown(browser, "station-key") and shown(browser, "accept")
    assert browser.execute_script("return sessionStorage.length") == 0
    assert choose_file(browser, label) == "VALID"  # still not accepted anywhere


def test_a_piece_accepted_elsewhere_meanwhile_is_shown_duplicate(
    provisioned: Home, server: Served, browser: WebDriver
) -> None:
    label = issue_label(provisioned)
    open_page(browser, server)
    browser.find_element(By.ID, "station-key").send_keys(server.keys["counter-1"], Keys.ENTER)
    WebDriverWait(browser, WAIT_S).until(
        lambda d: text(d, "station-status") == "Station: counter-1"
    )
    assert choose_file(browser, label) == "VALID"

    # While the clerk compares the postage, the sorting machine at counter-2 accepts it.
    other_key = server.stations.add("counter-2", role="station")
    parts = urllib.parse.urlsplit(server.url)
    assert parts.hostname is not None and parts.port is not None
    machine = http.client.HTTPConnection(parts.hostname, parts.port, timeout=WAIT_S)
    body = json.dumps({"hex": decode_image(label).hex()})
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {other_key}"}
    machine.request("POST", "/v1/cancel", body, headers)
    answer = json.loads(machine.getresponse().read())
    machine.close()
    assert (answer["verdict"], answer["recorded"]) == ("VALID", True)

    before = painted_count(browser)
    browser.find_element(By.ID, "accept").click()
    assert wait_painted(browser, before) == "DUPLICATE"
    assert re.search(r"First accepted 20\S+ \S+ at counter-2\.", text(browser, "advice"))
    assert not shown(browser, "accept") and not shown(browser, "facts")


# The first answer of /v1/cancel is lost after the server has recorded the piece, as when
# the cable is pulled at the wrong moment: the page gets the network error fetch gives.
LOSE_FIRST_ACCEPT_ANSWER_JS = """
const real = window.fetch.bind(window);
window.__lost = 0;
window.fetch = async (url, init) => {
  const answer = await real(url, init);
  if (String(url).includes("/v1/cancel") && window.__lost === 0) {
    window.__lost = 1;
    await answer.text();
    throw new TypeError("Failed to fetch");
  }
  return answer;
};
"""


def test_an_accept_whose_answer_was_lost_is_safe_to_press_again(
    provisioned: Home, server: Served, browser: WebDriver
) -> None:
    label = issue_label(provisioned)
    open_page(browser, server)
    browser.find_element(By.ID, "station-key").send_keys(server.keys["counter-1"], Keys.ENTER)
    WebDriverWait(browser, WAIT_S).until(
        lambda d: text(d, "station-status") == "Station: counter-1"
    )
    assert choose_file(browser, label) == "VALID"
    browser.execute_script(LOSE_FIRST_ACCEPT_ANSWER_JS)

    before = painted_count(browser)
    browser.find_element(By.ID, "accept").click()
    wait_painted(browser, before)
    assert "may or may not be recorded" in text(browser, "advice")
    assert text(browser, "verdict") == "VALID" and shown(browser, "accept")

    before = painted_count(browser)
    browser.find_element(By.ID, "accept").click()
    assert wait_painted(browser, before) == "ACCEPTED"
    assert "Accepted at counter-1" in text(browser, "advice")
    assert "earlier press was recorded" in text(browser, "advice")
    statuses = [s.status for s in server.log.seen() if s.path == "/v1/cancel"]
    assert statuses == [200, 200], "the second press asked, and the office said DUPLICATE"


def test_another_site_cannot_record_a_piece(
    provisioned: Home, server: Served, browser: WebDriver
) -> None:
    label = issue_label(provisioned)
    indicium_hex = decode_image(label).hex()
    target = server.url.rstrip("/")
    hostile = hostile_page(target, indicium_hex, label.read_bytes())
    attempts = 11  # the requests hostile_page sends: 4 forms, 7 fetches

    with serve_page(hostile) as hostile_url:
        assert hostile_url.startswith("http://localhost:") and not target.startswith(
            "http://localhost"
        )
        browser.get(hostile_url)

        def arrived(_: WebDriver) -> list[Seen]:
            return [s for s in server.log.seen() if s.origin and "localhost" in s.origin]

        WebDriverWait(browser, WAIT_S).until(lambda d: len(arrived(d)) >= attempts)
        WebDriverWait(browser, WAIT_S).until(
            lambda d: all(s.status is not None for s in arrived(d))
        )
        hits = arrived(browser)
        # The hostile page's own console (its framed answers refused by frame-ancestors)
        # is not the clerk page's: read it away before the fixture looks for CSP faults.
        console(browser)
    assert {s.path for s in hits} == {"/v1/cancel", "/v1/cancel-batch", "/v1/verify"}
    # Refused as cross-origin before any route looked at the body.
    assert all(s.status == 403 for s in hits), [(s.method, s.path, s.status) for s in hits]

    open_page(browser, server)
    assert check_hex(browser, indicium_hex) == "VALID", text(browser, "advice")


def test_errors_say_what_to_do_next(
    provisioned: Home, server: Served, browser: WebDriver, tmp_path: Path
) -> None:
    open_page(browser, server)
    assert choose_file(browser, blank_picture(tmp_path / "upside-down.png")) == "NOT CHECKED"
    assert text(browser, "advice").startswith("Rescan or photograph the label again")
    assert text(browser, "reason")  # the server's own words, beside the step
    assert not shown(browser, "fields") and not shown(browser, "accept")

    assert check_hex(browser, "01zz") == "NOT CHECKED"
    assert text(browser, "advice").startswith("Check the hex")

    # An empty hex box sends nothing and leaves the verdict as it was.
    before = painted_count(browser)
    browser.find_element(By.ID, "hex").clear()
    browser.find_element(By.ID, "check-hex").click()
    assert "Type or paste" in text(browser, "hex-message")
    assert painted_count(browser) == before and text(browser, "verdict") == "NOT CHECKED"

    # The server goes away (a cable pulled): the page says so and what to do.
    label = issue_label(provisioned)
    server.stop()
    assert check_hex(browser, decode_image(label).hex()) == "SERVER NOT ANSWERING"
    assert "Check the network cable" in text(browser, "advice")
    assert "call support" in text(browser, "advice")
    assert shown(browser, "retry")


def test_a_busy_server_is_retried_and_the_page_says_so(
    provisioned: Home, browser: WebDriver, tmp_path: Path
) -> None:
    label = issue_label(provisioned)
    # One image at a time and no queue: one stalled upload makes the server busy.
    served = start_server(provisioned, tmp_path, image_workers=1, image_queue=0)
    try:
        open_page(browser, served)
        before = painted_count(browser)
        with image_place_held(served.url):
            drop(browser, [label])
            WebDriverWait(browser, WAIT_S).until(
                lambda d: d.find_element(By.ID, "result").get_attribute("data-state") == "retrying"
            )
            assert text(browser, "verdict") == "BUSY"
            assert re.search(r"The server is busy, retrying in \d+ s", text(browser, "advice"))
            assert "Nothing was recorded" in text(browser, "advice")
            assert painted_count(browser) == before
        # The place is free again: the page's own retry gets the verdict, with no click.
        assert wait_painted(browser, before) == "VALID"
        statuses = [s.status for s in served.log.seen() if s.path == "/v1/check" and s.origin]
        assert statuses[0] == 503 and statuses[-1] == 200
    finally:
        served.stop()


@contextmanager
def image_place_held(url: str) -> Iterator[None]:
    """A client that starts sending a label image and stalls, holding a decoding place."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    holder = socket.create_connection((parts.hostname, parts.port))
    try:
        holder.sendall(
            f"POST /v1/check HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Content-Type: image/png\r\nContent-Length: 1000000\r\n\r\n".encode()
            + b"\x89PNG\r\n"
        )
        # The holder has the place once another image is answered 503 (busy).
        for _ in range(400):
            probe = http.client.HTTPConnection(parts.hostname, parts.port, timeout=WAIT_S)
            probe.request("POST", "/v1/check", b"not a png", {"Content-Type": "image/png"})
            status = probe.getresponse().status
            probe.close()
            if status == 503:
                break
            time.sleep(0.025)
        else:
            raise AssertionError("the stalled upload never made the server busy")
        yield
    finally:
        holder.close()


# --- a page on another origin, as an attacker would host it -------------------------------


def hostile_page(target: str, indicium_hex: str, png: bytes) -> str:
    """Forms that post themselves and no-cors fetches, all at the counter's server."""
    json_name = html.escape(f'{{"hex": "{indicium_hex}", "pad": "', quote=True)
    forms = []
    for number, (path, enctype) in enumerate(
        (
            ("/v1/cancel", "application/x-www-form-urlencoded"),
            ("/v1/cancel", "text/plain"),
            ("/v1/verify", "application/x-www-form-urlencoded"),
            ("/v1/verify", "text/plain"),
        )
    ):
        # text/plain sends `name=value`: with this name and value the body is JSON.
        name, value = (json_name, '"}') if enctype == "text/plain" else ("hex", indicium_hex)
        forms.append(
            f'<iframe name="sink{number}"></iframe>'
            f'<form method="post" action="{target}{path}" enctype="{enctype}" '
            f'target="sink{number}"><input type="hidden" name="{name}" value="{value}"></form>'
        )
    picture = base64.b64encode(png).decode()
    return f"""<!DOCTYPE html><html><body>{"".join(forms)}
<script>
for (const form of document.forms) {{ form.submit(); }}
const target = {target!r}, hex = {indicium_hex!r};
const bytes = Uint8Array.from(atob("{picture}"), (c) => c.charCodeAt(0));
function upload() {{
  const form = new FormData();
  form.append("file", new Blob([bytes], {{type: "image/png"}}), "label.png");
  return form;
}}
const attempts = [
  ["/v1/cancel", JSON.stringify({{hex: hex}})],
  ["/v1/cancel", new URLSearchParams({{hex: hex}})],
  ["/v1/cancel", upload()],
  ["/v1/cancel-batch", JSON.stringify({{items: [hex]}})],
  ["/v1/verify", JSON.stringify({{hex: hex}})],
  ["/v1/verify", new URLSearchParams({{hex: hex}})],
  ["/v1/verify", upload()],
];
for (const [path, body] of attempts) {{
  fetch(target + path, {{method: "POST", mode: "no-cors", body: body}}).catch(() => null);
}}
</script></body></html>"""


class _OnePage(BaseHTTPRequestHandler):
    page = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.page)))
        self.end_headers()
        self.wfile.write(self.page)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: pytest shows the failures that matter


@contextmanager
def serve_page(page: str) -> Iterator[str]:
    """One HTML page on http://localhost:<free port>/: another origin than 127.0.0.1."""
    handler = type("HostilePage", (_OnePage,), {"page": page.encode()})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
