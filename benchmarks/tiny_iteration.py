"""Seconds per ESD iteration on the tiny SD1.x / SD2.x / SDXL test models, both paths, and the peak RSS
of each run (a fresh process per run; rise over the RSS after imports).

    python benchmarks/tiny_iteration.py
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from peak_memory import PeakRSS  # noqa: E402 - benchmarks/ is on sys.path when run as a script

PATHS = ("paper", "fast")  # presets of esd.train.presets.PRESETS


def child(folder: str, path: str, iterations: int) -> dict:
    from esd.train.config import ESDConfig
    from esd.train.recipe import ESDTrainer

    peak = PeakRSS()
    peak.reset()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = ESDTrainer(ESDConfig(prompt="cat", train_method="xattn", base_model=folder, iterations=iterations,
                                       preset=path, seed=0, save_path=tmp, devices="cpu"))
        trainer.setup()
        start = time.perf_counter()
        trainer.train()
        seconds = (time.perf_counter() - start) / iterations
    return {"s_per_it": seconds, "rss_rise_mib": peak.rise_mib()}


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        return
    import tiny

    with tempfile.TemporaryDirectory() as root:
        for family in ("sd1", "sd2", "sdxl"):
            folder = str(tiny.build(family, Path(root) / family))
            for path in PATHS:
                out = subprocess.run([sys.executable, __file__, "--child", folder, path, "20"], capture_output=True,
                                     text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{family:>4} {path:>5}: {r['s_per_it']:.3f} s/iteration, peak RSS rise "
                      f"{r['rss_rise_mib']:.0f} MiB (128 px, 50 DDIM steps, batch 1, ESD-x)", flush=True)


if __name__ == "__main__":
    main()
