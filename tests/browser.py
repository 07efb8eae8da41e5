"""Headless Chromium for the web page tests: the system's browser (Debian's `chromium`, which `make test` installs)
driven by Playwright for Python, which downloads no browser of its own here. Without either, the tests skip and say
why; every page also records its console errors and uncaught exceptions, which the tests require to be none."""

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PHONE = {"width": 390, "height": 844}
LAPTOP = {"width": 1280, "height": 820}


def chromium_path() -> str | None:
    """$LMFORGE_CHROMIUM, else the first Chromium on PATH."""
    given = os.environ.get("LMFORGE_CHROMIUM")
    if given:
        return given
    return next((path for name in BROWSER_NAMES if (path := shutil.which(name))), None)


def launch_chromium():
    """(playwright, browser), or a skip naming what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]'); the browser tests need it")
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set LMFORGE_CHROMIUM); the browser tests need it")
    try:
        playwright = sync_playwright().start()
    except Exception as e:  # Playwright's own driver does not run here
        pytest.skip(f"Playwright does not start: {str(e).splitlines()[0]}")
    try:
        return playwright, playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
    except Exception as e:  # a browser too old for this Playwright, missing libraries: the message says which
        playwright.stop()
        pytest.skip(f"Chromium at {path} does not start under Playwright: {str(e).splitlines()[0]}")


class Console:
    """The console errors and uncaught exceptions of one page."""

    def __init__(self, page):
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def assert_clean(self, expected: str | None = None) -> None:
        """No errors, except those matching the regular expression `expected` (e.g. the browser's own line for a
        401 the test provoked)."""
        unexpected = [e for e in self.errors if expected is None or not re.fullmatch(expected, e)]
        assert not unexpected, unexpected


def screenshot(page, name: str, folder: Path) -> Path:
    """A PNG of the whole page in $LMFORGE_SCREENSHOTS (the README's pictures: docs/img) or else in `folder`."""
    out = Path(os.environ.get("LMFORGE_SCREENSHOTS") or folder) / f"{name}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out), full_page=True)
    return out


OVERFLOWING = """() => {
  const width = document.documentElement.clientWidth;
  const scrolls = (e) => e.closest(".table-wrap, pre");  // boxes that scroll on their own
  return [...document.body.querySelectorAll("*")]
    .filter((e) => e.getBoundingClientRect().right > width + 1 && !scrolls(e))
    .map((e) => `${e.tagName.toLowerCase()}#${e.id}.${e.className}`);
}"""


def overflowing(page) -> list[str]:
    """The elements that stick out of the page's width (none: no sideways scrolling on a phone)."""
    return page.evaluate(OVERFLOWING)


class LmforgeChild:
    """`python -m lmforge ARGS` in a subprocess; `url` is the first group of `ready`, matched in its log."""

    def __init__(self, args: list[str], ready: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "lmforge", *args], cwd=ROOT, stderr=subprocess.PIPE,
                                     text=True)
        self.log = []
        deadline = time.monotonic() + 120
        while not (m := re.search(ready, self.log[-1] if self.log else "")):
            line = self.proc.stderr.readline()
            if not line or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"lmforge {args[0]} did not start:\n" + "".join(self.log))
            self.log.append(line)
        self.url = m.group(1)
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(30)
