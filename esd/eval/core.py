"""The evaluate loop: pair images with prompt rows, check where they came from, score every image
with one metric, and write results.csv (one row per image) and summary.json (how every number
was made: resolved settings, protocol, provenance, versions).

Where the image folder has a generation.json, its fingerprint goes into summary.json, and a prompt
CSV that disagrees with the prompts and seeds it records is refused: scores would otherwise be paired
with prompts the images were not made from.
"""

import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from esd.eval.config import EvalConfig
from esd.eval.images import FILE_PATTERN
from esd.eval.metric import existing_file
from esd.eval.protocols import PROTOCOLS, check_counts
from esd.formats.generation_record import RECORD, read_record, recorded_images
from esd.formats.prompt_csv import parse_seed, read_prompt_table
from esd.formats.records import atomic_write, check_output_folder, environment_record, read_json
from esd.formats.summary import metric_class


def read_prompts(prompts: str | None) -> pd.DataFrame | None:
    """The prompt CSV, read once and as ``esd generate`` reads it (every cell the string written in it),
    so that the pairing, the check against generation.json and the protocol's counts see the same rows."""
    return None if prompts is None else read_prompt_table(existing_file(prompts, "--prompts"), "--prompts")


def check_label_column(cfg: EvalConfig, df: pd.DataFrame | None) -> None:
    """A protocol that counts images per class (imagenette-paper), and --erased_classes, read each image's
    expected class from the CSV's --label_column: without it the summary would have no accuracy at all (a
    null headline), so the CSV is refused before any network loads."""
    if df is None or cfg.metric != "classify" or cfg.label_column in df:
        return
    protocol = PROTOCOLS.get(cfg.protocol)
    if protocol is not None and protocol.images_per_class is not None:
        why = f"--protocol {cfg.protocol} scores and counts images per class by it"
    elif cfg.erased:
        why = "--erased_classes are looked up in it"
    else:
        return
    raise ValueError(f"{cfg.prompts}: no column --label_column {cfg.label_column!r} ({why}); columns found: "
                     f"{', '.join(map(str, df.columns))}")


def image_rows(images: Path, df: pd.DataFrame | None, prompts: str | None,
               case_column: str) -> list[tuple[Path, dict | None]]:
    """Pair every ``<case>_<i>.png`` with its row of the prompt CSV ``df`` (read from ``prompts``), if any."""
    files = sorted(p for p in Path(images).glob("*.png") if FILE_PATTERN.match(p.name))
    if not files:
        raise ValueError(f"no <case>_<i>.png images in {str(images)!r}")
    table = None
    if df is not None:
        if case_column not in df:
            raise ValueError(f"{prompts}: no column --case_column {case_column!r}; columns found: "
                             f"{', '.join(map(str, df.columns))}")
        table = {str(r[case_column]): r for r in df.to_dict("records")}
    pairs = []
    for f in files:
        case = FILE_PATTERN.match(f.name)["case"]
        if table is not None and case not in table:
            raise ValueError(f"image {f.name} has case {case!r}, which is not in {prompts}")
        pairs.append((f, table[case] if table is not None else None))
    return pairs


def provenance(images: Path, files: list[Path], cfg: EvalConfig, df: pd.DataFrame | None) -> dict:
    """Where the images came from, for summary.json: their generation.json's fingerprint, or a note
    that there is none. Where the record lists its rows, every image must be one it accounts for and
    the prompt CSV must agree with it (see check_prompts_match)."""
    record = read_record(images)
    if record is None:
        return {"provenance": f"no {RECORD}"}
    if "rows" not in record:
        return {"provenance": f"{RECORD} without rows (an older esd wrote it)"}
    recorded = recorded_images(record)
    if unknown := [f.name for f in files if f.name not in recorded]:
        raise ValueError(f"{images}: {len(unknown)} image(s) are not among those its {RECORD} records "
                         f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}); remove them or "
                         "regenerate the folder")
    if df is not None:
        check_prompts_match(df, cfg.prompts, record["rows"], images, cfg)
    return {"provenance": RECORD, "fingerprint": record.get("fingerprint"),
            "settings_fingerprint": record.get("settings_fingerprint")}


def check_prompts_match(table: pd.DataFrame, prompts: str, recorded: dict, images: Path, cfg: EvalConfig) -> None:
    """Refuse a prompt CSV (``table``, read from ``prompts`` as ``esd generate`` reads it, so equal cells
    compare equal) that gives a case the generation recorded another prompt or seed for."""
    needed = {"--case_column": cfg.case_column, "--prompt_column": cfg.prompt_column,
              "--seed_column": cfg.seed_column}
    if missing := [f"{flag} {col!r}" for flag, col in needed.items() if col not in table]:
        raise ValueError(f"{prompts}: no column {', '.join(missing)} to check against the generation.json in "
                         f"{images}; columns found: {', '.join(map(str, table.columns))}")
    for row in table.index:
        case = table.at[row, cfg.case_column]
        if case not in recorded:
            continue
        where = f"{prompts}: row {row + 1} (line {row + 2}), case {case!r}:"
        prompt = table.at[row, cfg.prompt_column]
        seed = parse_seed(table.at[row, cfg.seed_column], f"{where} --seed_column {cfg.seed_column!r}:")
        for key, value in (("prompt", prompt), ("seed", seed)):
            if value != recorded[case].get(key):
                raise ValueError(f"{where} {key} {value!r} differs from the {recorded[case].get(key)!r} that the "
                                 f"generation.json in {images} records; these images were not made from this CSV")


def protocol_record(cfg: EvalConfig, pairs: list, origin: dict, table_rows: int | None) -> dict:
    """summary.json's protocol block: its name, source, the values it fixed, the overrides given,
    whether the folder met its counts, and whether each image's seed was checked (against the
    folder's generation.json, with --prompts). A run without a protocol records ``"protocol": null``."""
    if cfg.protocol is None:
        return {"protocol": None}
    p = PROTOCOLS[cfg.protocol]
    classes: dict[str, int] = {}
    for _, row in pairs:
        if row is not None and cfg.label_column in row:
            label = str(row[cfg.label_column])
            classes[label] = classes.get(label, 0) + 1
    return {"protocol": cfg.protocol, "protocol_source": p.source,
            "protocol_settings": {k: getattr(cfg, k) for k in ("metric", *p.settings)},
            "protocol_overrides": cfg.protocol_overrides,
            **check_counts(p, [f.name for f, _ in pairs], table_rows, classes, cfg.limit),
            "seeds_checked": origin["provenance"] == RECORD and cfg.prompts is not None}


def evaluate(cfg: EvalConfig, log=print) -> dict:
    """Score every image of ``cfg.images`` with ``cfg.metric``; write results.csv and summary.json to
    ``cfg.out``. Every check runs before a network loads; nothing is written before the scores exist."""
    metric = metric_class(cfg.metric)(cfg)  # checks the metric's own settings
    check_output_folder(Path(cfg.out), "--out")
    images = Path(cfg.images)
    df = read_prompts(cfg.prompts)
    check_label_column(cfg, df)
    pairs = image_rows(images, df, cfg.prompts, cfg.case_column)
    origin = provenance(images, [path for path, _ in pairs], cfg, df)  # every image, --limit or not
    pairs = pairs[:cfg.limit]
    protocol = protocol_record(cfg, pairs, origin, None if df is None else len(df))
    if protocol.get("complete") is False:
        log(f"warning: --protocol {cfg.protocol} counts not met, summary.json records \"complete\": false "
            f"({json.dumps(protocol['protocol_counts'])})")
    with tqdm(total=metric.setup_steps() + len(pairs), desc=f"evaluate {cfg.metric}", unit="image",
              disable=None) as bar:  # one bar for the whole evaluation (reference set included)
        metric.load(bar.update)
        rows = []
        for path, row in pairs:
            m = FILE_PATTERN.match(path.name)
            keep = {k: row[k] for k in (cfg.prompt_column, cfg.label_column) if row is not None and k in row}
            rows.append({"file": path.name, "case": m["case"], "index": int(m["index"]), **keep,
                         **metric.score(path, row)})
            bar.update(1)
        set_level = metric.finish()  # numbers of the whole set (FID)
    results = pd.DataFrame(rows)
    summary = {"metric": cfg.metric, "images_dir": str(cfg.images), "prompts": cfg.prompts, **origin, **protocol,
               **metric.summarise(results), **set_level}
    summary["headline"] = asdict(type(metric).headline(summary))
    summary |= {"arguments": cfg.record(), "environment": environment_record()}  # how the numbers were made
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.csv", lambda p: results.to_csv(p, index=False))
    atomic_write(out / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2, default=str)))
    log(f"{cfg.metric}: {len(results)} images -> {out / 'results.csv'}, {out / 'summary.json'}")
    return summary


def read_summary(folder: str) -> dict:
    """The summary.json of an ``esd evaluate --out`` folder, or a one-line error naming what is missing."""
    path = Path(folder) / "summary.json"
    if not Path(folder).is_dir():
        raise ValueError(f"folder {folder!r} does not exist (pass NAME=FOLDER of `esd evaluate --out`)")
    if not path.is_file():
        raise ValueError(f"{folder!r} has no summary.json; is it an `esd evaluate --out` folder?")
    return read_json(path)
