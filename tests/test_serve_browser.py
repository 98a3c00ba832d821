"""The console in a real headless Chromium (Debian's chromium + chromium-driver) against a real
serve, a real worker and real Redis: console errors, live updates, charts, retry, escaping."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serve_stack import HOSTILE, ROOT, Stack, models, no_leaked_processes, stack

__all__ = ["models", "no_leaked_processes", "stack"]  # fixtures, imported for this module

#: Loads here grow memory and burn CPU for about a second, so the charts have a shape.
WORKER_LOADER = "ramp"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
#: Screenshots land here (gitignored) for a person to look at after a run.
ARTEFACTS = ROOT / "tmp" / "artefacts"
#: Everything that would make Chromium reach the network or a GPU on its own.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
]

selenium = pytest.importorskip("selenium")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        "needs Debian's chromium and chromium-driver (.ci/run installs them)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import NoAlertPresentException, TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    """One headless Chromium for the module, with a fresh profile and its console log kept."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def signed_in(browser: webdriver.Chrome, stack: Stack, redis_url: str) -> webdriver.Chrome:
    """The browser holds a console session (signed in through the form)."""
    browser.get(stack.url + "/login")
    browser.find_element(By.NAME, "token").send_keys(stack.token)
    browser.find_element(By.CSS_SELECTOR, "form.login button").click()
    WebDriverWait(browser, 10).until(lambda d: d.current_url.rstrip("/") == stack.url)
    browser.get_log("browser")  # start each test with an empty console
    return browser


def _errors(browser: webdriver.Chrome) -> list[dict[str, object]]:
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def _shoot(browser: webdriver.Chrome, name: str) -> Path:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, max(900, min(int(height), 4000)))
    path = ARTEFACTS / f"{name}.png"
    browser.save_screenshot(str(path))
    browser.set_window_size(1280, 900)
    return path


def test_pages_load_without_console_errors(
    signed_in: webdriver.Chrome, stack: Stack, models: Path
) -> None:
    """Every console page loads with no error in the browser's console (CSP included)."""
    job_id = stack.finish(models / "small.safetensors")
    stack.finish(models / "broken.safetensors")
    for name, path in [
        ("overview", "/"),
        ("loads", "/loads"),
        ("load", f"/loads/{job_id}"),
        ("dead-letters", "/dead-letters"),
        ("failing-models", "/failing-models"),
        ("enqueue", "/enqueue"),
    ]:
        signed_in.get(stack.url + path)
        WebDriverWait(signed_in, 10).until(
            lambda d: d.execute_script("return document.readyState") == "complete"
        )
        assert signed_in.find_element(By.TAG_NAME, "h1").text
        _shoot(signed_in, name)
        assert _errors(signed_in) == [], path


def test_overview_updates_live_when_a_load_finishes(
    signed_in: webdriver.Chrome, stack: Stack, models: Path
) -> None:
    """The overview's count of ok loads goes up by itself, without a reload."""
    signed_in.get(stack.url + "/")
    cell = signed_in.find_element(By.CSS_SELECTOR, "[data-live='outcome-ok']")
    before = int(cell.text)
    signed_in.execute_script("window.__sameDocument = true")
    stack.finish(models / "small.safetensors")
    WebDriverWait(signed_in, 15).until(lambda d: int(cell.text) == before + 1)
    assert signed_in.execute_script("return window.__sameDocument === true")
    assert _errors(signed_in) == []


def test_load_page_draws_memory_and_cpu_charts(
    signed_in: webdriver.Chrome, stack: Stack, models: Path
) -> None:
    """A load's page draws its memory and CPU series with the limits across them."""
    job_id = stack.finish(models / "small.safetensors")
    signed_in.get(stack.url + f"/loads/{job_id}")
    for chart in ("chart-memory", "chart-cpu"):
        svg = signed_in.find_element(By.CSS_SELECTOR, f"svg.{chart}")
        assert svg.size["width"] > 300 and svg.size["height"] > 100
        points = svg.find_element(By.CSS_SELECTOR, "polyline.series").get_attribute("points")
        assert points is not None and len(points.split()) >= 3
        limit = svg.find_element(By.CSS_SELECTOR, "line.limit")  # a flat line: check its place
        assert 0 < float(limit.get_attribute("y1") or -1) < svg.size["height"]
        assert "limit" in svg.find_element(By.CSS_SELECTOR, "text.limit-label").text
    path = _shoot(signed_in, "load-charts")
    shutil.copyfile(path, ARTEFACTS / "console.png")
    assert _errors(signed_in) == []


def test_retry_from_the_console_reruns_a_dead_letter(
    signed_in: webdriver.Chrome, stack: Stack, models: Path
) -> None:
    """Retry on the dead-letters page enqueues the job again; its new run shows on its page."""
    failed = stack.finish(models / "broken.safetensors")
    signed_in.get(stack.url + "/dead-letters")
    signed_in.find_element(By.CSS_SELECTOR, "button.retry").click()
    WebDriverWait(signed_in, 10).until(lambda d: f"/loads/{failed}-r" in d.current_url)
    rerun = signed_in.current_url.rsplit("/", 1)[1]
    try:
        WebDriverWait(signed_in, 60).until(  # the page refreshes itself until the load ends
            lambda d: d.find_elements(By.ID, "outcome")
        )
    except TimeoutException:  # say where the rerun stands, and what the worker did
        with stack.api() as api:
            state = api.get(f"/v1/loads/{rerun}").text
        worker_log = (stack.log.parent / "worker.log").read_text()[-4000:]
        page = signed_in.find_element(By.TAG_NAME, "main").text
        raise AssertionError(f"{rerun}: {state}\npage: {page}\nworker: {worker_log}") from None
    assert signed_in.find_element(By.ID, "outcome").text == "invalid"
    with stack.api() as api:
        assert [x["job_id"] for x in api.get("/v1/dead-letters").json()] == [rerun]
    assert _errors(signed_in) == []


def test_injected_tensor_names_never_execute(
    signed_in: webdriver.Chrome, stack: Stack, models: Path
) -> None:
    """Tensor names holding script, attributes and control characters show as text, inert."""
    job_id = stack.finish(models / "hostile.safetensors")
    signed_in.get(stack.url + f"/loads/{job_id}")
    names = {e.text for e in signed_in.find_elements(By.CSS_SELECTOR, "td.tensor-name")}
    assert HOSTILE[0] in names and HOSTILE[1] in names
    assert signed_in.execute_script("return window.__pwned === undefined")
    with pytest.raises(NoAlertPresentException):
        signed_in.switch_to.alert.text  # noqa: B018
    _shoot(signed_in, "hostile")
    assert _errors(signed_in) == []


def test_console_without_a_session_goes_to_sign_in(browser: webdriver.Chrome, stack: Stack) -> None:
    """A browser with no session lands on the sign-in page, not on data."""
    browser.delete_all_cookies()
    browser.get(stack.url + "/dead-letters")
    assert browser.current_url == stack.url + "/login"
    assert httpx.get(stack.url + "/livez").status_code == 200
