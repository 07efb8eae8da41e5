"""`lmforge dashboard` in headless Chromium while real `lmforge train` runs (the tiny chat model, seconds each) write
their run directories: the live run's loss curve grows while it trains, a finished run shows metrics.jsonl's last
loss as its final loss, runs overlay, and the page works by keyboard, at phone width, without console errors."""

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.browser import LAPTOP, PHONE, Console, LmforgeChild, launch_chromium, overflowing, screenshot
from tests.train_refs import ROOT, config_maker, metrics


def dashboard(runs: Path) -> LmforgeChild:
    return LmforgeChild(["dashboard", str(runs), "--port", "0", "--refresh", "0.25"], r"on (http://127\.0\.0\.1:\d+)/")


def train(config: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "lmforge", "-q", "train", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def loss_points(page, run: str) -> int:
    count = page.evaluate("name => document.querySelector(`#chart-loss path[data-series=\"${name} loss\"]`)"
                          "?.dataset.points ?? '0'", run)
    return int(count)


def test_dashboard_follows_a_live_run_and_shows_the_final_loss(tiny_chat_model, tmp_path):
    playwright, browser = launch_chromium()  # first: without a browser the test skips before any training
    from playwright.sync_api import expect

    runs = tmp_path / "runs"
    runs.mkdir()
    make = config_maker(runs, tiny_chat_model, slice(0, 16), slice(16, 20))
    baseline = make("baseline", max_steps=8)
    live = make("live", max_steps=100, batch_size=8, micro_batch_size=2, eval__every_steps=20,
                checkpoint__every_steps=20)
    done = train(baseline)
    assert done.wait(120) == 0, done.stderr.read()
    board = None
    try:
        board = dashboard(runs)
        page = browser.new_page(viewport=LAPTOP)
        console = Console(page)
        page.goto(board.url + "/")
        page.wait_for_selector('#chart-loss path[data-series="baseline loss"]')
        run = train(live)
        page.wait_for_selector("tr[data-run=live]", timeout=60_000)
        page.check("input[aria-label='Compare live']")
        page.focus("tr[data-run=live] button")
        page.keyboard.press("Enter")  # the run's details, by keyboard
        expect(page.locator("#detail-title")).to_have_text("live")
        seen, statuses = [], set()
        while run.poll() is None:
            finished = (runs / "live" / "final").exists()
            points = loss_points(page, "live")
            statuses.add(page.inner_text("tr[data-run=live] td:nth-child(5)"))
            if not finished and run.poll() is None and points and (not seen or points != seen[-1]):
                seen.append(points)
            time.sleep(0.2)
        assert run.wait() == 0, run.stderr.read()
        assert len(seen) >= 2 and seen == sorted(seen), f"the curve did not grow while training: {seen}"
        assert "running" in statuses

        records = metrics(runs / "live")
        train_losses = [r["loss"] for r in records if "loss" in r]
        expect(page.locator("#detail-status")).to_have_text("finished")
        expect(page.locator('#chart-loss path[data-series="live loss"]')).to_have_attribute(
            "data-points", str(len(train_losses)))
        assert page.inner_text("#detail-loss-label") == "Final loss"
        assert page.get_attribute("#detail-loss", "data-value") == repr(train_losses[-1])
        assert page.inner_text("#detail-loss") == f"{train_losses[-1]:.4f}"
        assert loss_points(page, "baseline") == len([r for r in metrics(runs / "baseline") if "loss" in r])
        assert page.eval_on_selector_all("#chart-loss path.val", "paths => paths.length") == 2  # validation, overlaid
        page.select_option("#metric", "val_ppl")  # any numeric field of the records
        val_ppl = [r["val_ppl"] for r in records if "val_ppl" in r]
        assert page.get_attribute('#chart-metric path[data-series="live val_ppl"]', "data-points") == str(len(val_ppl))
        assert page.text_content("#config") == (runs / "live" / "config.yaml").read_text()
        shown = page.eval_on_selector_all("#checkpoints li", "items => items.map(i => i.textContent.split(' ')[0])")
        on_disk = sorted(p.name for p in (runs / "live" / "checkpoints").iterdir())
        assert shown == [*on_disk, "best", "final"]
        assert page.url.endswith("#compare=baseline&compare=live&run=live")  # the selection survives a reload
        page.reload()
        expect(page.locator("input[aria-label='Compare live']")).to_be_checked()
        expect(page.locator("input[aria-label='Compare baseline']")).to_be_checked()
        expect(page.locator("#detail-title")).to_have_text("live")
        expect(page.locator('#chart-loss path[data-series="live loss"]')).to_have_attribute(
            "data-points", str(len(train_losses)))
        screenshot(page, "dashboard", tmp_path)
        page.set_viewport_size(PHONE)
        assert not overflowing(page)
        screenshot(page, "dashboard-phone", tmp_path)
        console.assert_clean()
    finally:
        browser.close()
        playwright.stop()
        stopped = board.stop() if board else None
    assert stopped == 0, "".join(board.log)


def test_serve_runs_shows_the_dashboard_behind_the_api_key(tiny_chat_model, tmp_path):
    playwright, browser = launch_chromium()
    from playwright.sync_api import expect

    (tmp_path / "runs").mkdir()
    done = train(config_maker(tmp_path / "runs", tiny_chat_model, slice(0, 8), slice(8, 10))("baseline", max_steps=4))
    assert done.wait(120) == 0, done.stderr.read()
    last_loss = [r["loss"] for r in metrics(tmp_path / "runs" / "baseline") if "loss" in r][-1]
    server = None
    try:
        server = LmforgeChild(["serve", str(tiny_chat_model), "--runs", str(tmp_path / "runs"), "--api-key", "sk-runs",
                        "--port", "0", "--dtype", "float32", "--max-model-len", "128", "--kv-cache-memory", "0.01",
                        "--no-access-log"], r"run dashboard of .* on (http://127\.0\.0\.1:\d+)/runs")
        page = browser.new_page(viewport=LAPTOP)
        console = Console(page)
        page.goto(server.url + "/runs")
        expect(page.locator("#error")).to_have_text("No API key provided; send 'Authorization: Bearer <key>'.")
        time.sleep(2.5)  # longer than the poll interval: no poll while the key is missing
        assert len(console.errors) == 1
        page.fill("#api-key", "sk-runs")
        page.press("#api-key", "Enter")
        expect(page.locator("tr[data-run=baseline] td:nth-child(7)")).to_have_text(f"{last_loss:.4f}")
        expect(page.locator("#key-form")).to_be_hidden()
        expect(page.locator("#error")).to_be_hidden()
        page.goto(server.url + "/")  # the playground in the same tab has the key already
        page.wait_for_selector("#model option", state="attached")
        assert page.is_hidden("#key-form")
        console.assert_clean(expected=r"Failed to load resource: the server responded with a status of 401 "
                                      r"\(Unauthorized\)")
        assert len(console.errors) == 1
    finally:
        browser.close()
        playwright.stop()
        stopped = server.stop() if server else None
    assert stopped == 0, "".join(server.log)


def test_a_long_run_is_drawn_thinned_to_its_shape(tmp_path):
    """A 6,000-step metrics.jsonl (written here: the drawing is under test, not the training) is drawn with about
    1,500 points per line, its last point kept, and the page says how many records it holds."""
    playwright, browser = launch_chromium()
    run = tmp_path / "long"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "loss": {10 / s}, "lr": 0.001}}\n'
                                               for s in range(1, 6001)))
    board = None
    try:
        board = dashboard(tmp_path)
        page = browser.new_page(viewport=LAPTOP)
        console = Console(page)
        page.goto(board.url + "/")
        path = page.wait_for_selector('#chart-loss path[data-series="long loss"]')
        assert path.get_attribute("data-points") == "6000"
        d = path.get_attribute("d")
        assert 1400 <= d.count("L") + 1 <= 1501
        assert d.split("L")[-1].startswith("548.0,")  # the last step, at the plot's right edge (560 - 12)
        # the CSP reaches the browser: an inline script added to the page does not run
        assert page.evaluate("""() => { const s = document.createElement('script'); s.textContent = 'window.x = 1';
                                        document.body.append(s); return window.x === undefined; }""")
        assert len(console.errors) == 1 and "Content Security Policy" in console.errors[0], console.errors
        console.errors.clear()
        console.assert_clean()
    finally:
        browser.close()
        playwright.stop()
        stopped = board.stop() if board else None
    assert stopped == 0, "".join(board.log)
