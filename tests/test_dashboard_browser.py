"""The dashboard in a real browser: ``streamlit run dashboard/app.py`` as a subprocess, driven by
headless Debian Chromium through Selenium and ``/usr/bin/chromedriver``.

The state is real: ``dashboard.demo.build_demo`` scores CWRU recordings (``../shared/datasets``)
with a calibrated :class:`pdm_edge.model.scorer.Scorer` on the shipped encoder, debounces alerts
with :class:`pdm_edge.alerts.AlertTracker`, and fills a SQLite store, a registry, a label book and
the labelled-window buffer. Without the datasets the real-data test is skipped (with the
reason) and the same flow runs on the bundled synthetic sample instead.

Flow: the fleet page (the alarm first: selecting the first row opens pump-3), sign in as a
technician, the labelling queue, label the
open alert (fault, inner race, a note), the confirmation, then the machine page shows the label
(read from the label book: no appliance is running to forward it to the store). A screenshot of
every page (1600 x 1000) goes to the test's folder and to ``out/screenshots/`` (git-ignored).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pdm_edge.broker import free_port
from tests.conftest import DATASETS, REPO

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = REPO / "out" / "screenshots"
WIDTH, HEIGHT = 1600, 1000
FAULT = {"cwru": ("bearing_inner_race", "inner", "inner race spall confirmed with the borescope"),
         "sample": ("bearing_outer_race", "outer", "outer race spall confirmed with the borescope")}
"""The fault each recording has at pump-3 (CWRU IR007; the sample's outer-race defect): type, what to type, note."""


def _need_browser() -> None:
    pytest.importorskip("selenium", reason="selenium not installed: pip install -e '.[test]'")
    for p in (CHROMIUM, CHROMEDRIVER):
        if not p.exists():
            pytest.fail(f"{p} missing: run deploy/scripts/install-system-deps.sh (Debian chromium, chromium-driver)")


class Streamlit:
    """``streamlit run dashboard/app.py`` on a free loopback port, stopped by its process id."""

    def __init__(self, config: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PDM_EDGE_CONFIG": str(config)}
        with log.open("wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.headless", "true",
                 "--server.port", str(self.port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
                 "--server.fileWatcherType", "none"],
                cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 60.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/_stcore/health", timeout=1) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"streamlit did not answer within {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: only what we started
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
              f"--window-size={WIDTH},{HEIGHT}", "--force-device-scale-factor=1"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1,
                                                             "mobile": False})
    d.set_page_load_timeout(60)
    return d


class Page:
    """Small helpers over the WebDriver for a Streamlit app."""

    def __init__(self, driver, out: Path) -> None:
        self.d = driver
        self.out = out
        self.shots: list[Path] = []

    def body(self) -> str:
        from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

        try:
            return self.d.find_element("tag name", "body").text.replace("\u2060", "")  # md()'s invisible link breakers
        except (StaleElementReferenceException, WebDriverException):
            return ""

    def wait_text(self, *texts: str, timeout: float = 45.0) -> str:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            body = self.body()
            if all(t in body for t in texts):
                return body
            time.sleep(0.2)
        self.shot("timeout")
        raise AssertionError(f"{texts} not on the page within {timeout} s; the page says:\n{self.body()[:3000]}")

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until Streamlit's status widget ("Running...") is gone."""
        t0 = time.monotonic()
        time.sleep(0.3)
        while time.monotonic() - t0 < timeout:
            if not self.d.find_elements("css selector", '[data-testid="stStatusWidget"]'):
                return
            time.sleep(0.2)

    def poll(self, fn, what: str, timeout: float = 30.0):
        """``fn()`` until it returns something truthy, which is returned; an element that
        Streamlit redraws while we look at it (stale) or has not drawn yet means "look again"."""
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

        t0 = time.monotonic()
        while True:
            try:
                got = fn()
            except (StaleElementReferenceException, NoSuchElementException):
                got = None
            if got:
                return got
            if time.monotonic() - t0 > timeout:
                self.shot("timeout")
                raise AssertionError(f"{what}: not within {timeout} s")
            time.sleep(0.2)

    def click_button(self, text: str, within=None, timeout: float = 30.0) -> None:
        """Click the enabled button labelled ``text`` (in ``within`` or the whole page), waiting
        for it to be drawn: a page's text can be on screen before its widgets are."""
        def click() -> bool:
            for b in (within or self.d).find_elements("css selector", "button"):
                if b.text == text and b.is_enabled():
                    b.click()
                    return True
            return False

        self.poll(click, f"an enabled button {text!r}", timeout)

    def nav(self, title: str) -> None:
        links = [a for a in self.d.find_elements("css selector", "a") if a.text.strip().endswith(title)]
        assert links, f"no navigation link {title!r}"
        links[0].click()

    def shot(self, name: str) -> Path:
        p = self.out / f"{len(self.shots) + 1:02d}-{name}.png"
        self.d.save_screenshot(str(p))
        self.shots.append(p)
        return p

    def main(self):
        return self.d.find_element("css selector", '[data-testid="stMain"]')


def _run_flow(tmp_path: Path, datasets: Path | None, expect_source: str) -> None:
    _need_browser()
    from selenium.webdriver.common.keys import Keys

    from dashboard.demo import build_demo
    from pdm_edge.config import load_config
    from pdm_edge.feedback import LabelBook

    fault_type, typed, note = FAULT[expect_source]
    t_start = time.monotonic()
    demo = build_demo(tmp_path / "appliance", datasets=datasets)
    fill_s = time.monotonic() - t_start
    assert demo.source == expect_source
    shots = tmp_path / "screenshots"
    shots.mkdir()
    app = Streamlit(demo.config_path, tmp_path / "streamlit.log")
    driver = None
    try:
        start_s = app.wait()
        driver = _driver()
        page = Page(driver, shots)
        t0 = time.monotonic()
        driver.get(app.url + "/")
        # fleet overview: counts per status, the table, nothing needs a sign-in
        page.wait_text("Fleet overview", "alarm", "stale", "select a row to open the machine")
        assert driver.find_elements("css selector", '[data-testid="stDataFrame"]')
        fleet_s = time.monotonic() - t0
        metrics = {m.text.split("\n")[-2].split()[-1]: m.text.split("\n")[-1] for m in
                   driver.find_elements("css selector", '[data-testid="stMetric"]')}
        assert metrics == {"alarm": "1", "warning": "1", "stale": "1", "uncalibrated": "1", "normal": "1"}, metrics
        assert "Read-only" not in page.body()
        page.shot("fleet")

        # the most urgent machine is the first row; selecting it opens its detail page
        from selenium.webdriver.common.action_chains import ActionChains

        def open_first_row() -> bool:  # the page refreshes every few seconds: a click on a redrawn grid is tried again
            if driver.current_url.endswith("/machine"):
                return True
            grid = driver.find_element("css selector", '[data-testid="stDataFrame"]')
            r = grid.rect
            ActionChains(driver).move_to_element_with_offset(grid, -r["width"] / 2 + 16, -r["height"] / 2 + 35 + 17).click().perform()
            t0 = time.monotonic()
            while time.monotonic() - t0 < 5.0 and not driver.current_url.endswith("/machine"):
                time.sleep(0.2)
            return driver.current_url.endswith("/machine")

        page.poll(open_first_row, "the first row opening the machine page")
        page.wait_text("alarm · 1 open alert", "Spectrum of an alert")
        assert driver.current_url.endswith("/machine"), driver.current_url

        # sign in as the technician
        _sign_in(driver, page, "tina", demo.passwords["tina"])

        # labelling queue: the open alert of pump-3 first
        page.nav("Labelling queue")
        body = page.wait_text("Unlabelled alerts (2)", "open alert · plant1/pump-3", "plant1/mill-5")
        assert body.index("plant1/pump-3") < body.index("plant1/mill-5")
        page.wait_idle()
        page.shot("labelling-queue")
        form = page.main().find_elements("css selector", '[data-testid="stForm"]')[0]
        next(lb for lb in form.find_elements("css selector", "label") if lb.text.startswith("fault")).click()
        combo = form.find_element("css selector", 'input[aria-label="Fault type (for a fault)"]')
        combo.click()
        combo.send_keys(typed)
        opt = next(o for o in _wait_options(driver) if o.text == fault_type)
        opt.click()
        form.find_element("css selector", 'textarea[aria-label="Note"]').send_keys(note)
        form.find_element("css selector", 'textarea[aria-label="Note"]').send_keys(Keys.TAB)
        page.click_button("Save label", within=form)
        page.wait_text("Label saved", fault_type, "Unlabelled alerts (1)")
        page.wait_idle()
        page.shot("label-saved")

        # in the label book, as the dashboard wrote it through submit_label
        cfg = load_config(demo.config_path)
        with LabelBook.in_dir(cfg.feedback.state_dir) as book:
            mine = [lb for lb in book.list(machine="pump-3") if lb.alert_id == demo.open_alert_id]
        assert len(mine) == 1
        assert (mine[0].kind, mine[0].fault_type, mine[0].author, mine[0].note) == ("fault", fault_type, "tina", note)

        # the machine page shows it at once
        page.nav("Machine detail")
        page.wait_text("alarm · 1 open alert", "Labels (2)", "Power spectral density", "Envelope spectrum", "BPFI")
        page.wait_idle()
        page.shot("machine-detail")
        next(t for t in driver.find_elements("css selector", '[role="tab"]') if t.text.startswith("Labels")).click()
        page.wait_text(note, "by tina", "not yet in the store")
        driver.execute_script("window.scrollTo(0, 0)")
        page.shot("machine-labels-tab")
        for el in driver.find_elements("css selector", "h5"):
            if "Spectrum of an alert" in el.text:
                driver.execute_script("arguments[0].scrollIntoView()", el)
        time.sleep(0.5)
        page.shot("machine-spectra")

        page.nav("Model versions")
        page.wait_text("plant1/fan-1/de", "fan-1-de-v3", "Engineers can promote")
        page.wait_idle()
        page.shot("model-versions")

        page.nav("System health")
        page.wait_text("Service not reachable", "Labelled-window buffer", "Label book")
        page.wait_idle()
        page.shot("system-health")

        page.nav("Fleet overview")
        page.wait_text("select a row to open the machine", "Signed in as tina")
        page.wait_idle()
        page.shot("fleet-signed-in")
    finally:
        if driver is not None:
            driver.quit()
        app.stop()
    total_s = time.monotonic() - t_start
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for p in shots.glob("*.png"):
        shutil.copy(p, SCREENSHOTS / f"{expect_source}-{p.name}")
    print(f"\n[{expect_source}] fill {fill_s:.1f} s, streamlit up {start_s:.1f} s, fleet page in the browser {fleet_s:.1f} s, "
          f"whole flow {total_s:.1f} s; screenshots in {shots} and {SCREENSHOTS}")


def _wait_options(driver, timeout: float = 10.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        opts = driver.find_elements("css selector", '[role="option"]')
        if opts:
            return opts
        time.sleep(0.1)
    raise AssertionError("the select box did not open")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_browser_flow_on_real_data(tmp_path: Path) -> None:
    """CWRU recordings: sign in, label the open alert, see the label on the machine page."""
    if not (DATASETS / "cwru" / "normal_48k" / "normal_0_97.mat").is_file():
        pytest.skip(f"CWRU not found under {DATASETS} (set PDM_EDGE_DATASETS); the synthetic-sample flow runs instead")
    _run_flow(tmp_path, DATASETS, "cwru")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_browser_flow_on_the_synthetic_sample(tmp_path: Path) -> None:
    """The same flow on sample_data/sim_outer_race.npz, when the real recordings are absent."""
    if (DATASETS / "cwru" / "normal_48k" / "normal_0_97.mat").is_file():
        pytest.skip("the real-data flow ran on CWRU; the synthetic sample is only the fallback")
    _run_flow(tmp_path, None, "sample")


# -- the README demo's own configuration ------------------------------------------------------------
HOSTILE_NOTE = "<img src=x onerror=alert(1)> [x](http://e) outer race, see http://e2.example"
"""A note that would be an element and a link if it were rendered as HTML or Markdown."""
DEMO_PAGES = [("/", "Fleet overview"), ("/fleet", "Fleet overview"), ("/machine", "Machine detail"),
              ("/labels", "Labelling queue"), ("/models", "Model versions"), ("/health", "System health")]


def _no_exception(page: Page, where: str) -> None:
    boxes = page.d.find_elements("css selector", '[data-testid="stException"]')
    if boxes:
        page.shot(f"exception-{where.strip('/') or 'root'}")
    assert not boxes, f"{where}: Streamlit exception box: {boxes[0].text[:2000]}"
    assert "Page not found" not in page.body(), f"{where}: Page not found"


def _sign_in(driver, page: Page, name: str, password: str) -> None:
    """Sign in from the sidebar, signing out first if someone is; waits for the sidebar to draw
    (a page's title can be on screen before its sidebar form is)."""
    user_field, password_field = 'input[aria-label="User"]', 'input[aria-label="Password"]'

    def sidebar() -> str | None:
        if any(b.text == "Sign out" for b in driver.find_elements("css selector", "button")):
            return "signed in"
        return "form" if driver.find_elements("css selector", user_field) else None

    if page.poll(sidebar, "the sidebar's sign-in form or sign-out button") == "signed in":
        page.click_button("Sign out")
        page.wait_idle()

    def fill() -> bool:
        for field, value in ((user_field, name), (password_field, password)):
            el = driver.find_element("css selector", field)
            el.clear()
            el.send_keys(value)
        return True

    page.poll(lambda: driver.find_elements("css selector", user_field), "the sign-in form")
    page.poll(fill, "the sign-in form filled in")
    page.click_button("Sign in")
    page.wait_text(f"Signed in as {name}")


def _no_markup_from(driver, text_snippet: str) -> None:
    """The hostile note is text: no element or link made from it, and its characters are shown."""
    assert not driver.find_elements("css selector", 'img[src="x"]'), "a label note became an <img> element"
    assert not driver.find_elements("css selector", 'a[href^="http://e"]'), "a label note became a link"
    body = driver.find_element("tag name", "body").text.replace("\u2060", "")  # md()'s invisible link breakers
    assert text_snippet in body, body[:3000]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_browser_every_page_of_the_readme_demo(tmp_path: Path) -> None:
    """`pdm-edge demo`'s own state and configuration: every page (and /fleet) renders without an
    exception box; the technician labels the alert (a note with HTML and Markdown in it, shown as
    text); the envelope spectrum marks BPFO; after a retrain the engineer promotes and rolls back."""
    import re

    from tests.conftest import run_cli

    _need_browser()
    from pdm_edge.config import load_config
    from pdm_edge.feedback import LabelBook
    from pdm_edge.registry import Registry

    state = tmp_path / "demo"
    r = run_cli("demo", "--speed", "max", "--no-dashboard", "--state-dir", str(state), timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    creds = {role: (n, p) for n, p, role in re.findall(r"(\w+) / (\S+) \((technician|engineer)\)", r.stdout)}
    cfg_path = state / "pdm-edge.toml"
    cfg = load_config(cfg_path, environ={})
    shots = tmp_path / "screenshots"
    shots.mkdir()
    app = Streamlit(cfg_path, tmp_path / "streamlit.log")
    driver = None
    try:
        app.wait()
        driver = _driver()
        page = Page(driver, shots)
        for path, title in DEMO_PAGES:
            driver.get(app.url + path)
            page.wait_text(title)
            page.wait_idle()
            time.sleep(1.0)  # charts and tables draw after the script run
            _no_exception(page, path)
            page.shot(f"demo{path.replace('/', '-') or '-root'}")
        body = page.wait_text("System health")
        assert "Service not reachable" in body  # the demo's appliance has ended: said, not a traceback

        # the technician labels the open alert
        driver.get(app.url + "/labels")
        page.wait_text("Labelling queue")
        _sign_in(driver, page, *creds["technician"])
        page.wait_text("Unlabelled alerts (1)", "open alert")
        page.wait_idle()
        form = page.main().find_elements("css selector", '[data-testid="stForm"]')[0]
        next(lb for lb in form.find_elements("css selector", "label") if lb.text.startswith("fault")).click()
        note = form.find_element("css selector", 'textarea[aria-label="Note"]')
        note.send_keys(HOSTILE_NOTE)
        from selenium.webdriver.common.keys import Keys

        note.send_keys(Keys.TAB)
        page.click_button("Save label", within=form)
        page.wait_text("Label saved", "Unlabelled alerts (0)")
        page.wait_idle()
        _no_markup_from(driver, "<img src=x onerror=alert(1)> [x](http://e)")
        page.shot("demo-labelled")
        with LabelBook.in_dir(cfg.feedback.state_dir) as book:
            assert [(lb.kind, lb.note) for lb in book.list(machine="pump-01")] == [("fault", HOSTILE_NOTE)]

        # the machine page: the label as text, the envelope spectrum with the bearing's defect frequencies
        driver.get(app.url + "/machine")
        page.wait_text("Machine detail", "Envelope spectrum", "BPFO", "SKF 6205", "ISO 20816-3: zone", "mm/s",
                       "Vibration severity (ISO 20816-3)")
        page.wait_idle()
        time.sleep(1.0)
        _no_exception(page, "/machine")
        page.shot("demo-machine")
        next(t for t in driver.find_elements("css selector", '[role="tab"]') if t.text.startswith("Labels")).click()
        page.wait_text("by " + creds["technician"][0])
        _no_markup_from(driver, "<img src=x onerror=alert(1)> [x](http://e)")
        for el in driver.find_elements("css selector", "h5"):
            if "Spectrum of an alert" in el.text:
                driver.execute_script("arguments[0].scrollIntoView()", el)
        time.sleep(1.0)
        page.shot("demo-machine-spectra")

        # the label retrains (what the running demo does by itself); the engineer promotes and rolls back
        stream = "demo/pump-01/de-accel"
        t = run_cli("--config", str(cfg_path), "models", "train", stream, "--now", timeout=400)
        assert t.returncode == 0, t.stdout[-3000:] + t.stderr[-3000:]
        with Registry(cfg.registry.dir, create=False) as reg:
            versions = {v.id: v.status for v in reg.list()}
        assert len(versions) == 2, versions
        driver.get(app.url + "/models")
        page.wait_text("Model versions")
        _sign_in(driver, page, *creds["engineer"])
        page.wait_text("Promote…", "Roll back…")
        page.wait_idle()
        page.shot("demo-models-engineer")
        with Registry(cfg.registry.dir, create=False) as reg:
            before = reg.active("demo", "pump-01", "de-accel").id
        # promote the other version (overriding the gate if it rejected it), then roll back
        force = [c for c in driver.find_elements("css selector", 'input[type="checkbox"]') if c.is_enabled()]
        if force:
            force[0].find_element("xpath", "..").click()
            page.wait_idle()
        page.click_button("Promote…")
        page.wait_text("Confirm")
        page.click_button("Confirm")
        page.wait_text("is now the active version")
        page.wait_idle()
        with Registry(cfg.registry.dir, create=False) as reg:
            promoted = reg.active("demo", "pump-01", "de-accel").id
        assert promoted != before
        page.click_button("Roll back…")
        page.wait_text("Confirm")
        page.click_button("Confirm")
        page.wait_text("Rolled back")
        page.wait_idle()
        _no_exception(page, "/models")
        page.shot("demo-models-rolled-back")
        with Registry(cfg.registry.dir, create=False) as reg:
            assert reg.active("demo", "pump-01", "de-accel").id == before

        # a package whose manifest holds markup (trigger, exported id) is refused by the registry
        # (issue 15: ids are validated like names), and the pages stay clean
        import json
        import zipfile

        pkg, hostile = tmp_path / "v.zip", tmp_path / "hostile.zip"
        e = run_cli("--config", str(cfg_path), "models", "export", before, str(pkg))
        assert e.returncode == 0, e.stderr
        with zipfile.ZipFile(pkg) as z:
            files = {n: z.read(n) for n in z.namelist() if n != "manifest.sig"}
        manifest = json.loads(files["manifest.json"])
        manifest.update(trigger="<img src=y onerror=alert(2)> [t](http://t.example)", id="**bold** <b>x</b> http://t.example",
                        created_ns=time.time_ns())
        files["manifest.json"] = json.dumps(manifest).encode()
        with zipfile.ZipFile(hostile, "w") as z:
            for n, b in files.items():
                z.writestr(n, b)
        with Registry(cfg.registry.dir, create=False) as reg:
            n_versions = len(reg.list())
        i = run_cli("--config", str(cfg_path), "models", "import", str(hostile))
        assert i.returncode == 1 and "must match" in i.stderr and "Traceback" not in i.stderr, i.stderr
        with Registry(cfg.registry.dir, create=False) as reg:
            assert len(reg.list()) == n_versions
        for path, title in (("/models", "Model versions"), ("/health", "System health"), ("/labels", "Labelling queue")):
            driver.get(app.url + path)
            page.wait_text(title)
            page.wait_idle()
            _no_exception(page, path)
            assert not driver.find_elements("css selector", 'img[src="y"]'), f"{path}: a manifest field became an <img>"
            assert not driver.find_elements("css selector", 'a[href^="http://t"]'), f"{path}: a manifest field became a link"
    finally:
        if driver is not None:
            driver.quit()
        app.stop()
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for p in shots.glob("*.png"):
            shutil.copy(p, SCREENSHOTS / f"readme-demo-{p.name}")
