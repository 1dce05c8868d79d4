"""The dashboard in real headless Chromium (Debian's chromium and chromium-driver) against a
daemon driven through a scripted scenario: the page loads with no console errors, shows what
the API says, and its Cancel button ends an automation. Screenshots go to the test's folder."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from daemonproc import DaemonProc, running_daemon
from kiln.web.token import TOKEN_FILE
from test_protocol import anytime_plan

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
IP = "192.0.2.10"


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1800"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def scenario(d: DaemonProc, api: httpx.Client, token: str) -> dict[str, Any]:
    """Traffic on the warming IPs and overflow to warm ones, reports, and a pause."""
    with d.mta_client() as m:
        for _ in range(3):
            m.request("acquire", ip=IP, domain="gmail.com", n=2)
        for _ in range(30):
            m.request("pick", pool="transactional", domain="gmail.com")
        m.request("report", ip=IP, domain="gmail.com", result="delivered", n=5)
    paused = api.post(
        "/api/pause",
        json={"ip": "192.0.2.11", "provider": "google", "for": "2h", "reason": "scripted"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert paused.status_code == 200, paused.text
    return dict(paused.json()["automation"])


def rows(driver: webdriver.Chrome, table: str) -> dict[str, dict[str, Any]]:
    """A table's rows as the page shows them now, read in one go (the page redraws its
    tables every few seconds): key (data-key or data-id) -> {class name: text, "cells"}."""
    script = """
      const out = {};
      for (const tr of document.querySelectorAll("#" + arguments[0] + " tbody tr")) {
        const row = {cells: []};
        for (const td of tr.children) {
          row.cells.push(td.textContent);
          for (const c of td.classList) row[c] = td.textContent;
        }
        out[tr.dataset.key || tr.dataset.id] = row;
      }
      return out;
    """
    return dict(driver.execute_script(script, table))


def click_cancel(driver: webdriver.Chrome, automation_id: str) -> None:
    """Click the automation's Cancel button (again if a redraw replaced it meanwhile)."""
    for _ in range(5):
        try:
            driver.find_element(
                By.CSS_SELECTOR, f'#automations tr[data-id="{automation_id}"] button.cancel'
            ).click()
            return
        except StaleElementReferenceException:
            continue
    raise AssertionError("the Cancel button kept being redrawn")


def severe(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """Console entries at error level."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [e for e in entries if e["level"] == "SEVERE"]


def test_dashboard_shows_the_api_and_cancels_an_automation(
    tmp_path: Path, browser: webdriver.Chrome
) -> None:
    with running_daemon(anytime_plan(tmp_path)) as d:
        url = d.http_url()
        token = (d.state_dir / TOKEN_FILE).read_text().strip()
        with httpx.Client(base_url=url, timeout=10) as api:
            automation = scenario(d, api, token)
            # The saved counts (the page's per-IP table) are written by the 1 s flush.
            WebDriverWait(browser, 10).until(lambda _: api.get("/api/today").json()["keys"] != [])
            browser.get(url + "/")
            wait = WebDriverWait(browser, 20)
            wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
            status = api.get("/api/status").json()
            caps = {(k["ip"], k["provider"]): k for k in api.get("/api/caps").json()["keys"]}
            browser.save_screenshot(str(tmp_path / "dashboard.png"))
            print(f"screenshots in {tmp_path}")  # noqa: T201 (where to look, with -s)
            ramps = rows(browser, "ramps")
            for r in status["ramps"]:
                row = ramps[f"{r['batch']}/{r['provider']}"]
                assert row["step"] == f"{r['step']} of {r['steps']}"
                assert row["day-used"] == str(r["day_used"])
                assert row["daily-cap"] == str(r["day_cap_total"])
            google = next(r for r in status["ramps"] if r["provider"] == "google")
            assert google["day_used"] > 0  # the scenario's traffic is what the page shows
            keys = rows(browser, "keys")
            assert keys["192.0.2.11/google"]["per-hour"] == "0"
            assert caps[("192.0.2.11", "google")]["per_hour"] == 0
            assert any(r["cells"][2] == "warm" for r in keys.values())  # overflow is shown
            assert browser.find_elements(By.CSS_SELECTOR, "#chart svg polyline.planned")
            assert automation["id"] in rows(browser, "automations")
            # Cancel needs the token: typed into the page, then the button.
            browser.find_element(By.ID, "token").send_keys(token + Keys.TAB)
            click_cancel(browser, automation["id"])
            wait.until(lambda b: rows(b, "automations") == {})
            assert api.get("/api/automations").json()["automations"] == []
            browser.save_screenshot(str(tmp_path / "dashboard-after-cancel.png"))
            with d.mta_client() as m:
                r2 = m.request("acquire", ip="192.0.2.11", domain="gmail.com")
                assert r2.get("reason") != "paused", r2
        assert severe(browser) == []
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000
