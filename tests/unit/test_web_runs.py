"""The web pages' server side without a browser: metrics.jsonl read while it is being written, runs found and
summarised, the dashboard's JSON API and its errors, and the pages' files served only under the strict CSP (and the
playground only when the server has it on)."""

import json
import os
import time

import pytest

from lmforge.cli import main
from lmforge.serve.openai_api import create_app
from lmforge.web.assets import CSP
from lmforge.web.dashboard import create_dashboard_app
from lmforge.web.runs import RecordCache, checkpoints, find_runs, read_metrics, summarize
from tests.unit.tiny_server import request, run, tiny_engine


def line(step: int, **values) -> str:
    return json.dumps({"step": step, **values}) + "\n"


def test_metrics_are_read_by_whole_lines_from_an_offset(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(line(1, loss=2.5) + line(2, loss=2.25) + '{"step": 3, "lo')  # the writer is mid-line
    first = read_metrics(path)
    assert [r["step"] for r in first.records] == [1, 2] and not first.reset
    assert read_metrics(path, first.offset).records == []  # the unfinished line waits
    with path.open("a") as f:
        f.write('ss": 2.0}\nnot json\n' + line(4, val_loss=2.1))
    second = read_metrics(path, first.offset)
    assert second.records == [{"step": 3, "loss": 2.0}, {"step": 4, "val_loss": 2.1}]  # the bad line is skipped
    assert second.offset == path.stat().st_size
    path.write_text(line(1, loss=9.0))  # a resumed run rewrote the file: shorter than the offset
    again = read_metrics(path, second.offset)
    assert again.reset and again.records == [{"step": 1, "loss": 9.0}]
    assert read_metrics(tmp_path / "missing.jsonl", 10).reset


def test_a_diverged_run_reads_as_json(dashboard, tmp_path):
    diverged = line(2, loss=float("nan"), grad_norm=float("inf"))  # json.dumps writes NaN, Infinity
    (tmp_path / "one" / "metrics.jsonl").write_text(line(1, loss=2.0) + diverged)
    chunk = run(request(dashboard, "GET", "/api/metrics?name=one&offset=0"))
    assert chunk.status_code == 200
    assert chunk.json()["records"][1] == {"step": 2, "loss": "NaN", "grad_norm": "Infinity"}
    assert run(request(dashboard, "GET", "/api/runs")).json()["runs"][0]["loss"] == "NaN"


def test_runs_are_found_up_to_two_levels_down_and_summarised(tmp_path):
    done = tmp_path / "sweep" / "lr-3e-4"
    (done / "final").mkdir(parents=True)
    (done / "checkpoints" / "step-000010").mkdir(parents=True)
    (done / "config.yaml").write_text("model:\n  path: smollm2-135m\nmethod: lora\nrecipe: sft\n")
    (done / "metrics.jsonl").write_text(line(10, loss=1.5, tokens_per_s=900.0, seconds=0.5) + line(10, val_loss=1.7)
                                        + line(20, loss=1.25, tokens_per_s=950.0, seconds=0.5) + line(20, val_loss=1.6))
    live = tmp_path / "live"
    live.mkdir()
    (live / "metrics.jsonl").write_text(line(1, loss=3.0, seconds=1.0))
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "metrics.jsonl").write_text(line(1, loss=1.0))  # three levels down: not looked at
    runs = find_runs(tmp_path)
    assert list(runs) == ["live", "sweep/lr-3e-4"]  # not checkpoints/, not deeper
    s = summarize("sweep/lr-3e-4", runs["sweep/lr-3e-4"])
    assert (s.recipe, s.method, s.model, s.status) == ("sft", "lora", "smollm2-135m", "finished")
    assert (s.step, s.loss, s.val_loss, s.best_val_loss, s.tokens_per_s) == (20, 1.25, 1.6, 1.6, 950.0)
    assert [(c["name"], c["step"]) for c in checkpoints(done)] == [("step-000010", 10), ("final", None)]
    assert checkpoints(live) == []
    assert summarize("live", live).status == "running"
    assert summarize("live", live, now=time.time() + 3600).status == "stopped"  # nothing written for an hour
    assert find_runs(live) == {".": live}  # pointed at one run directory


def test_records_are_parsed_again_only_when_the_file_changed(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(line(1, loss=2.0))
    cache = RecordCache()
    first = cache.records(path)
    assert cache.records(path) is first  # unchanged: the parsed list again
    with path.open("a") as f:
        f.write(line(2, loss=1.0))
    assert [r["loss"] for r in cache.records(path)] == [2.0, 1.0]
    assert cache.records(tmp_path / "missing.jsonl") == []


@pytest.fixture
def dashboard(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "metrics.jsonl").write_text(line(1, loss=2.0) + line(2, loss=1.5))
    return create_dashboard_app(tmp_path, refresh_s=0.5)


def test_dashboard_api(dashboard, tmp_path):
    listing = run(request(dashboard, "GET", "/api/runs")).json()
    assert listing["root"] == str(tmp_path) and listing["refresh_s"] == 0.5
    assert [(r["name"], r["loss"], r["step"]) for r in listing["runs"]] == [("one", 1.5, 2)]
    detail = run(request(dashboard, "GET", "/api/run?name=one")).json()
    assert detail["config"] == "" and detail["checkpoints"] == []
    chunk = run(request(dashboard, "GET", "/api/metrics?name=one&offset=0")).json()
    assert [r["loss"] for r in chunk["records"]] == [2.0, 1.5]
    rest = run(request(dashboard, "GET", f"/api/metrics?name=one&offset={chunk['offset']}")).json()
    assert rest == {"records": [], "offset": chunk["offset"], "reset": False}


@pytest.mark.parametrize("path, status, words", [
    ("/api/run?name=two", 404, "No run named 'two'"),
    ("/api/metrics?name=../one&offset=0", 404, "No run named '../one'"),
    ("/api/metrics?name=one&offset=-1", 400, "offset must be >= 0"),
    ("/ui/runs.py", 404, "No such page asset: runs.py."),
    ("/ui/..%2Fruns.py", 404, "Unknown route: GET /ui/../runs.py."),
])
def test_dashboard_errors_are_one_sentence(dashboard, path, status, words):
    response = run(request(dashboard, "GET", path))
    assert response.status_code == status
    assert words in response.json()["error"]["message"]


def test_pages_are_served_under_the_strict_csp(dashboard):
    page = run(request(dashboard, "GET", "/"))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP
    assert "'unsafe-inline'" not in CSP and "'unsafe-eval'" not in CSP
    assert '<script type="module" src="/ui/dashboard.js">' in page.text
    script = run(request(dashboard, "GET", "/ui/dashboard.js"))
    assert script.headers["content-type"].startswith("text/javascript")
    for name in ("dashboard.html", "playground.html"):  # no inline script or style anywhere, no other origin
        html = run(request(dashboard, "GET", f"/ui/{name}")).text
        assert "<script>" not in html and "style=" not in html and "<style" not in html
        assert "http://" not in html and "https://" not in html


def test_the_playground_is_served_unless_turned_off(tmp_path):
    engine = tiny_engine(tmp_path)
    try:
        with_ui = run(request(create_app(engine, ["tiny"], api_key="sk-key"), "GET", "/"))
        assert with_ui.status_code == 200 and "lmforge playground" in with_ui.text  # no key needed for the page
        assert with_ui.headers["content-security-policy"] == CSP
        without = run(request(create_app(engine, ["tiny"], ui=False), "GET", "/"))
        assert without.status_code == 404
        assert run(request(create_app(engine, ["tiny"], ui=False), "GET", "/ui/playground.js")).status_code == 404
        assert run(request(create_app(engine, ["tiny"]), "GET", "/runs")).status_code == 404  # no --runs
        assert run(request(create_app(engine, ["tiny"]), "GET", "/api/runs")).status_code == 404
    finally:
        engine.shutdown()


def test_serve_runs_adds_the_dashboard_behind_the_key(tmp_path):
    (tmp_path / "runs" / "one").mkdir(parents=True)
    (tmp_path / "runs" / "one" / "metrics.jsonl").write_text(line(1, loss=2.0))
    engine = tiny_engine(tmp_path / "model")
    try:
        app = create_app(engine, ["tiny"], api_key="sk-key", runs_dir=str(tmp_path / "runs"), ui=False)
        page = run(request(app, "GET", "/runs"))
        assert page.status_code == 200 and "lmforge dashboard" in page.text
        assert page.headers["content-security-policy"] == CSP
        assert run(request(app, "GET", "/")).status_code == 404  # --no-ui: no playground
        refused = run(request(app, "GET", "/api/runs"))
        assert refused.status_code == 401 and "No API key provided" in refused.json()["error"]["message"]
        listing = run(request(app, "GET", "/api/runs", headers={"Authorization": "Bearer sk-key"})).json()
        assert [(r["name"], r["loss"]) for r in listing["runs"]] == [("one", 2.0)]
        assert "/api/runs" not in run(request(app, "GET", "/openapi.json")).json()["paths"]
    finally:
        engine.shutdown()


def test_static_files_hold_no_remote_references():
    from lmforge.web.assets import STATIC

    for path in STATIC.iterdir():
        text = path.read_text()
        assert "//cdn" not in text and "https://" not in text, path.name
        assert os.path.getsize(path) < 20_000, f"{path.name}: keep the page files small"


@pytest.mark.parametrize("args, words", [
    (["/nonexistent-runs"], "/nonexistent-runs is not a directory; pass the folder your runs' output_dir are in"),
    ([".", "--refresh", "0"], "--refresh must be > 0 seconds, got 0.0"),
    ([".", "--port", "-1"], "--port must be >= 0, got -1"),
])
def test_dashboard_cli_errors_are_one_line(args, words, capsys):
    assert main(["dashboard", *args]) == 2
    assert capsys.readouterr().err.strip() == f"lmforge dashboard: error: {words}"
