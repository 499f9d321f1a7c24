"""generation.json: what made a folder's pixels, so that a resumed or merged ``esd generate`` run is
only ever sound. See :mod:`esd.generate.images` for the fields and the rules."""

import fcntl
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

from esd.formats.records import PLAIN_NAME, atomic_write, read_json

RECORD = "generation.json"

LOCK = ".generation.lock"  # held while generation.json is read, merged and rewritten


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_sha256(folder) -> str:
    """sha256 over every file of a local model folder: relative path, size and sha256 of each, in path
    order. Hidden files and folders (``.cache/`` of a hub download, ``.git/``) are left out: they hold
    download metadata, not the model."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if not any(part.startswith(".") for part in relative.parts):
            h.update(f"{relative.as_posix()}\0{path.stat().st_size}\0{sha256(path)}\n".encode())
    return h.hexdigest()


def digest(obj) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys, no spaces): equal settings hash alike."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_record(folder) -> dict | None:
    """The folder's generation.json, or None when it has none."""
    path = Path(folder) / RECORD
    if not path.exists():
        return None
    record = read_json(path)
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a generation record (a JSON object)")
    return record


def image_names(rows: dict, num_samples: int) -> set[str]:
    """The file names of ``num_samples`` images per case; a case that is not a plain file name (a
    tampered record) names no file, so nothing outside the folder is ever touched."""
    return {f"{case}_{i}.png" for case in rows if PLAIN_NAME.fullmatch(case) for i in range(num_samples)}


def recorded_images(record: dict) -> set[str]:
    """The image files a generation record accounts for (none for a record without rows)."""
    if "rows" not in record or "fingerprint_settings" not in record:
        return set()
    return image_names(record["rows"], record["fingerprint_settings"]["num_samples"])


def _shown(key: str, value) -> str:
    if value is None:
        return "none"
    if key == "safety_checker":
        return "on" if value else "off"
    return value[:12] if key.endswith("sha256") else str(value)


def settings_differences(ours: dict, recorded: dict) -> list[str]:
    """Each fingerprinted setting that differs, phrased with its flag: '--guidance_scale 3.0 vs 7.5 recorded'."""
    labels = {"base_model_sha256": "base model files' sha256", "weights_sha256": "erased weights' sha256"}
    out = []
    for key in [*ours, *(k for k in recorded if k not in ours)]:
        a, b = ours.get(key), recorded.get(key)
        if a == b:
            continue
        label = labels.get(key, f"--{key}")
        if key in labels and a and b:
            out.append(f"{label} differ ({_shown(key, a)} vs {_shown(key, b)} recorded)")
        else:
            out.append(f"{label} {_shown(key, a)} vs {_shown(key, b)} recorded")
    return out


def row_differences(rows: dict, recorded: dict) -> list[str]:
    """Each case of ``rows`` that the record holds with another prompt or seed."""
    return [f"case {case!r}: {key} differs ({_clip(row[key])} vs {_clip(recorded[case].get(key))} recorded)"
            for case, row in rows.items() if case in recorded
            for key in ("prompt", "seed") if recorded[case].get(key) != row[key]]


def _clip(value, width: int = 60) -> str:
    text = repr(value)  # repr keeps a prompt's newlines out of a one-line message
    return text if len(text) <= width else text[:width - 3] + "..."


def _listed(items: list[str], first: int = 3) -> str:
    return "; ".join(items[:first]) + (f"; and {len(items) - first} more" if len(items) > first else "")


def check_folder(out: Path, settings: dict, rows: dict, num_samples: int) -> None:
    """Refuse to add images to ``out`` unless everything in it came from these settings: a run skips the
    files that exist, so a file made otherwise would pass as this run's."""
    if not out.is_dir():
        return
    # Listed before the record is read: a concurrent generator records its rows before writing their images.
    present = {p.name for p in out.glob("*.png")}
    record = read_record(out)
    hint = "use another --save_path, or --overwrite to start the folder over"
    if record is None:
        if present:
            raise ValueError(f"{out} holds {len(present)} PNG file(s) but no {RECORD}, so their provenance is "
                             f"unknown; {hint}")
        return
    if "settings_fingerprint" not in record or "rows" not in record:
        raise ValueError(f"{out / RECORD} has no settings fingerprint (an older esd wrote it); {hint}")
    if record["settings_fingerprint"] != digest(settings):
        differences = settings_differences(settings, record.get("fingerprint_settings", {}))
        raise ValueError(f"{out} was generated with other settings: {_listed(differences or ['fingerprint differs'])}"
                         f"; {hint}")
    if conflicts := row_differences(rows, record["rows"]):
        raise ValueError(f"{out}: {_listed(conflicts)}; {hint}")
    if unknown := sorted((image_names(rows, num_samples) & present) - recorded_images(record)):
        raise ValueError(f"{out}: {len(unknown)} image(s) this run would keep are not in {RECORD} "
                         f"({_listed(unknown)}); {hint}")


@contextmanager
def folder_lock(out: Path):
    """An exclusive lock on ``out/.generation.lock``: generators sharing a folder take turns to read,
    merge and rewrite generation.json (closing the file releases it, even when a run is killed)."""
    with open(out / LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def remove_recorded_images(out: Path, record: dict | None) -> None:
    """--overwrite: delete the images the old record names, and no other file."""
    for name in sorted(recorded_images(record or {})):
        (out / name).unlink(missing_ok=True)


def write_record(out: Path, cfg, settings: dict, rows: dict, run: dict) -> dict:
    """Write generation.json under the folder's lock and return it. Another generator may have written
    since this run's check: the record is re-read and checked again, and its rows merged with this run's;
    --overwrite instead deletes the images the old record names and keeps only this run's rows."""
    with folder_lock(out):
        if cfg.overwrite:
            try:
                remove_recorded_images(out, read_record(out))
            except ValueError:  # an unreadable record names no images: delete nothing
                pass
            merged = dict(rows)
        else:
            check_folder(out, settings, rows, cfg.num_samples)
            merged = {**(read_record(out) or {}).get("rows", {}), **rows}
        settings_fingerprint = digest(settings)
        seeds = sorted({r["seed"] for r in merged.values()}) if len(merged) <= 100_000 else "see rows"
        record = {"fingerprint": digest({"settings_fingerprint": settings_fingerprint, "rows": merged}),
                  "settings_fingerprint": settings_fingerprint, **run, "images": len(merged) * cfg.num_samples,
                  "seeds": seeds, "fingerprint_settings": settings, "rows": merged}
        atomic_write(out / RECORD, lambda p: Path(p).write_text(json.dumps(record, indent=2)))
    return record
