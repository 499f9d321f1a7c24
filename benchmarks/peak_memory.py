"""Peak resident memory of a benchmark process, on Linux.

``ru_maxrss`` keeps the highest RSS since the process began, imports included, so a rise over it
under-counts whatever fits below an import-time peak. Writing 5 to /proc/self/clear_refs resets
the peak (VmHWM) to the current RSS: call ``reset()`` after the imports, ``rise_mib()`` at the end."""


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakRSS:
    def reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base_kib = _status_kib("VmRSS")

    def rise_mib(self) -> float:
        return (_status_kib("VmHWM") - self.base_kib) / 1024
