"""Every explorer of kvlab.widgets in a real browser: JupyterLab headless on a loopback port (with a
token), a generated notebook that shows each explorer on the built-in model, and Chromium driven by
Playwright: change a control, check the output changes. Screenshots go to build/browser/.

Needs Debian's ``chromium`` (``apt-get install -y chromium``; .ci/run installs it) and Playwright from
PyPI (the dev extra); Playwright never downloads a browser here, it launches /usr/bin/chromium.
"""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "build" / "browser"
CHROMIUM = os.environ.get("KVLAB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
START_TIMEOUT = 90        # s for the server to answer
CELL_TIMEOUT = 180_000    # ms for the set-up cell (model, mining, tracing, neurons, two LoRA runs)
CHANGE_TIMEOUT = 60_000   # ms for one explorer's output to change


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set KVLAB_CHROMIUM)"
    return None


if _missing():
    pytest.skip(_missing(), allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402

SETUP = """\
import kvlab, torch
from kvlab import lora, lora_train, triggers, widgets
from kvlab.data import load_counterfact, load_known
from kvlab.editing import EditRequest, ft_keys, ft_values
from kvlab.world import build_world, corpus_texts
torch.manual_seed(0)
torch.set_num_threads(1)   # the machine is shared with the browser and the server
model, tok, arch = kvlab.load()
index = triggers.mine_triggers(model, tok, corpus_texts(80), k=5, progress=False)
facts = load_known(model=model)[:2]
req = EditRequest.from_counterfact(load_counterfact(model=model)[0])
kn_facts = {f"{f.subject} -> {f.attribute}": ([f.prompt], f.attribute) for f in facts}
train_set, test_set = lora_train.world_tasks(build_world(0), n_train=8, n_test=4, seed=0)
config = lora_train.TrainConfig(epochs=1, batch_size=8, lr=1e-3, progress=False)
train = lambda role, r: lora_train.train(lora.wrap(model, role, r=r), tok, train_set, test_set, config)
runs = {(role, 2): train(role, 2) for role in ("keys", "values")}
print("ready")
"""

# name -> (cell source, how to change a control)
EXPLORERS = {
    "memories": "widgets.explore_memories(model, tok, index)",
    "lens": "widgets.explore_lens(model, tok, 'Uwe Keller was born in')",
    "editing": ("widgets.explore_editing(model, tok, {'FT-values': lambda m, t, r: ft_values(m, t, r, layers=[0], "
                "steps=3, lr=1e-2), 'FT-keys': lambda m, t, r: ft_keys(m, t, r, layers=[0], steps=3, lr=1e-2)}, "
                "req.prompt, req.subject, req.target_new)"),
    "tracing": "widgets.explore_tracing(model, tok, facts, noise=0.1, samples=2, window=3)",
    "neurons": "widgets.explore_neurons(model, tok, kn_facts, steps=4)",
    "lora": "widgets.explore_lora(train, roles=['keys', 'values'], ranks=[2], cache=runs)",
}


def _notebook(path: Path) -> None:
    def cell(src):
        return {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": src}
    nb = {"cells": [cell(SETUP)] + [cell(src) for src in EXPLORERS.values()],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, method: str = "GET", timeout: float = 5):
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=timeout) as r:
        return r.status


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(base URL, token) of a JupyterLab serving a folder with explorers.ipynb; shut down afterwards."""
    root = tmp_path_factory.mktemp("lab")
    _notebook(root / "explorers.ipynb")
    port, token = _free_port(), secrets.token_hex(16)
    settings = root / ".settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')   # no news toast
    settings = root / ".settings"
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}   # the kernel draws inline, as in `make lab`
    env.update(JUPYTER_CONFIG_DIR=str(root / ".config"), JUPYTER_RUNTIME_DIR=str(root / ".runtime"),
               JUPYTERLAB_WORKSPACES_DIR=str(root / ".workspaces"), JUPYTERLAB_SETTINGS_DIR=str(settings), PYTHONPATH=os.pathsep.join(
                   [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
    log = open(root / "server.log", "w")
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--ServerApp.allow_root=True", "--LabApp.expose_app_in_browser=True",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    server = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if server.poll() is not None:
                pytest.fail(f"jupyter lab exited with {server.returncode}:\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                if _api(f"{base}/api/status?token={token}") == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not answer in {START_TIMEOUT} s:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield base, token
    finally:
        try:
            _api(f"{base}/api/shutdown?token={token}", method="POST")   # stops the kernels, then the server
            server.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=10)
        log.close()


def _change(name: str, cell) -> None:
    """Change one control of explorer ``name`` (as a learner would)."""
    if name == "memories":
        box = cell.locator(".widget-text input").first       # the key
        box.fill("1")
        box.press("Enter")
    elif name == "lens":
        box = cell.locator(".widget-text input").first       # the prompt
        box.fill("Anna Berg works for")
        box.press("Enter")
    elif name == "editing":
        cell.locator("select").first.select_option(label="FT-keys")
        cell.get_by_role("button", name="edit").click()
    elif name == "tracing":
        cell.get_by_role("button", name="mlp", exact=True).click()
    elif name in ("neurons", "lora"):
        cell.locator("select").first.select_option(index=1)


def test_each_explorer_reacts_in_jupyterlab(lab):
    base, token = lab
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    t0 = time.monotonic()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = None
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(f"{base}/lab/tree/explorers.ipynb?token={token}", timeout=90_000)
            page.wait_for_function("window.jupyterapp && window.jupyterapp.shell.currentWidget "
                                   "&& window.jupyterapp.shell.currentWidget.sessionContext "
                                   "&& window.jupyterapp.shell.currentWidget.sessionContext.session "
                                   "&& window.jupyterapp.shell.currentWidget.sessionContext.session.kernel "
                                   "&& window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"
                                   ".connectionStatus === 'connected'", timeout=90_000)
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            cells = page.locator(".jp-Notebook .jp-CodeCell")
            expect(cells.nth(0).locator(".jp-OutputArea").first).to_contain_text("ready", timeout=CELL_TIMEOUT)
            print(f"set-up cell done at {time.monotonic() - t0:.1f} s")
            for i, name in enumerate(EXPLORERS, start=1):
                cell = cells.nth(i)
                out = cell.locator(".widget-output")
                expect(out.locator("img, table, pre").first).to_be_visible(timeout=CHANGE_TIMEOUT)
                cell.scroll_into_view_if_needed()
                page.wait_for_timeout(300)          # let the images lay out before the screenshot
                before = out.inner_html()
                assert cell.locator(".kvlab-static").count() == 1, f"{name}: no static block emitted"
                assert cell.locator(".kvlab-static").is_hidden(), f"{name}: static block visible in Lab"
                cell.screenshot(path=str(SHOTS / f"{i}_{name}_default.png"))
                _change(name, cell)
                deadline = time.monotonic() + CHANGE_TIMEOUT / 1000
                while out.inner_html() == before or not out.locator("img, table, pre").count():
                    assert time.monotonic() < deadline, f"{name}: the output did not change"
                    page.wait_for_timeout(250)
                page.wait_for_timeout(300)
                cell.screenshot(path=str(SHOTS / f"{i}_{name}_changed.png"))
                print(f"{name} changed at {time.monotonic() - t0:.1f} s")
            page.screenshot(path=str(SHOTS / "notebook.png"), full_page=True)
        except Exception:
            if page is not None:
                page.screenshot(path=str(SHOTS / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
