"""Tables of documents, one a row: Parquet files (read with pyarrow) and Hugging Face datasets (a save_to_disk
folder, or a dataset already in the local cache), read BATCH_ROWS rows at a time, so a file is never in memory
whole. Both give Arrow columns, so one function turns a column into texts and names the row that is wrong.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from gptrain.errors import UserError, one_line

BATCH_ROWS = 1024
# Read Parquet through a 1 MB buffer, page by page, without pre-buffering: measured on a 500 MB file of 15 row
# groups, peak memory 140 MB this way (flat: 130 MB for 100 MB) against 448 MB with pyarrow's defaults.
PARQUET_BUFFER = 1 << 20
SAVED_DATASET_FILES = ("state.json", "dataset_info.json", "dataset_dict.json")  # what save_to_disk writes
TEXT_FIX = "name the column holding the text with --text_field"


def import_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UserError("reading Parquet needs pyarrow: pip install 'gptrain[parquet]'") from None
    return pyarrow


def import_datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("reading Hugging Face datasets needs datasets: pip install 'gptrain[datasets]'") from None
    return datasets


# ----- the text column ------------------------------------------------------------------------------------------


def check_text_column(schema, field: str, where: str) -> None:
    pa = import_pyarrow()
    if field not in schema.names:
        shown = ", ".join(schema.names[:10]) + (", ..." if len(schema.names) > 10 else "")
        raise UserError(f"{where} has no column {field!r} (it has {shown or 'none'}); {TEXT_FIX}")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise UserError(f"{where}: column {field!r} holds {kind}, not text; {TEXT_FIX}")


def column_texts(columns: Iterator, field: str, where: str, errors: str) -> Iterator[str]:
    """The texts of a stream of Arrow string columns (arrays or chunked arrays), row by row. Read as bytes and
    decoded here, so a row that is not UTF-8 is named (or, with errors="replace", mended)."""
    pa = import_pyarrow()
    row = 0
    for column in columns:
        for raw in column.cast(pa.large_binary()).to_pylist():
            row += 1
            if raw is None:
                raise UserError(f"{where}: row {row} has no text ({field} is null); drop such rows or {TEXT_FIX}")
            try:
                yield raw.decode("utf-8", errors)
            except UnicodeDecodeError as exc:
                raise UserError(f"{where}: row {row}: byte {exc.start} of its {field} is not UTF-8; fix it or pass "
                                "--errors replace") from None


# ----- Parquet --------------------------------------------------------------------------------------------------


def open_parquet(path: Path):
    pa = import_pyarrow()
    try:
        return pa.parquet.ParquetFile(path, buffer_size=PARQUET_BUFFER, pre_buffer=False)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path} is not a Parquet file pyarrow can read ({one_line(exc)}); write it again") from None


def parquet_texts(path: Path, options) -> Iterator[str]:
    """Each row's text, a batch of rows at a time (pyarrow decodes one row group's column at most)."""
    pa = import_pyarrow()
    file = open_parquet(path)
    check_text_column(file.schema_arrow, options.text_field, str(path))
    batches = file.iter_batches(batch_size=BATCH_ROWS, columns=[options.text_field], use_threads=False)

    def columns():
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as exc:  # a damaged page shows only when it is read
                raise UserError(f"{path} is damaged: {one_line(exc)}; write it again") from None
            yield batch.column(0)

    yield from column_texts(columns(), options.text_field, str(path), options.errors)


def parquet_text_bytes(path: Path, field: str) -> int | None:
    """The text column's uncompressed size from the file's footer (progress bars); None if it has no such column."""
    metadata = open_parquet(path).metadata
    if metadata.num_row_groups == 0:
        return 0
    names = [metadata.row_group(0).column(i).path_in_schema for i in range(metadata.num_columns)]
    if field not in names:
        return None
    index = names.index(field)
    return sum(metadata.row_group(g).column(index).total_uncompressed_size for g in range(metadata.num_row_groups))


# ----- Hugging Face datasets ------------------------------------------------------------------------------------


def is_saved_dataset(folder: Path) -> bool:
    return any((folder / name).is_file() for name in SAVED_DATASET_FILES)


def saved_dataset_texts(folder: Path, options) -> Iterator[str]:
    """A folder written by Dataset.save_to_disk or DatasetDict.save_to_disk (then options.split is read)."""
    datasets = import_datasets()
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:  # the library raises FileNotFoundError, ValueError, ArrowInvalid... for a bad folder
        raise UserError(f"{folder} cannot be read by datasets.load_from_disk ({one_line(exc)}); save the dataset "
                        "again with save_to_disk") from None
    if isinstance(loaded, datasets.DatasetDict):
        if options.split not in loaded:
            raise UserError(f"{folder} has no split {options.split!r} (it has {', '.join(loaded)}); choose one with "
                            "--split")
        loaded = loaded[options.split]
    yield from dataset_texts(loaded, str(folder), options)


def cached_dataset_texts(name: str, options) -> Iterator[str]:
    """A dataset named NAME or NAME:CONFIG that load_dataset downloaded before. It is read from the cache as
    load_dataset reads it offline (HF_DATASETS_OFFLINE=1): nothing is downloaded."""
    datasets = import_datasets()
    from datasets.packaged_modules.cache.cache import Cache

    repo, _, config = name.partition(":")
    where = f"hf:{name}"
    try:
        builder = Cache(dataset_name=repo.split("/")[-1], repo_id=repo, config_name=config or None,
                        version="auto", hash="auto")
    except ValueError as exc:
        raise UserError(f"{where} is not in the local cache {datasets.config.HF_DATASETS_CACHE} ({one_line(exc)}); "
                        f"gptrain reads datasets offline: run datasets.load_dataset({repo!r}) once where there is "
                        "a network, or give a folder written by save_to_disk") from None
    try:
        dataset = builder.as_dataset(split=options.split)
    except (ValueError, KeyError) as exc:
        raise UserError(f"{where}: {one_line(exc)}; choose the split with --split") from None
    yield from dataset_texts(dataset, where, options)


def dataset_texts(dataset, where: str, options) -> Iterator[str]:
    check_text_column(dataset.features.arrow_schema, options.text_field, where)
    tables = dataset.with_format("arrow").iter(batch_size=BATCH_ROWS)  # memory-mapped: only a batch is read
    yield from column_texts((t.column(options.text_field) for t in tables), options.text_field, where, options.errors)
