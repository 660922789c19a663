"""A notebook used as a person uses it: JupyterLab in headless Chromium, driven by Selenium.

The test starts `jupyter lab` on localhost (a copy of notebook 00 in a temporary folder, so
the repository's notebook never gains outputs), opens the notebook, picks the project's
kernel ("dpbench (.venv)", which `make venv` registers) in JupyterLab's own kernel dialog,
runs every cell from the Run menu, saves, and checks that every code cell ran and that no
cell shows an error. A screenshot is kept in results/test-artifacts/.

Needs Debian's `chromium` and `chromium-driver` (a matched pair; `.ci/run` installs both)
and the `selenium` package (dev extra). Without them the test is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dpbench.workbench import runner

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "results" / "test-artifacts"  # git-ignored (results/*)
NOTEBOOK = "00_privacy_accounting.ipynb"
RUN_TIMEOUT_S = 300


def _binaries() -> tuple[str, str] | None:
    browser = os.environ.get("DPBENCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    driver = os.environ.get("DPBENCH_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if Path(browser).is_file() and Path(driver).is_file():
        return browser, driver
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {proc.returncode}: {log.read_text()[-1500:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"jupyter lab did not answer at {url} within {timeout:.0f} s")


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on localhost over a folder holding a copy of notebook 00."""
    if _binaries() is None:
        pytest.skip("Chromium and ChromeDriver are not installed (apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
    if runner.kernel_name() != runner.KERNEL_NAME:
        pytest.skip("the dpbench kernel is not registered in this environment (run `make venv`)")
    root = tmp_path / "lab"
    (root / "notebooks").mkdir(parents=True)
    shutil.copy(REPO / "notebooks" / NOTEBOOK, root / "notebooks" / NOTEBOOK)
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), DPBENCH_SCRATCH=str(tmp_path / "scratch"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"), OMP_NUM_THREADS="1")
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False",
         *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),  # CI runs as root
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root,
    )
    try:
        _wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", proc, tmp_path / "lab.log")
        yield {"url": f"http://127.0.0.1:{port}", "token": token, "root": root, "log": tmp_path / "lab.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = _binaries()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts)


def _click_menu(drv, wait, top: str, item: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    wait.until(EC.element_to_be_clickable(
        (By.XPATH, f"//li[contains(@class,'lm-MenuBar-item')][.//div[normalize-space()='{top}']]"))).click()
    wait.until(EC.element_to_be_clickable(
        (By.XPATH, f"//li[contains(@class,'lm-Menu-item')][.//div[normalize-space()='{item}']]"))).click()


def test_notebook_00_runs_in_jupyterlab_with_the_project_kernel(lab):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    display = json.loads((Path(sys.prefix) / "share" / "jupyter" / "kernels" / runner.KERNEL_NAME
                          / "kernel.json").read_text())["display_name"]
    drv = _driver()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "jupyterlab_00_privacy_accounting.png"
    try:
        wait = WebDriverWait(drv, 90)
        drv.get(f"{lab['url']}/lab/tree/notebooks/{NOTEBOOK}?token={lab['token']}")
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".jp-Notebook .jp-CodeCell")))
        # Pick the project's kernel through JupyterLab's own dialog, as a person would.
        _click_menu(drv, wait, "Kernel", "Change Kernel…")
        select = Select(wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".jp-Dialog select"))))
        select.select_by_visible_text(display)
        drv.find_element(By.CSS_SELECTOR, ".jp-Dialog .jp-mod-accept").click()
        wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, ".jp-Toolbar-kernelName"), display))
        _click_menu(drv, wait, "Run", "Run All Cells")
        # Every code cell gets an execution count ("[n]:"); none stays queued ("[*]:").
        WebDriverWait(drv, RUN_TIMEOUT_S, poll_frequency=1).until(lambda d: all(
            p.text.strip() not in ("", "[ ]:", "[*]:")
            for p in d.find_elements(By.CSS_SELECTOR, ".jp-CodeCell .jp-InputPrompt")))
        _click_menu(drv, wait, "File", "Save Notebook")
        time.sleep(2)
        drv.save_screenshot(str(shot))
    except Exception:
        drv.save_screenshot(str(shot))
        raise
    finally:
        drv.quit()

    saved = json.loads((lab["root"] / "notebooks" / NOTEBOOK).read_text())
    code = [c for c in saved["cells"] if c["cell_type"] == "code"]
    assert saved["metadata"]["kernelspec"]["name"] == runner.KERNEL_NAME
    assert all(c["execution_count"] for c in code), "a code cell did not run"
    errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"{errors[0]['ename']}: {errors[0]['evalue']}"
    images = [o for c in code for o in c["outputs"] if "image/png" in o.get("data", {})]
    assert images, "the notebook drew no figure"
    assert shot.is_file() and shot.stat().st_size > 10_000
