"""Devices named on the command line (--device, --devices): parsed and checked before any model loads."""

import re

import torch

DEVICE_CHOICES = "cpu, cuda, cuda:N (N a GPU index, or N alone), mps"


def check_device(device, flag: str = "--device") -> torch.device:
    """The one device a pipeline runs on: ``cpu``, ``cuda``, ``cuda:N`` (or ``N``), ``mps``, or a
    ``torch.device`` of those; None -> the first GPU if any, else the CPU. Anything else, or a device this
    machine lacks, is a one-line ValueError naming ``flag`` and the valid choices (before any model loads)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device).strip() if isinstance(device, (str, torch.device)) else None
    match = re.fullmatch(r"(cpu|cuda|mps)(?::([0-9]+))?|([0-9]+)", text or "")
    if match is None:
        raise ValueError(f"{flag} {device!r} is not a device; valid: {DEVICE_CHOICES}")
    kind, index = (match[1], match[2]) if match[3] is None else ("cuda", match[3])
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(index or 0) >= count:
            raise ValueError(f"{flag} {device!r} asks for a GPU but {count} CUDA devices are available; valid: "
                             f"cpu{', cuda:0' if count else ''}{f' to cuda:{count - 1}' if count > 1 else ''}")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {device!r}: MPS is not available on this machine; valid: cpu"
                         f"{', cuda' if torch.cuda.is_available() else ''}")
    return torch.device(kind if index is None else f"{kind}:{index}")


def parse_devices(devices: str | None) -> list[torch.device]:
    """``"0,1"`` -> two CUDA devices; ``"cpu"``; ``None`` -> first GPU if any, else CPU."""
    if devices is None:
        return [torch.device("cuda:0" if torch.cuda.is_available() else "cpu")]
    out = []
    for item in devices.split(","):
        item = item.strip()
        if item == "cpu":
            out.append(torch.device("cpu"))
        elif re.fullmatch(r"[0-9]+|cuda(:[0-9]+)?", item):
            index = int(item.removeprefix("cuda").lstrip(":") or 0)
            if not torch.cuda.is_available():
                build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
                raise ValueError(f"device {item!r} requested but CUDA is not available ({build}); valid: 'cpu'")
            if index >= torch.cuda.device_count():
                count = torch.cuda.device_count()
                raise ValueError(f"device {item!r} requested but {count} CUDA devices are available; valid: 'cpu', "
                                 + ", ".join(f"'{i}'" for i in range(count)))
            out.append(torch.device(f"cuda:{index}"))
        else:
            raise ValueError(f"bad device {item!r}; use GPU indices such as '0' or '0,1', or 'cpu'")
    if len(out) > 2:
        raise ValueError("--devices takes at most two devices: trained model, frozen model")
    return out
