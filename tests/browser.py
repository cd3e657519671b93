"""Debian's chromium, headless, driven through its chromedriver (Selenium): the service's web
page is tested in a real browser. ``make test`` installs both; without them the test skips."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

#: Where browser tests keep their screenshots (gitignored; CI can collect it).
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def chromium(profile: Path):
    """A headless chromium session with a fresh profile in ``profile``, or a skip naming what
    to install. Flags: no sandbox (root in CI), no GPU, and none of the background network
    calls a closed machine refuses (updates, sync, QUIC)."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (make test installs them as root; "
                    "or: sudo apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1280,1100"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver))


def waiting(driver, timeout: float = 30):
    """A WebDriverWait that retries through elements the page redrew meanwhile."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,))


def click(driver, css: str, timeout: float = 60) -> None:
    """Click the element ``css`` selects once it is there (again if the page redrew it first)."""
    from selenium.webdriver.common.by import By

    def clicked(d) -> bool:
        found = d.find_elements(By.CSS_SELECTOR, css)
        if not found:
            return False
        found[0].click()
        return True

    waiting(driver, timeout).until(clicked)
