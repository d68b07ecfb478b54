"""The inputs of prepare_text.py and train_tokenizer.py, read one document at a time, in pieces of bounded size.

A text file is one document; a folder stands for its .txt, .md and .parquet files; a .jsonl file holds a document
a line, a Parquet file a document a row (read a batch of rows at a time, never a whole file); a folder written by
Hugging Face `datasets` (save_to_disk) or an input `hf:NAME[:CONFIG]` (a dataset already in the local cache,
read without any network) holds a document a row of one split. Memory stays flat however large the corpus.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gptrain.data import arrow_input
from gptrain.errors import UserError
from gptrain.runtime.files import kind_of, require_file
from gptrain.runtime.signals import stop_if_signalled

READ_BYTES = 1 << 22  # a text file is read, decoded and tokenised 4 MB at a time
TEXT_SUFFIXES = (".txt", ".md")
PARQUET = ".parquet"
HF_PREFIX = "hf:"

# A document: its text in pieces, each (text, whether it is the document's last piece).
Document = Iterator[tuple[str, bool]]


@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"  # the field of a JSON line, or the column of a table, that holds the text
    errors: str = "strict"  # undecodable bytes: "strict" stops with an error, "replace" puts U+FFFD instead
    split: str = "train"  # the split of a Hugging Face dataset


@dataclass(frozen=True)
class Source:
    """One input: "text", "jsonl", "parquet", "hf-disk" (a save_to_disk folder) or "hf-cache" (a cached name)."""

    kind: str
    where: Path | str

    def __str__(self) -> str:
        return str(self.where)


@dataclass
class Piece:
    """A stretch of one document's text; `last` marks the document's end (where BPE adds <|endoftext|>)."""

    doc: int
    text: str
    last: bool


def expand_inputs(inputs: list[Path]) -> list[Source]:
    """Files as given; folders become their .txt/.md/.parquet files, recursively, in sorted order, unless
    Hugging Face datasets wrote them; `hf:NAME` names a dataset in the local cache."""
    sources = []
    for path in map(Path, inputs):
        if str(path).startswith(HF_PREFIX):
            sources.append(Source("hf-cache", str(path)[len(HF_PREFIX):]))
        elif kind_of(path) == "dir":
            sources.extend(folder_sources(path))
        else:
            require_file(path, "input", "give text, .jsonl or .parquet files, folders of them, or hf:NAME")
            sources.append(Source(file_kind(path), path))
    return sources


def file_kind(path: Path) -> str:
    return {".jsonl": "jsonl", PARQUET: "parquet"}.get(path.suffix, "text")


def folder_sources(path: Path) -> list[Source]:
    if arrow_input.is_saved_dataset(path):
        return [Source("hf-disk", path)]
    found = sorted(p for p in path.rglob("*") if p.suffix in (*TEXT_SUFFIXES, PARQUET) and p.is_file())
    if not found:
        raise UserError(f"folder {path} has no .txt, .md or .parquet files, nor is it a dataset saved by Hugging Face "
                        "datasets (save_to_disk)")
    return [Source(file_kind(p), p) for p in found]


def size_estimate(source: Source, options: ReadOptions) -> int | None:
    """About how many bytes of text a source holds (for progress bars); None when that is not known cheaply."""
    if source.kind in ("text", "jsonl"):
        return Path(source.where).stat().st_size
    if source.kind == "parquet":
        return arrow_input.parquet_text_bytes(Path(source.where), options.text_field)
    return None


def iter_pieces(sources: list[Source], options: ReadOptions) -> Iterator[Piece]:
    """Every document's text, in order, in pieces of bounded size; empty documents are skipped. Every reader of
    a corpus goes through here: it is where a long read notices a signal that was lost on the way."""
    doc = 0
    for source in sources:
        for pieces in documents(source, options):
            emitted = False
            for text, last in pieces:
                stop_if_signalled()
                if text or (last and emitted):
                    yield Piece(doc, text, last)
                    emitted = True
            doc += emitted


def documents(source: Source, options: ReadOptions) -> Iterator[Document]:
    if source.kind == "text":
        return iter([text_pieces(Path(source.where), options.errors)])
    if source.kind == "jsonl":
        return jsonl_documents(Path(source.where), options)
    if source.kind == "parquet":
        return whole_texts(arrow_input.parquet_texts(Path(source.where), options))
    if source.kind == "hf-disk":
        return whole_texts(arrow_input.saved_dataset_texts(Path(source.where), options))
    return whole_texts(arrow_input.cached_dataset_texts(str(source.where), options))


def whole_texts(texts: Iterator[str]) -> Iterator[Document]:
    """Documents that each come as one text (a JSON line, a table row)."""
    for text in texts:
        yield iter([(text, True)])


def text_pieces(path: Path, errors: str) -> Document:
    """Decode a file incrementally and cut it where BPE would cut anyway: after a lone newline between two
    non-space characters. GPT-2's and GPT-4's pre-tokenisers make such a newline a token of its own, in the whole
    text and at the end of a piece alike (a run of whitespace would not be: at the end of a string it stays one
    token), so the pieces tokenise exactly as the whole file would."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    carry, offset = "", 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(READ_BYTES)
            try:
                text = carry + decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}: the bytes at offset {offset + exc.start} are not UTF-8; convert the file "
                                "or pass --errors replace") from None
            offset += len(chunk)
            if not chunk:
                yield text, True
                return
            cut = safe_cut(text)
            carry = text[cut:]
            if cut:
                yield text[:cut], False


def safe_cut(text: str) -> int:
    """The position just after the text's last newline with a non-space character on either side, or 0."""
    search_end = len(text) - 1
    while True:
        cut = text.rfind("\n", 1, search_end)
        if cut < 0:
            return 0
        if not text[cut - 1].isspace() and not text[cut + 1].isspace():
            return cut + 1
        search_end = cut


def jsonl_documents(path: Path, options: ReadOptions) -> Iterator[Document]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if raw.strip():
                text = jsonl_text(raw, f"{path}:{number}", options)
                yield iter([(valid_unicode(text, options.errors, f"{path}:{number}"), True)])


def jsonl_text(raw: bytes, where: str, options: ReadOptions) -> str:
    try:
        record = json.loads(raw.decode("utf-8", options.errors))
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: byte {exc.start} of the line is not UTF-8; fix it or pass --errors "
                        "replace") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{where} is not valid JSON ({exc.msg})") from None
    except (ValueError, RecursionError):
        raise UserError(f"{where} is not JSON gptrain can read (nested too deeply, or a number of thousands of "
                        "digits)") from None
    text = record.get(options.text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise UserError(f"{where} has no string field {options.text_field!r}; name the field holding the text with "
                        "--text_field")
    return text


def valid_unicode(text: str, errors: str, where: str) -> str:
    """JSON can spell lone surrogates (\\ud800), which are no character and cannot be encoded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        if errors == "replace":
            return text.encode("utf-8", "replace").decode("utf-8")
        raise UserError(f"{where}: the text holds a lone surrogate ({text[exc.start]!a}), which is not a character; "
                        "fix the line or pass --errors replace") from None
    return text
