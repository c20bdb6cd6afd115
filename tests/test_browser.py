"""In a real browser: `mlflow server` on 127.0.0.1 against a store holding a finished smoke
sweep, opened in headless Chromium, shows the sweep's parent run with its nested trial runs,
their metrics and artifacts; and the HTML report's figures render (non-blank images).

Chromium is driven through chromedriver's W3C WebDriver HTTP protocol with the standard
library (a dozen endpoints; no selenium dependency). Needs Debian's `chromium` and
`chromium-driver` packages; skipped, saying so, when they are not installed. Screenshots go to
$ALIGNSWEEP_ARTIFACTS/browser (default <repo>/test-artifacts/browser), which CI keeps.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from smoke_store import EXPERIMENT, REPO, SWEEP, finished_smoke_sweep
from tools import missing

from dashboards import pareto

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module", autouse=True)
def _chromium():  # module scope: before the module's sweep and server are started for nothing
    if CHROMIUM is None or CHROMEDRIVER is None:
        missing("headless Chromium not installed: apt-get install -y chromium chromium-driver "
                "(Debian's packages)")

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver element reference key
SCREENSHOTS = Path(os.environ.get("ALIGNSWEEP_ARTIFACTS") or REPO / "test-artifacts") / "browser"
TRIALS = [f"{SWEEP}-none-a0-b1-s0", f"{SWEEP}-max-a0.8-b1-s0", f"{SWEEP}-min-a0.8-b1-s0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited ({proc.returncode}):\n"
                        f"{log.read_text()[-3000:] if log.exists() else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout:.0f} s:\n"
                f"{log.read_text()[-3000:] if log.exists() else ''}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Browser:
    """Headless Chromium through chromedriver (W3C WebDriver over HTTP)."""

    def __init__(self, driver_url: str, profile: Path) -> None:
        self.url = driver_url
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1600,1000",
                f"--user-data-dir={profile}"]
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}}
        self.session = f"/session/{self._call('POST', '/session', caps)['sessionId']}"

    def _call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as exc:
            raise AssertionError(
                f"WebDriver {method} {path}: {exc.read().decode()[:500]}") from None

    def call(self, method: str, path: str, body: dict | None = None):
        return self._call(method, self.session + path, body)

    def open(self, url: str) -> None:
        # A fresh document per page: MLflow's single-page app keeps state across hash changes
        # (a run page reached from another run page can show the previous run's artifacts).
        self.call("POST", "/url", {"url": "about:blank"})
        self.call("POST", "/url", {"url": url})

    def script(self, source: str, *args):
        return self.call("POST", "/execute/sync", {"script": source, "args": list(args)})

    def text(self) -> str:
        return self.script("return document.body ? document.body.innerText : ''")

    def wait_for(self, strings, timeout: float = 90) -> str:
        """Wait until the page's text holds every string; returns the text."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.text()
            if all(s in text for s in strings):
                return text
            time.sleep(0.5)
        missing = [s for s in strings if s not in text]
        raise AssertionError(f"page never showed {missing}; it shows:\n{text[:3000]}")

    def elements(self, css: str) -> list[str]:
        found = self.call("POST", "/elements", {"using": "css selector", "value": css})
        return [e[ELEMENT] for e in found]

    def click(self, element: str) -> None:
        self.call("POST", f"/element/{element}/click", {})

    def screenshot(self, name: str, element: str | None = None) -> Path:
        path = f"/element/{element}/screenshot" if element else "/screenshot"
        png = base64.b64decode(self.call("GET", path))
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        out = SCREENSHOTS / name
        out.write_bytes(png)
        return out

    def close(self) -> None:
        try:
            self.call("DELETE", "")
        except (AssertionError, OSError):  # the browser is gone already: nothing to close
            pass


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The finished smoke sweep, post-processed (report logged to its parent run)."""
    smoke = finished_smoke_sweep(tmp_path_factory)
    report = pareto.postprocess(SWEEP, mlflow_uri=smoke.uri,
                                out=tmp_path_factory.mktemp("browser-report"))
    client = MlflowClient(smoke.uri)
    exp_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    children = {r.data.tags["trial_id"]: r.info.run_id
                for r in client.search_runs([exp_id]) if "trial_id" in r.data.tags}
    return smoke, report, exp_id, children


@pytest.fixture(scope="module")
def server(sweep, tmp_path_factory):
    smoke = sweep[0]
    work = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = work / "server.log"
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow)] if mlflow.exists() else [sys.executable, "-m", "mlflow"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*cmd, "server", "--backend-store-uri", smoke.uri, "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 120, proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    work = tmp_path_factory.mktemp("chromium")
    port = free_port()
    log = work / "chromedriver.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/status", 30, proc, log)
        b = Browser(f"http://127.0.0.1:{port}", work / "profile")
        try:
            yield b
        finally:
            b.close()
    finally:
        stop(proc)


def _by_text(browser, text: str, selector: str = "*") -> str:
    """The innermost visible element matching ``selector`` whose text is exactly ``text``
    (what a user clicks: the label, not the page that contains it)."""
    found = browser.script(
        "return Array.from(document.querySelectorAll(arguments[1]))"
        ".filter(e => e.textContent.trim() === arguments[0] && e.offsetParent !== null"
        " && !Array.from(e.children).some(c => c.textContent.trim() === arguments[0]))",
        text, selector)
    assert found, f"no element {selector!r} reading {text!r}:\n{browser.text()[:2000]}"
    return found[0][ELEMENT]


def test_a_user_starts_at_the_experiment_list_and_reaches_the_sweeps_runs(
        sweep, server, browser):
    """Where a user starts: MLflow's home page, which lists the sweep's experiment with its
    description. MLflow 3.17 opens experiments in its GenAI view unless the user picks
    "Model training" (one click, remembered by the browser); then one click on the
    experiment shows the runs table with the sweep's parent run."""
    browser.open(f"{server}/")
    text = browser.wait_for([EXPERIMENT, "Model training"])
    assert "AlexNet conv1 vs NSD V1" in text  # the experiment's description (the sweep's)
    browser.screenshot("mlflow-home.png")
    browser.click(_by_text(browser, "Model training"))
    browser.click(_by_text(browser, EXPERIMENT, "a"))
    browser.wait_for([SWEEP, "matching runs"])
    browser.screenshot("mlflow-experiment-after-click.png")


def test_experiment_page_shows_the_parent_run_with_its_nested_trial_runs(sweep, server, browser):
    _, _, exp_id, _ = sweep
    browser.open(f"{server}/#/experiments/{exp_id}/runs")
    text = browser.wait_for([EXPERIMENT, SWEEP, "4 matching runs"])
    if not all(t in text for t in TRIALS):  # collapsed under the parent: expand it
        # the expand button of a parent row, in the run-name cell (MLflow 3.x's runs table)
        buttons = browser.elements("button[data-component-id*='runnamecellrenderer']")
        assert len(buttons) == 1, f"expected one parent row with an expand button:\n{text}"
        browser.click(buttons[0])
    browser.wait_for(TRIALS)
    browser.screenshot("mlflow-experiment-runs.png")


def test_parent_run_page_lists_the_trial_runs_and_the_report(sweep, server, browser):
    smoke, _, exp_id, _ = sweep
    browser.open(f"{server}/#/experiments/{exp_id}/runs/{smoke.parent_run_id}")
    text = browser.wait_for(["Child runs", *TRIALS])
    assert "smoke test on tiny simulated data" in text  # the parent's data_description tag
    browser.screenshot("mlflow-parent-run.png")
    browser.open(f"{server}/#/experiments/{exp_id}/runs/{smoke.parent_run_id}/artifacts")
    browser.wait_for(list(pareto.FILES))
    browser.screenshot("mlflow-parent-run-artifacts.png")


def test_the_report_in_mlflows_artifact_view_names_its_files_instead_of_dead_links(
        sweep, server, browser):
    """MLflow shows report.html as a blob: document in a sandboxed frame, where the report's
    relative links to the files beside it led nowhere: there it names them as text and says
    where they are; opened from the output folder the links stay (test_report_figures_render)."""
    smoke, _, exp_id, _ = sweep
    browser.open(f"{server}/#/experiments/{exp_id}/runs/{smoke.parent_run_id}/artifacts")
    browser.wait_for(["report.html"])
    browser.click(_by_text(browser, "report.html"))
    deadline = time.monotonic() + 60
    while not (frames := browser.elements("iframe.mlflow-html-iframe")):
        assert time.monotonic() < deadline, f"no report frame:\n{browser.text()[:2000]}"
        time.sleep(0.5)
    browser.call("POST", "/frame", {"id": {ELEMENT: frames[0]}})
    try:
        text = browser.wait_for(["Files", "In this run's artifacts, listed beside this report"])
        assert browser.script("return location.protocol") == "blob:"
        assert browser.elements("a.beside") == []
        names = browser.script("return Array.from(document.querySelectorAll('ul code'))"
                               ".map(c => c.textContent)")
        assert set(pareto.FILES[1:]) == set(names), (names, text[-2000:])
    finally:
        browser.call("POST", "/frame", {"id": None})
    browser.screenshot("mlflow-report-artifact-view.png")


def test_trial_run_page_shows_its_metrics_and_filter_grid(sweep, server, browser):
    _, _, exp_id, children = sweep
    run = children[f"{SWEEP}-max-a0.8-b1-s0"]
    browser.open(f"{server}/#/experiments/{exp_id}/runs/{run}")
    browser.wait_for(["Parent run", SWEEP, "val_performance", "val_alignment", "val_map"])
    browser.screenshot("mlflow-trial-run.png")
    browser.open(f"{server}/#/experiments/{exp_id}/runs/{run}/artifacts")
    browser.wait_for(["conv1_filters.png", "final_metrics.json"])
    browser.screenshot("mlflow-trial-run-artifacts.png")


def test_report_figures_render(sweep, browser):
    _, report, _, _ = sweep
    browser.open(report.resolve().as_uri())
    browser.wait_for(["Statistics", "Figures", "Trials", "Resolved config", *TRIALS])
    images = browser.script(
        "return Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, "
        "width: i.naturalWidth, height: i.naturalHeight}))")
    assert [i["alt"] for i in images] == ["front figure", "epochs figure", "filters figure"]
    for element, info in zip(browser.elements("figure img"), images):
        assert info["complete"] and info["width"] > 300 and info["height"] > 200, info
        browser.script("arguments[0].scrollIntoView()", {ELEMENT: element})
        shot = browser.screenshot(f"report-{info['alt'].replace(' ', '-')}.png", element)
        pixels = matplotlib.image.imread(str(shot))[..., :3]
        # what Chromium drew: not one flat colour, and many distinct colours (axes, markers,
        # text; filter grids), so a broken or empty image fails
        assert pixels.std() > 0.05, f"{info['alt']} renders blank (std {pixels.std():.3f})"
        colours = len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0))
        assert colours > 50, f"{info['alt']} renders only {colours} colours"
    links = browser.script("return Array.from(document.querySelectorAll('a.beside'))"
                           ".map(a => a.getAttribute('href'))")
    assert set(pareto.FILES[1:]) == set(links)  # opened from the output folder: links stay
    browser.script("window.scrollTo(0, 0)")
    browser.screenshot("report.png")


def test_a_password_in_the_server_uri_reaches_no_output(sweep, server, tmp_path):
    """A tracking URI with credentials (a server behind basic auth): the post-processor's
    report, tables and statistics name the server as user:***@ (its source line went into
    report.html and the parquet metadata in plain text, then into the parent run's
    artifacts). This server asks for no password, so any is accepted."""
    uri = server.replace("http://", "http://alice:hunter2pass@")
    proc = subprocess.run([sys.executable, "-m", "dashboards.pareto", SWEEP, "--mlflow-uri", uri,
                           "--out", str(tmp_path), "--no-log"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "hunter2pass" not in proc.stdout + proc.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"report.html", "results.parquet", "epochs.parquet"} <= {p.name for p in written}
    for path in written:
        assert b"hunter2pass" not in path.read_bytes(), path
    assert "alice:***@127.0.0.1" in (tmp_path / "report.html").read_text()
