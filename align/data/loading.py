"""Read raw records from a local file, a saved dataset directory or the hub, with row numbers.

JSON lines are read line by line (not through ``datasets``) so that a broken line is reported with
its number instead of failing the whole file.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from align.errors import DataError

FILE_TYPES = {".csv": "csv", ".parquet": "parquet"}


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                raise DataError(str(path), lineno, None, f"line is not valid UTF-8 ({err.reason} at byte {err.start})",
                                "re-encode the file as UTF-8") from None
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(str(path), lineno, None, f"invalid JSON: {err.msg} at column {err.colno}") from None
            if not isinstance(row, dict):
                raise DataError(str(path), lineno, None, f"expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(str(path), None, None, f"file is not valid UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise DataError(str(path), None, None, f"invalid JSON: {err.msg} at line {err.lineno}") from None
    if isinstance(data, dict) and "data" in data:  # {"data": [...]} as written by some exporters
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(str(path), None, None, "expected a JSON list of objects (or use .jsonl)")
    return data


def load_records(source: str, *, split: str = "train") -> list[dict]:
    """Rows of a dataset as plain dicts. ``source``: .jsonl/.json/.csv/.parquet file, a directory
    written by ``Dataset.save_to_disk``, or a hub dataset id."""
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return read_jsonl(path)
        if suffix == ".json":
            return read_json(path)
        if suffix in FILE_TYPES:
            try:
                ds = datasets.load_dataset(FILE_TYPES[suffix], data_files=str(path), split="train")
            except Exception as err:  # pyarrow/pandas raise many types; the message is what matters
                raise DataError(str(path), None, None, f"could not read {suffix} file: {err}") from None
            return ds.to_list()
        raise DataError(str(path), None, None, f"unsupported file type {suffix!r}",
                        "use .jsonl, .json, .csv or .parquet")
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as err:
            raise DataError(str(path), None, None, f"not a saved dataset directory: {err}") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(str(path), None, None, f"no split {split!r}; splits: {sorted(ds)}")
            ds = ds[split]
        return ds.to_list()
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(source).suffix:
        raise DataError(source, None, None, "file or directory does not exist", "check the `dataset` path")
    try:
        return datasets.load_dataset(source, split=split).to_list()
    except Exception as err:
        raise DataError(source, None, None, f"could not load hub dataset: {err}",
                        "check the id, or download it and pass a local path") from None


def read_prompts(path: str) -> list[str]:
    """Prompts from a .txt file (one per line) or a .jsonl/.json/.csv/.parquet file with a `prompt` field."""
    if Path(path).suffix == ".txt":
        if not Path(path).is_file():
            raise DataError(path, None, None, "file does not exist")
        return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = []
    for i, row in enumerate(load_records(path), start=1):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise DataError(path, i, "prompt", "missing, empty or not a string")
        prompts.append(row["prompt"])
    return prompts
