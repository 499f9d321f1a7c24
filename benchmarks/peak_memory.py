"""Peak resident memory of a benchmark process, on Linux.

``ru_maxrss`` keeps the highest RSS since the process began, imports included, so a rise over it
under-counts whatever fits below an import-time peak. Writing 5 to /proc/self/clear_refs resets
the peak (VmHWM) to the current RSS: call ``reset()`` after the imports, ``rise_mib()`` at the end.

RSS counts file-backed pages too: the parts of libtorch and friends that a code path touches for the
first time, and memory-mapped weight files. On a model as small as the toy's these are a large share
of the rise and the same for any training loop, so ``reset(split=True)`` also samples, every
millisecond in a thread, the anonymous part (``RssAnon``: tensors, allocator arenas, Python objects)
and the file-backed part; ``split_mib()`` gives their peak rises. The kernel keeps no peak of those,
so a spike shorter than the sampling interval can be missed; VmHWM (``rise_mib``) misses nothing."""

import threading
import time


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakRSS:
    SPLIT_FIELDS = ("RssAnon", "RssFile")

    def reset(self, split: bool = False) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base_kib = _status_kib("VmRSS")
        if split:
            self._split_base = {k: _status_kib(k) for k in self.SPLIT_FIELDS}
            self._split_peak = dict(self._split_base)
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            for k in self.SPLIT_FIELDS:
                self._split_peak[k] = max(self._split_peak[k], _status_kib(k))
            time.sleep(0.001)

    def rise_mib(self) -> float:
        return (_status_kib("VmHWM") - self.base_kib) / 1024

    def split_mib(self) -> dict:
        """Sampled peak rises: {"anon": MiB, "file": MiB} (needs ``reset(split=True)``)."""
        for k in self.SPLIT_FIELDS:  # one last reading, in case the peak is now
            self._split_peak[k] = max(self._split_peak[k], _status_kib(k))
        return {k[3:].lower(): (self._split_peak[k] - self._split_base[k]) / 1024 for k in self.SPLIT_FIELDS}
