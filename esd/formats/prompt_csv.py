"""The prompt CSV of the paper's evaluation (prompt, evaluation_seed, case_number, ...): read safely, its
seeds checked."""

import re

import pandas as pd

from esd.formats.records import error_summary

# Seeds must be integers 0 <= seed < 2**53: every such integer survives a float CSV column
# (12.0) and a JSON reader exactly, so the seed recorded is the seed used.
MAX_SEED = 2 ** 53

SEED_TEXT = re.compile(r"[0-9]+(\.0*)?")  # 12, or 12.0 as a float column writes it


def read_prompt_table(path, what: str = "prompt CSV") -> pd.DataFrame:
    """The CSV with every cell the string written in it: case ids keep their leading zeros (COCO),
    a prompt 'None' or 'NA' stays a prompt, and an empty cell is '' rather than NaN (which str()
    would have turned into the prompt 'nan'). A file that is not UTF-8, empty or not CSV is one line
    naming it (``what``: the flag or kind of file it was given as)."""
    where = f"{what} {str(path)!r}"
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not UTF-8 text (undecodable byte 0x{e.object[e.start]:02x}); save it as "
                         "UTF-8") from e
    except pd.errors.EmptyDataError as e:
        raise ValueError(f"{where} is empty; a prompt CSV starts with a header row (e.g. "
                         "case_number,prompt,evaluation_seed)") from e
    except pd.errors.ParserError as e:
        raise ValueError(f"{where} is not a readable CSV ({error_summary(e)})") from e


def parse_seed(value, where: str) -> int:
    """The integer seed in a CSV cell ('12', or '12.0' from a float column); anything else, or a seed
    outside 0 <= seed < 2**53, is an error starting with ``where``."""
    text = str(value).strip()
    seed = int(text.split(".")[0]) if SEED_TEXT.fullmatch(text) else None
    if seed is None or seed >= MAX_SEED:
        raise ValueError(f"{where} {value!r} is not an integer seed with 0 <= seed < 2**53")
    return seed
