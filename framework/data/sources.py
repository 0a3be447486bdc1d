"""Document sources: local text/JSON-lines/Parquet files or a streamed Hugging Face hub dataset.

Every source yields documents as one ``text`` string column, in a stable document order:
files in the order given, and within a file in file order (a ``.txt`` file is one document,
a ``.jsonl``/``.json`` line or a Parquet row is one document).
"""

from __future__ import annotations

import os

import datasets
import pyarrow.parquet as pq
from datasets.exceptions import DatasetGenerationError

# extension -> name of the `datasets` packaged builder that reads it
SUPPORTED_EXTENSIONS: dict[str, str] = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}

_STRING = datasets.Value("string")
_STRING_TYPES = (datasets.Value("string"), datasets.Value("large_string"))


def builder_for(path: str) -> str:
    """Return the `datasets` builder name for ``path``; raise ValueError for an unsupported extension."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in SUPPORTED_EXTENSIONS:
        supported = ", ".join(sorted(SUPPORTED_EXTENSIONS))
        raise ValueError(
            f"data file {path!r} has unsupported extension {ext or '(none)'!r}; supported: {supported}"
        )
    return SUPPORTED_EXTENSIONS[ext]


def check_files(files: list[str]) -> list[str]:
    """Validate extensions and existence of ``files``; return their absolute paths."""
    if not files:
        raise ValueError("files is empty: give at least one data file (or hub_name)")
    out = []
    for path in files:
        builder_for(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file not found: {path!r}")
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
    builder: str, files: list[str], text_field: str, cache_dir: str, num_proc: int
) -> datasets.Dataset:
    kwargs: dict = {"split": "train", "cache_dir": cache_dir}
    if num_proc > 1:
        kwargs["num_proc"] = num_proc
    if builder == "text":
        kwargs["sample_by"] = "document"
    elif builder == "parquet":
        kwargs["columns"] = [text_field]
    return datasets.load_dataset(builder, data_files=files, **kwargs)


def _as_text_column(ds: datasets.Dataset, builder: str, field: str, where: str) -> datasets.Dataset:
    """Reduce ``ds`` to one string column ``text``; raise ValueError naming ``where`` if impossible."""
    if builder == "text":
        field = "text"
    if field not in ds.column_names:
        raise ValueError(f"{where}: text field {field!r} not found (columns: {ds.column_names})")
    feature = ds.features[field]
    if feature not in _STRING_TYPES:
        raise ValueError(f"{where}: text field {field!r} must hold strings, found {feature}")
    ds = ds.select_columns([field])
    if field != "text":
        ds = ds.rename_column(field, "text")
    if ds.data.column("text").null_count:
        raise ValueError(f"{where}: text field {field!r} is missing or null in some rows")
    if feature != _STRING:
        ds = ds.cast(datasets.Features({"text": _STRING}))
    return ds


def _diagnose(builder: str, path: str, text_field: str, cache_dir: str) -> None:
    """Raise a ValueError naming ``path`` if that single file cannot provide ``text_field``."""
    if builder == "parquet":
        names = pq.read_schema(path).names
        if text_field not in names:
            raise ValueError(f"{path}: text field {text_field!r} not found (columns: {names})")
    try:
        ds = _load_raw(builder, [path], text_field, cache_dir, 1)
    except DatasetGenerationError as err:
        raise ValueError(f"{path}: could not be read: {err.__cause__ or err!r}") from err
    _as_text_column(ds, builder, text_field, path)


def load_documents(files: list[str], text_field: str, cache_dir: str, num_proc: int = 1) -> datasets.Dataset:
    """Load ``files`` (already checked) into one Dataset with a single string column ``text``.

    Consecutive files of the same kind are loaded by one builder call; when that fails the group's
    files are re-read one at a time so that the error names the offending file.
    """
    parts = []
    for builder, group in _groups([p for p in files if not _holds_no_documents(p)]):
        where = group[0] if len(group) == 1 else f"one of {group}"
        try:
            raw = _load_raw(builder, group, text_field, cache_dir, num_proc)
        except DatasetGenerationError as err:
            for path in group:
                _diagnose(builder, path, text_field, cache_dir)
            raise ValueError(f"{where}: could not be read together: {err.__cause__ or err!r}") from err
        try:
            parts.append(_as_text_column(raw, builder, text_field, where))
        except ValueError:
            for path in group if len(group) > 1 else []:
                _diagnose(builder, path, text_field, cache_dir)
            raise
    if not parts:
        return datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": _STRING}))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def open_hub_stream(
    hub_name: str, hub_config: str | None, hub_split: str, text_field: str
) -> datasets.IterableDataset:
    """Open ``hub_name`` as a streamed dataset (nothing is downloaded up front); check ``text_field``."""
    ds = datasets.load_dataset(hub_name, hub_config, split=hub_split, streaming=True)
    columns = ds.column_names  # None when the hub does not advertise features
    if columns is not None and text_field not in columns:
        raise ValueError(
            f"hub dataset {hub_name!r}: text field {text_field!r} not found (columns: {columns})"
        )
    return ds
