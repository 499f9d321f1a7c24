"""``esd app`` end to end in a real headless browser (Debian's chromium, driven by Playwright): open the page, train
20 iterations on the toy model and see the progress bar move, see the base and erased images side by side with the
judge's verdicts, attack the erasure, export a LoRA, download it and load it into a diffusers pipeline. A screenshot
of each tab is saved in the test's temporary folder.

It needs chromium (``apt-get install chromium``) and the playwright package; without them it is skipped, unless
ESD_REQUIRE_BROWSER is set (``.ci/run`` sets it and installs both), when their absence fails it."""

import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import free_port

from esd.app.actions import Pipelines
from esd.app.jobs import TrainingQueue
from esd.app.runs import RunsFolder
from esd.app.ui import build_app, launch
from esd.families.sources import resolve_source
from esd.formats.weights import load_erased_unet, run_weight_files

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root in a container, chromium needs --no-sandbox; this machine's closed network refuses its background
# connections, so they are turned off.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    sync_playwright = None

if not (os.path.exists(CHROMIUM) and sync_playwright is not None):
    if os.environ.get("ESD_REQUIRE_BROWSER"):
        raise RuntimeError(f"ESD_REQUIRE_BROWSER is set but chromium ({CHROMIUM}) or playwright is missing")
    pytest.skip("chromium or playwright not installed (apt-get install chromium; pip install playwright)",
                allow_module_level=True)

ITERATIONS = 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runs = RunsFolder(tmp_path_factory.mktemp("app") / "runs")
    queue = TrainingQueue(("cpu",), on_finish=lambda job: runs.changed())  # as esd app wires them
    app = build_app(runs, queue, Pipelines("cpu"), poll_seconds=0.1)
    port = free_port()
    launch(app, runs, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/", runs, queue
    app.close()


@pytest.fixture(scope="module")
def page(server):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True).new_page()
        yield page
        browser.close()


def status(page, element: str, contains: str, timeout: float = 120) -> str:
    """The text of the status line ``element`` once it contains ``contains`` (or an error)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = page.locator(element).inner_text()
        if contains in text or "Error:" in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{element} never showed {contains!r}; it shows {text!r}")


def chosen(page, element: str, run: str) -> None:
    """Wait until the erasure list ``element`` shows ``run``, as a person sees it filled before pressing a button
    (a tab's list is refreshed when the tab opens)."""
    page.wait_for_function(f"document.querySelector('{element} input').value == '{run}'", timeout=30_000)


def test_train_test_attack_export_in_the_browser(server, page, tmp_path):
    url, runs, queue = server
    started = time.monotonic()
    page.goto(url)
    page.wait_for_selector("#train-button")
    load_seconds = time.monotonic() - started
    page.screenshot(path=str(tmp_path / "train-tab.png"), full_page=True)

    # -- Train: 20 iterations on the toy, the progress bar read while it moves --------------------------------
    page.locator("#iterations input").fill(str(ITERATIONS))
    page.locator("#train-button").click()
    other = page.context.browser.new_context().new_page()  # a second browser: another session, the same trainings
    other.goto(url)
    other.locator("#cancel-button").click()
    line = status(other, "#train-message", "Error:")
    assert "this page has no training" in line, line  # it cannot cancel the first page's training
    pressed = time.monotonic()
    seen = set()
    end = time.monotonic() + 120
    while "done" not in (text := page.locator("#train-status").inner_text()) and time.monotonic() < end:
        assert "Error" not in text and "failed" not in text, text
        bar = page.locator("#train-bar")
        if bar.count():
            seen.add(int(bar.get_attribute("value")))
        time.sleep(0.05)
    assert "done" in text, text
    assert any(0 < v < ITERATIONS for v in seen), f"the progress bar never showed a step between: {sorted(seen)}"
    name = text.split("(")[1].split(")")[0]
    other.wait_for_function(f"document.querySelector('#runs').innerText.includes('{name}')")  # it lists the run
    other.close()
    page.wait_for_function(f"document.querySelector('#train-bar').value == {ITERATIONS}")
    page.screenshot(path=str(tmp_path / "train-done.png"), full_page=True)
    (job,) = queue.jobs()
    assert job.state == "done" and len(job.losses) == ITERATIONS
    run = job.run_dir
    assert (run / "args.json").is_file() and (run / "loss.csv").is_file() and (run / "README.md").is_file()

    # -- Test: the run is chosen; both sides from the same seeds, each image with its verdict ----------------------
    page.get_by_role("tab", name="Test").click()
    chosen(page, "#test-erasure", name)
    page.locator("#test-button").click()
    line = status(page, "#test-status", "seeds")
    assert "Error" not in line, line
    page.wait_for_function("document.querySelectorAll('#erased-images img').length == 4")
    drawn = time.monotonic()
    assert page.locator("#base-images img").count() == 4
    captions = page.locator("#erased-images").inner_text()
    assert "seed 0:" in captions and "seed 3:" in captions
    page.screenshot(path=str(tmp_path / "test-tab.png"), full_page=True)

    # -- a bad input is one line in the page ------------------------------------------------------------------
    page.locator("#test-prompt textarea").fill("")
    page.locator("#test-button").click()
    line = status(page, "#test-status", "Error:")
    assert line.startswith("Error:") and "prompt is empty" in line and "\n" not in line.strip(), line
    assert "Traceback" not in page.content()

    # -- Evaluate: the tab as it opens (its measurement is tested in test_app.py) ---------------------------------
    page.get_by_role("tab", name="Evaluate").click()
    page.screenshot(path=str(tmp_path / "evaluate-tab.png"), full_page=True)

    # -- Attack: a short prefix attack ------------------------------------------------------------------------
    page.get_by_role("tab", name="Attack").click()
    chosen(page, "#attack-erasure", name)
    page.locator("#attack-steps textarea").fill("2")
    page.locator("#attack-seeds textarea").fill("0")
    page.locator("#attack-button").click()
    line = status(page, "#attack-status", "judged present")
    assert "Error" not in line and "under the prefix attack" in line, line
    page.screenshot(path=str(tmp_path / "attack-tab.png"), full_page=True)

    # -- Export: a LoRA, downloaded, loaded into diffusers ------------------------------------------------------
    page.get_by_role("tab", name="Export").click()
    chosen(page, "#export-erasure", name)
    page.locator("#export-button").click()
    line = status(page, "#export-status", "export of")
    assert "Error" not in line and "lora" in line, line
    page.wait_for_selector("#export-file a[download]")
    assert "/.gradio/" in page.locator("#export-file a[download]").get_attribute("href")  # a copy in Gradio's cache
    with page.expect_download() as download:
        page.locator("#export-file a[download]").click()
    path = tmp_path / "downloaded-lora.safetensors"
    download.value.save_as(path)
    assert "green" in page.locator("#model-card").inner_text()  # the run's model card, shown
    page.screenshot(path=str(tmp_path / "export-tab.png"), full_page=True)

    pipe = StableDiffusionPipeline.from_pretrained(resolve_source("toy"), safety_checker=None,
                                                   requires_safety_checker=False)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(path))  # as a diffusers user loads it (peft)
    pipe.fuse_lora()
    fused = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    erased = load_erased_unet(run_weight_files(run)["trained"], base_model="toy").state_dict()
    changed = [k for k in erased if not torch.equal(erased[k], base[k]) and k.endswith(".weight")]
    assert changed
    for k in changed:  # the LoRA holds the erasure's change of every weight (rank auto: within 1% per layer)
        delta, got = erased[k] - base[k], fused[k] - base[k]
        assert (got - delta).norm() <= 0.02 * delta.norm() + 1e-6, k

    print(f"\npage load {load_seconds:.2f} s; Train pressed -> side-by-side images {drawn - pressed:.1f} s; "
          f"screenshots in {tmp_path}")


def test_only_gradios_own_cache_is_served(server):
    """Files outside the runs folder, and the runs folder's own files (weights, records, other users' uploads), are
    refused; a file uploaded through Gradio is served as a download, never as a page (no stored script)."""
    import httpx

    url, runs, _ = server
    outside = Path(runs.root).parent / "secret.txt"
    outside.write_text("not for the browser")
    inside = Path(runs.root) / "uploads" / "someone-else.safetensors"
    inside.parent.mkdir(exist_ok=True)
    inside.write_bytes(b"\0" * 16)
    for target in (outside, Path("/etc/passwd"), Path(resolve_source("toy")) / "model_index.json", inside):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}gradio_api/file={target}")
        assert refused.value.code == 403, target
    sent = httpx.post(f"{url}gradio_api/upload", files={"files": ("x.html", b"<script>alert(1)</script>",
                                                                  "text/html")})
    (stored,) = sent.json()
    assert Path(stored).is_relative_to(Path(runs.root) / ".gradio")
    got = httpx.get(f"{url}gradio_api/file={stored}")
    assert got.status_code == 200 and got.headers["content-type"] == "application/octet-stream"
    assert got.headers["content-disposition"].startswith("attachment")
