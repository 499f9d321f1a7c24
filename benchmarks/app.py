"""``esd app`` measured as a user meets it: the page's load time, the time from pressing Train (the toy model, the
form's defaults: the demo's 1000 iterations of ESD-x on "green") to the side-by-side images in the Test tab, and
the app process's memory. The app runs as ``python app.py`` in its own process (a fresh runs folder); Debian's
chromium, headless, driven by Playwright, clicks as a person would. A screenshot of each tab goes to --out.

    python benchmarks/app.py --out app-shots            # about 2 minutes on 2 cores
    python benchmarks/app.py --iterations 200 --loads 10

Prints each figure, then one JSON line with the settings, the versions and the git commit.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from esd.formats.records import environment_record  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def wait_for_server(url: str, timeout: float = 120) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            urllib.request.urlopen(url, timeout=2)
            return time.monotonic() - start
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"the app did not answer at {url} within {timeout} s")


class PeakMemory(threading.Thread):
    """The app process's resident memory (with its children), sampled every 0.1 s: the peak and the last."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.process, self.peak, self.last, self.stop = psutil.Process(pid), 0, 0, threading.Event()

    def rss(self) -> int:
        return sum(p.memory_info().rss for p in [self.process, *self.process.children(recursive=True)])

    def run(self):
        while not self.stop.is_set():
            self.last = self.rss()
            self.peak = max(self.peak, self.last)
            time.sleep(0.1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="app-shots", help="folder for the screenshots")
    p.add_argument("--iterations", type=int, default=1000, help="training iterations (default: the form's 1000)")
    p.add_argument("--loads", type=int, default=5, help="page loads timed (default: %(default)s)")
    p.add_argument("--port", type=int, default=7861)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = tempfile.mkdtemp(prefix="esd-app-bench-")
    env = {**os.environ, "ESD_CACHE": tempfile.mkdtemp(prefix="esd-app-cache-")}
    url = f"http://127.0.0.1:{args.port}/"
    started = time.monotonic()
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--runs", runs, "--devices", "cpu", "--port",
                               str(args.port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_server(url)
        startup = time.monotonic() - started
        memory = PeakMemory(server.pid)
        idle_rss = memory.rss()
        memory.start()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            loads = []
            for _ in range(args.loads):
                t = time.monotonic()
                page.goto(url)
                page.wait_for_selector("#train-button")
                loads.append(time.monotonic() - t)
            page.locator("#iterations input").fill(str(args.iterations))
            page.locator("#train-button").click()
            pressed = time.monotonic()
            page.wait_for_function("document.querySelector('#train-status').innerText.includes('done')",
                                   timeout=900_000)
            trained = time.monotonic()
            page.screenshot(path=str(out / "train.png"), full_page=True)
            page.get_by_role("tab", name="Test").click()
            page.locator("#test-button").click()
            page.wait_for_function("document.querySelectorAll('#erased-images img').length == 4", timeout=300_000)
            drawn = time.monotonic()
            page.screenshot(path=str(out / "test.png"), full_page=True)
            for tab in ("Evaluate", "Attack", "Export"):
                page.get_by_role("tab", name=tab).click()
                time.sleep(0.5)
                page.screenshot(path=str(out / f"{tab.lower()}.png"), full_page=True)
            browser.close()
        memory.stop.set()
        memory.join()
    finally:
        server.terminate()
        server.wait(30)
    figures = {
        "app_startup_s": round(startup, 2),
        "page_load_s": {"mean": round(statistics.mean(loads), 3), "min": round(min(loads), 3),
                        "max": round(max(loads), 3), "loads": len(loads)},
        "train_pressed_to_done_s": round(trained - pressed, 1),
        "train_pressed_to_side_by_side_s": round(drawn - pressed, 1),
        "rss_idle_mib": round(idle_rss / 2**20), "rss_peak_mib": round(memory.peak / 2**20),
        "rss_after_mib": round(memory.last / 2**20),
    }
    print(f"app start {startup:.1f} s; page load {figures['page_load_s']['mean']:.2f} s (mean of {len(loads)}, "
          f"{min(loads):.2f}-{max(loads):.2f}); Train ({args.iterations} iterations, toy) -> done "
          f"{trained - pressed:.1f} s -> side-by-side images {drawn - pressed:.1f} s; app memory (RSS) idle "
          f"{figures['rss_idle_mib']} MiB, peak {figures['rss_peak_mib']} MiB; screenshots in {out}")
    print(json.dumps({"benchmark": "app", "settings": vars(args), "figures": figures,
                      "cores": os.cpu_count(), "environment": environment_record()}))


if __name__ == "__main__":
    main()
