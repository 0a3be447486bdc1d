"""Document sources: local text/JSON-lines/Parquet files or a streamed Hugging Face hub dataset.

Every source yields documents as one ``text`` string column, in a stable document order:
files in the order given, and within a file in file order (a ``.jsonl``/``.json`` line or a Parquet
row is one document; any other file, ``.txt``, ``.py``, ``.md``..., is UTF-8 text and one document).

A file that cannot be read (binary, not UTF-8, bad JSON, a row without the text field, no text at all)
is a :class:`DataError` of one line naming the file (and the line) and the fix; echoed values are capped.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import os

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.exceptions import DatasetGenerationError
from datasets.packaged_modules.json.json import JsonConfig

from sapling.errors import DataError, short

# extension -> name of the `datasets` packaged builder that reads it; any other file is read as text
STRUCTURED_EXTENSIONS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}
SNIFF_BYTES = 64 * 1024  # what config validation reads of each file (`file_problem`)
_CHUNK = 1 << 20
_FILE_KINDS = "UTF-8 text (any extension: one document per file), .jsonl/.json (one document per line) or .parquet"
# leading bytes of common binary formats, to name what a refused file is
_MAGIC = {
    b"\x1f\x8b": "a gzip-compressed file", b"BZh": "a bzip2-compressed file", b"\xfd7zXZ\x00": "an xz-compressed file",
    b"\x28\xb5\x2f\xfd": "a zstd-compressed file", b"PK\x03\x04": "a zip archive", b"PAR1": "a Parquet file",
    b"\x89PNG": "a PNG image", b"%PDF": "a PDF file", b"\x7fELF": "an executable",
    b"\xff\xfe": "UTF-16 text", b"\xfe\xff": "UTF-16 text",
}

# `datasets` >= 4 reads a JSON column of mixed types as JSON-encoded strings ("use_json"); in a group of
# files a later file's mixed text column would be cast to strings silently ('"a"', '5'). The first read
# of a group refuses mixed types; only once every file's text field checks out alone is it read leniently.
_STRICT_JSON = {"on_mixed_types": None} if "on_mixed_types" in {f.name for f in dataclasses.fields(JsonConfig)} \
    else {}
_STRING = datasets.Value("string")
_STRING_TYPES = (datasets.Value("string"), datasets.Value("large_string"))


def builder_for(path: str) -> str:
    """The `datasets` builder that reads ``path``: json/parquet by extension, any other file is text."""
    return STRUCTURED_EXTENSIONS.get(os.path.splitext(path)[1].lower(), "text")


def _error(path: str, problem: str, fix: str, line: int | None = None) -> DataError:
    where = f"data file {short(path, 200)}" + (f" line {line}" if line is not None else "")
    return DataError(f"{where}: {problem}; fix: {fix}")


def _not_text(head: bytes, offset: int, line: int, reason: str) -> tuple[str, str]:
    """(problem, fix) for a file whose bytes at ``offset`` (on ``line``) are not UTF-8 text."""
    kind = next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)
    if kind == "UTF-16 text":
        return "UTF-16 text, not UTF-8", "re-encode it: iconv -f utf-16 -t utf-8 FILE > FILE.utf8"
    if kind == "a Parquet file":
        return "a Parquet file named as text", "name it .parquet"
    if kind is not None:
        return f"{kind}, not text", f"pass {_FILE_KINDS}"
    if reason == "NUL":
        return f"a binary file, not text (a NUL byte at line {line}, byte {offset})", f"pass {_FILE_KINDS}"
    return (f"not UTF-8 text (line {line}, byte {offset}: {reason})",
            "re-encode it as UTF-8, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8")


def text_problem(path: str, limit: int | None = None) -> tuple[str, str] | None:
    """Why ``path`` is not UTF-8 text, as (problem, fix), or None. Reads its first ``limit`` bytes (None: all).

    A NUL byte counts as binary (valid UTF-8, but no text file holds one), as git and grep judge it.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    head, offset, line = b"", 0, 1
    with open(path, "rb") as f:
        while limit is None or offset < limit:
            chunk = f.read(_CHUNK if limit is None else min(_CHUNK, limit - offset))
            head = head or chunk[:16]
            nul = chunk.find(b"\0")
            if nul >= 0:
                return _not_text(head, offset + nul, line + chunk.count(b"\n", 0, nul), "NUL")
            pending = decoder.getstate()[0]  # the start of a character cut at the previous chunk's end
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                byte = (pending + chunk)[err.start : err.start + 1].hex()
                at = err.start - len(pending)  # in chunk; < 0 inside `pending` (which holds no newline)
                return _not_text(head, offset + at, line + chunk.count(b"\n", 0, max(at, 0)),
                                 f"0x{byte}, {err.reason}")
            if not chunk:
                return None
            offset += len(chunk)
            line += chunk.count(b"\n")
    return None


def file_problem(path: str) -> tuple[str, str] | None:
    """A cheap check for config validation: why ``path`` cannot be a data file, from its first bytes."""
    if builder_for(path) == "parquet":
        with open(path, "rb") as f:
            if f.read(4) != b"PAR1":
                return ("not a Parquet file (no PAR1 header)",
                        "pass a file written by pyarrow/pandas to_parquet, or name a text file other than .parquet")
        return None
    return text_problem(path, SNIFF_BYTES)


def is_blank(path: str) -> bool:
    """True for a text/JSON file that is empty or whitespace only (judged cheaply: files up to SNIFF_BYTES)."""
    if builder_for(path) == "parquet":
        return False
    size = os.path.getsize(path)
    if size > SNIFF_BYTES:
        return False
    with open(path, "rb") as f:
        return not f.read().strip()


def check_files(files: list[str]) -> list[str]:
    """Check that ``files`` exist and hold UTF-8 text (or Parquet); return their absolute paths."""
    if not files:
        raise DataError("no data files given; fix: pass at least one data file (or a hub dataset)")
    out = []
    for path in files:
        if os.path.isdir(path):
            raise _error(path, "is a directory", "list the files in it, e.g. data.files=[dir/a.txt,dir/b.py]")
        if not os.path.isfile(path):
            raise _error(path, "no such file", "check the path (relative paths are resolved from the "
                         "directory you launched from)")
        if builder_for(path) == "parquet":
            try:
                pq.read_metadata(path)
            except (pa.ArrowException, OSError) as err:
                raise _error(path, f"not a readable Parquet file ({_cause(err)})",
                             "rewrite it with pyarrow/pandas to_parquet, or name a text file other than .parquet") from err
        out.append(os.path.abspath(path))
    return out


def _groups(files: list[str]) -> list[tuple[str, list[str]]]:
    """Split ``files`` into consecutive runs sharing a builder (keeps the given file order)."""
    groups: list[tuple[str, list[str]]] = []
    for path in files:
        builder = builder_for(path)
        if groups and groups[-1][0] == builder:
            groups[-1][1].append(path)
        else:
            groups.append((builder, [path]))
    return groups


def _holds_no_documents(path: str) -> bool:
    """True for a JSON file with only whitespace or a Parquet file with 0 rows.

    `datasets` cannot load those (an empty JSON file even leaks StopIteration), so they are skipped.
    An empty ``.txt`` file is still one (empty) document.
    """
    builder = builder_for(path)
    if builder == "parquet":
        return pq.read_metadata(path).num_rows == 0
    if builder == "json":
        with open(path, "rb") as f:
            while chunk := f.read(1 << 16):
                if chunk.strip():
                    return False
        return True
    return False


def _load_raw(
    builder: str, files: list[str], text_field: str, cache_dir: str, num_proc: int, strict: bool = False
) -> datasets.Dataset:
    kwargs: dict = {"split": "train", "cache_dir": cache_dir}
    if num_proc > 1:
        kwargs["num_proc"] = num_proc
    if builder == "json" and strict:
        kwargs.update(_STRICT_JSON)
    if builder == "text":
        kwargs["sample_by"] = "document"
    elif builder == "parquet":
        kwargs["columns"] = [text_field]
    return datasets.load_dataset(builder, data_files=files, **kwargs)


def _where(files: list[str]) -> str:
    return f"data file {short(files[0], 200)}" if len(files) == 1 else f"one of data files {short(files, 200)}"


def _as_text_column(ds: datasets.Dataset, builder: str, field: str, where: str) -> datasets.Dataset:
    """Reduce ``ds`` to one string column ``text``; raise DataError naming ``where`` if impossible."""
    if builder == "text":
        field = "text"
    fix = "set data.text_field to the column that holds the text"
    if field not in ds.column_names:
        raise DataError(f"{where}: text field {field!r} not found (columns: {short(ds.column_names)}); fix: {fix}")
    feature = ds.features[field]
    if feature not in _STRING_TYPES:
        raise DataError(f"{where}: text field {field!r} must hold strings, found {short(feature)}; fix: {fix}")
    ds = ds.select_columns([field])
    if field != "text":
        ds = ds.rename_column(field, "text")
    if ds.data.column("text").null_count:
        raise DataError(f"{where}: text field {field!r} is missing or null in some rows; "
                        "fix: give every row a string (or drop those rows)")
    if feature != _STRING:
        ds = ds.cast(datasets.Features({"text": _STRING}))
    return ds


def _row_problem(row: object, field: str) -> tuple[str, str] | None:
    if not isinstance(row, dict):
        return f"not a JSON object (a {type(row).__name__})", f'write one JSON object per line, e.g. {{"{field}": "..."}}'
    if field not in row:
        return (f"no {field!r} field (fields: {short(list(row))})",
                "add it, or set data.text_field to the field that holds the text")
    if not isinstance(row[field], str):
        found = "null" if row[field] is None else f"of type {type(row[field]).__name__}"
        return f"{field!r} is {found}, not a string", "give every row a string (or drop that row)"
    return None


def _json_problem(path: str, field: str) -> tuple[int | None, str, str] | None:
    """The first row of a (UTF-8) JSON-lines file that cannot give a string ``field``: (line, problem, fix).

    A ``.json`` file may also be one JSON list of objects (then the problem names the item, line None).
    """
    with open(path, encoding="utf-8") as f:
        if path.lower().endswith(".json"):
            try:
                whole = json.load(f)
            except json.JSONDecodeError:
                f.seek(0)  # not one JSON value: JSON lines
            else:
                for i, row in enumerate(whole if isinstance(whole, list) else [whole]):
                    if problem := _row_problem(row, field):
                        return None, f"item {i}: {problem[0]}", problem[1]
                return None
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                return lineno, f"not valid JSON ({err.msg}, column {err.colno})", \
                    "fix or remove that line (one JSON object per line)"
            if problem := _row_problem(row, field):
                return lineno, *problem
    return None


def _cause(err: BaseException) -> str:
    cause = err.__cause__ or err
    return short(f"{type(cause).__name__}: {cause}", 200)


def _diagnose(builder: str, path: str, text_field: str, cache_dir: str) -> None:
    """Raise a DataError naming ``path`` (and the line) if that single file cannot provide ``text_field``."""
    if builder == "json" and (found := _json_problem(path, text_field)):
        line, problem, fix = found
        raise _error(path, problem, fix, line)
    if builder == "parquet":
        try:
            names = pq.read_schema(path).names
        except (pa.ArrowException, OSError) as err:
            raise _error(path, f"not a readable Parquet file ({_cause(err)})",
                         "rewrite it with pyarrow/pandas to_parquet") from err
        if text_field not in names:
            raise _error(path, f"text field {text_field!r} not found (columns: {short(names)})",
                         "set data.text_field to the column that holds the text")
    try:
        ds = _load_raw(builder, [path], text_field, cache_dir, 1)
    except DatasetGenerationError as err:
        raise _error(path, f"could not be read as {builder} ({_cause(err)})", f"pass {_FILE_KINDS}") from err
    _as_text_column(ds, builder, text_field, _where([path]))


def _has_text(docs: datasets.Dataset) -> bool:
    """Whether any document holds more than whitespace (stops at the first that does)."""
    for batch in docs.with_format("arrow").iter(batch_size=1000):
        if pc.any(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(batch.column("text"))), 0)).as_py():
            return True
    return False


def _load_group(builder: str, group: list[str], text_field: str, cache_dir: str, num_proc: int) -> datasets.Dataset:
    """One builder call for ``group``; when it fails, the first file that fails alone is named (with its line)."""
    where = _where(group)
    try:
        raw = _load_raw(builder, group, text_field, cache_dir, num_proc, strict=True)
        return _as_text_column(raw, builder, text_field, where)
    except (DatasetGenerationError, DataError) as err:
        for path in group:
            _diagnose(builder, path, text_field, cache_dir)
        if isinstance(err, DataError):
            raise
        failed = err
    if builder == "json":  # every file's text field holds strings: the mixed types lie in columns dropped here
        try:
            return _as_text_column(_load_raw(builder, group, text_field, cache_dir, num_proc), builder, text_field,
                                   where)
        except DatasetGenerationError as err:
            failed = err
    raise DataError(f"{where}: could not be read together ({_cause(failed)}); "
                    "fix: give files of one kind the same columns and types") from failed


def load_documents(files: list[str], text_field: str, cache_dir: str, num_proc: int = 1) -> datasets.Dataset:
    """Load ``files`` (already checked) into one Dataset with a single string column ``text``.

    Every text and JSON file is first checked to be UTF-8 from end to end (one fast pass, far cheaper
    than tokenizing). Consecutive files of the same kind are loaded by one builder call; when that fails
    the group's files are re-read one at a time so that the error names the offending file (and line).
    """
    for path in files:
        if builder_for(path) != "parquet" and (problem := text_problem(path)):
            raise _error(path, *problem)
    parts = [_load_group(builder, group, text_field, cache_dir, num_proc)
             for builder, group in _groups([p for p in files if not _holds_no_documents(p)])]
    docs = (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)) if parts else \
        datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": _STRING}))
    if not _has_text(docs):
        what = _where(files) if len(files) == 1 else f"all {len(files)} data files {short(files, 200)}"
        raise DataError(f"{what}: no text to train on (empty, blank or no rows); fix: pass files that hold text")
    return docs


def open_hub_stream(
    hub_name: str, hub_config: str | None, hub_split: str, text_field: str
) -> datasets.IterableDataset:
    """Open ``hub_name`` as a streamed dataset (nothing is downloaded up front); check ``text_field``."""
    ds = datasets.load_dataset(hub_name, hub_config, split=hub_split, streaming=True)
    columns = ds.column_names  # None when the hub does not advertise features
    if columns is not None and text_field not in columns:
        raise DataError(f"hub dataset {short(hub_name)}: text field {text_field!r} not found (columns: "
                        f"{short(columns)}); fix: set data.text_field to the column that holds the text")
    return ds
