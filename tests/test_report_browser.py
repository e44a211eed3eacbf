"""leaderboard.html in headless Chromium: tables render, sorting and the suite filter work,
markup in a model name stays text, and the page makes no network request.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and
selenium (the ``test`` extra); skipped with the reason otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from pathrobust.reports.build import write_report
from test_report_fixtures import XSS, fixture_db

pytestmark = pytest.mark.browser

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
LOCAL_SCHEMES = ("file:", "data:", "about:", "chrome:", "chrome-error:")


def _skip_reason() -> str | None:
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[test]')"
    if CHROMIUM is None:
        return "no Chromium on PATH (apt-get install chromium chromium-driver; .ci/run does this)"
    if CHROMEDRIVER is None:
        return "no chromedriver on PATH (apt-get install chromium-driver; .ci/run does this)"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,2200"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-report")
    files = write_report(fixture_db(root / "results.sqlite", root / "runs"), root / "out")
    browser.get_log("performance")  # drop anything logged before the page
    browser.get(files.html.as_uri())
    return browser, files, root


def _column(driver, table_id: str, col: int) -> list[str]:
    return driver.execute_script(
        "var col = arguments[1];"
        "return Array.from(document.querySelectorAll('#' + arguments[0] + ' tbody tr'))"
        ".map(function (tr) { return tr.cells[col].textContent.trim(); });", table_id, col)


def _header(driver, table_id: str, label: str):
    from selenium.webdriver.common.by import By

    return next(th for th in driver.find_elements(By.CSS_SELECTOR, f"#{table_id} thead th") if th.text.strip() == label)


def test_tables_render_and_markup_stays_text(page):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    driver, _, _ = page
    assert driver.title == "pathrobust leaderboard"
    assert _column(driver, "table-plism", 1) == ["h0-mini", "h0-mini", "h0-mini", "efficientnet-lite0-imagenet", XSS,
                                                  "hed-histogram"]
    assert len(_column(driver, "published-plism", 0)) == 15
    assert driver.find_element(By.ID, "overall-table").is_displayed()
    assert driver.execute_script("return document.scripts.length") == 1
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 - the model name did not run as script
    widths = driver.execute_script("return Array.from(document.images).map(function (i) { return i.naturalWidth; })")
    assert len(widths) == 6 and all(w > 100 for w in widths)


def test_sorting_by_clicking_headers(page):
    driver, _, _ = page
    _header(driver, "table-plism", "Model").click()
    models = _column(driver, "table-plism", 1)
    assert models == sorted(models, key=str.lower)
    score = _header(driver, "table-plism", "Leaderboard")
    score.click()
    assert score.get_attribute("aria-sort") == "descending"
    assert _column(driver, "table-plism", 5) == ["0.5456", "0.5200", "0.5100", "0.2100", "0.1100", "—"]
    score.click()
    assert score.get_attribute("aria-sort") == "ascending"
    assert _column(driver, "table-plism", 5) == ["0.1100", "0.2100", "0.5100", "0.5200", "0.5456", "—"]  # empty last
    params = _header(driver, "table-plism", "Params")
    params.click()  # sorts by the raw number, not the "86M" text
    assert _column(driver, "table-plism", 11)[:5] == ["86M", "86M", "86M", "3M", "1K"]


def test_suite_filter(page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver, _, _ = page
    Select(driver.find_element(By.ID, "suite-filter")).select_by_value("hest")
    assert driver.find_element(By.ID, "suite-hest").is_displayed()
    assert not driver.find_element(By.ID, "suite-plism").is_displayed()
    assert not driver.find_element(By.ID, "plot-plism_heatmaps").is_displayed()
    assert driver.find_element(By.ID, "plot-score_vs_params").is_displayed()
    Select(driver.find_element(By.ID, "suite-filter")).select_by_value("all")
    assert driver.find_element(By.ID, "suite-plism").is_displayed()


def test_no_network_requests_and_screenshot(page):
    driver, _, root = page
    driver.execute_script("window.scrollTo(0, 0)")
    shot = root / "leaderboard.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            urls.append(message["params"].get("request", {}).get("url") or message["params"].get("url", ""))
    assert urls, "the performance log recorded no requests at all (is logging on?)"
    assert any(u.startswith("file:") for u in urls)
    remote = [u for u in urls if not u.startswith(LOCAL_SCHEMES)]
    assert remote == []


def test_main_tables_fit_the_window_and_headings_do_not_repeat(page):
    from selenium.webdriver.common.by import By

    driver, _, _ = page
    assert driver.execute_script("return window.innerWidth") >= 1380
    for table_id in ("overall-table", "table-plism", "table-hest", "table-eva"):
        scroll, client = driver.execute_script(
            "var box = document.getElementById(arguments[0]).parentElement;"
            "return [box.scrollWidth, box.clientWidth];", table_id)
        assert scroll <= client, f"{table_id} scrolls sideways ({scroll} px in {client} px)"
        last = driver.execute_script(
            "var cells = document.getElementById(arguments[0]).tHead.rows[0].cells;"
            "return cells[cells.length - 1].getBoundingClientRect().right;", table_id)
        assert last <= driver.execute_script("return window.innerWidth")  # the Run column is on screen
    headings = [h.text.strip() for h in driver.find_elements(By.CSS_SELECTOR, "h1, h2, h3, caption")]
    assert len(headings) == len(set(headings)), headings
