"""Conversations in .jsonl files (one `{"messages": [...]}` per line) -> a chat dataset folder: per split the
token ids, the loss mask and the conversations' offsets (the files chat.py describes), and meta.json. The template
is the base tokenizer's own when it has one (a Hugging Face model's, jinja_chat.py), else gptrain's (chat.py).

The inputs are read in streaming passes, so memory stays flat however many conversations there are: the
characters (only for a char vocabulary made from the conversations), a survey (each conversation checked against
the template and its rendered length measured; the first bad one stops the preparation with its file and line,
or with on_error="skip" every bad one is left out and counted), then the writing of the good ones. The
validation split takes whole conversations, chosen by a seeded draw. The out folder follows prepare.py's rules:
a different dataset already there is refused without overwrite, and the files appear all at once or not at all.

The same passes read preference pairs (TRL's formats, preference_prepare.py says what a pair is and how it is
stored): what the files hold (a Conversations or a Pairs "source") is told by each file's first line of a known
kind, and every pass asks the source to check a line, to give the characters of its content and to render it into
its sequences (one per conversation, two per pair: the chosen answer's and the rejected one's).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptrain.data.chat import JINJA, BadConversation, adds_chat_tokens, base_meta, check_messages
from gptrain.data.jinja_chat import Template, template_for
from gptrain.data.preference_prepare import CONVERSATIONS, TEXT_PAIRS, Pairs, record_kind
from gptrain.data.prepare import check_existing, publish_or_verify
from gptrain.data.tokenizer import meta_fields, open_tokenizer, smallest_token_dtype, tokenizer_from_meta
from gptrain.errors import UserError
from gptrain.runtime import names, outdir
from gptrain.runtime.files import require_file
from gptrain.runtime.publish import staged
from gptrain.runtime.signals import stop_if_signalled

SPLITS = ("train", "val")
ON_ERROR = ("stop", "skip")


@dataclass
class ChatPrepareOptions:
    tokenizer: str = "char"  # char, a tiktoken name, or a folder with your own BPE's tokenizer.json
    block_size: int | None = None  # required, except with from:MODEL (then the model's)
    val_fraction: float = 0.1
    seed: int = 1337
    on_error: str = "stop"
    overwrite: bool = False
    checkpoint: CheckpointTokenizer | None = None  # --tokenizer from:MODEL, read (then `tokenizer` is not used)


class Problems:
    """Bad conversations: the first stops the preparation, or (skip) each is left out and counted by kind."""

    def __init__(self, on_error: str, noun: str = "conversation"):
        self.skip = on_error == "skip"
        self.noun = noun
        self.counts: Counter[str] = Counter()
        self.first: str | None = None

    def add(self, where: str, problem: BadConversation) -> None:
        if not self.skip:
            raise UserError(f"{where}: {problem}; fix or remove the {self.noun}, or pass --on_error skip to leave "
                            f"such {self.noun}s out")
        self.counts[problem.kind] += 1
        self.first = self.first or f"{where}: {problem}"

    def summary(self) -> str:
        if not self.counts:
            return ""
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.counts.most_common())
        return f"skipped {sum(self.counts.values())} bad {self.noun}s ({kinds}); the first: {self.first}"


# ----- reading ------------------------------------------------------------------------------------------------


def read_records(files: list[Path]) -> Iterator[tuple[str, object]]:
    """(file:line, the line's JSON value or a BadConversation saying why it has none) for every non-blank line."""
    for path in files:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                stop_if_signalled()  # every pass over the conversations reads them here
                if raw.strip():
                    yield f"{path}:{number}", parse_line(raw)


def parse_line(raw: bytes):
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return BadConversation("not UTF-8", f"byte {exc.start} of the line is not UTF-8")
    except json.JSONDecodeError as exc:
        return BadConversation("not JSON", f"the line is not valid JSON ({exc.msg})")
    except (ValueError, RecursionError):
        return BadConversation("not JSON", "the line is not JSON gptrain can read (nested too deeply, or a number "
                               "of thousands of digits)")


class Conversations:
    """What a chat dataset is made of, for the passes: one conversation a line, one sequence each (Pairs, in
    preference_prepare.py, has the same interface)."""

    noun = "conversation"
    kind = CONVERSATIONS
    sequences_per_item = 1
    char_end_of_text = False

    def __init__(self, first: dict[str, str]):
        self.first = first  # each file's first line of its kind

    def check(self, record) -> list[dict]:
        return check_messages(record)

    def contents(self, messages: list[dict]) -> list[str]:
        return [m["content"] for m in messages]

    def renderer(self, base) -> Template:
        return template_for(base)

    def sequences(self, template: Template, messages: list[dict]) -> list[tuple[list[int], list[int]]]:
        return [template.render(messages)]

    def too_long(self, length: int, block_size: int) -> str:
        return (f"the conversation is {length} tokens, more than --block_size {block_size}; shorten it or raise "
                "--block_size")

    def meta_fields(self) -> dict:
        return {}

    def split_counts(self, items: dict[str, int]) -> dict:
        return {}


Source = Conversations | Pairs
ONE_KIND = ("the lines of a dataset are all conversations, all preference pairs of messages or all plain-text ones: "
            "prepare the others into a dataset of their own")


def source_of(files: list[Path]) -> Source:
    """What the files hold, told by each file's first line of a known kind (conversations when none has one); files
    of different kinds are refused."""
    kind, first = None, {}
    for path in files:
        for where, record in read_records([path]):
            found = None if isinstance(record, BadConversation) else record_kind(record)
            if found is None:
                continue
            if kind is not None and found != kind:
                raise UserError(f"{where} holds {found}, but {next(iter(first.values()))} holds {kind}; {ONE_KIND}")
            kind, first[str(path)] = found, where
            break
    return Conversations(first) if kind in (None, CONVERSATIONS) else Pairs(kind, first)


def items(files: list[Path], source: Source) -> Iterator[tuple[int, str, object, BadConversation | None]]:
    """(index, file:line, the checked conversation or pair, what is wrong) for every line, in order; one of the last
    two is None. A line of another kind than its file's stops the preparation."""
    for index, (where, record) in enumerate(read_records(files)):
        if isinstance(record, BadConversation):
            yield index, where, None, record
            continue
        found = record_kind(record)
        if found is not None and found != source.kind:
            raise UserError(f"{where} holds {found}, but {source.first[where.rsplit(':', 1)[0]]} holds "
                            f"{source.kind}; {ONE_KIND}")
        try:
            item, problem = source.check(record), None
        except BadConversation as bad:
            item, problem = None, bad
        yield index, where, item, problem


def charset(files: list[Path], source: Source) -> set[str]:
    """The characters of every well-formed conversation's (or pair's) content."""
    found = set()
    for _, _, item, _ in items(files, source):
        for text in source.contents(item) if item is not None else ():
            found.update(text)
    return found


# ----- the base tokenizer and the block size ------------------------------------------------------------------


@dataclass
class CheckpointTokenizer:
    """What --tokenizer from:MODEL names, read by the caller from the checkpoint or the Hugging Face model folder:
    its tokenizer (a dataset's meta.json, chat template included if it has one) and its model's context length."""

    source: str
    meta: dict
    block_size: int


def base_tokenizer(choice: str, files: list[Path], block_size: int | None, checkpoint: CheckpointTokenizer | None,
                   source: Source):
    """The base tokenizer named by --tokenizer, and the block size: --block_size, or a checkpoint's model's. A char
    vocabulary for plain-text pairs has an end token (CHAR_END_OF_TEXT), which ends their answers."""
    if checkpoint is None:
        if block_size is None:
            raise UserError("--block_size is required (the longest conversation, in tokens, the model will read); "
                            "with --tokenizer from:MODEL it defaults to the model's")
        characters = charset(files, source) if choice == "char" else None
        return open_tokenizer(choice, characters, 2 if source.char_end_of_text else 1), block_size
    if source.kind == TEXT_PAIRS and adds_chat_tokens(checkpoint.meta):
        raise UserError(f"{checkpoint.source} is a chat model of gptrain's template: give its preference pairs as "
                        'messages ({"prompt": [...], "chosen": [...], "rejected": [...]}), read through its template')
    if block_size is not None and block_size > checkpoint.block_size:
        raise UserError(f"--block_size {block_size} is longer than {checkpoint.source}'s model reads "
                        f"({checkpoint.block_size} tokens); use at most {checkpoint.block_size}")
    return tokenizer_from_meta(base_meta(checkpoint.meta), checkpoint.source), block_size or checkpoint.block_size


# ----- the survey and the split ------------------------------------------------------------------------------


@dataclass
class Survey:
    good: list[int]  # indices of the conversations that will be written
    characters: int  # of their content


def survey(files: list[Path], source: Source, renderer, block_size: int, problems: Problems) -> Survey:
    good, characters = [], 0
    for index, where, item, problem in items(files, source):
        problem = problem or length_problem(source, renderer, item, block_size)
        if problem:
            problems.add(where, problem)
            continue
        good.append(index)
        characters += sum(map(len, source.contents(item)))
    return Survey(good, characters)


def length_problem(source: Source, renderer, item, block_size: int) -> BadConversation | None:
    """Why the conversation (or pair) cannot be rendered, or does not fit one block_size row, if so."""
    try:
        length = max(len(ids) for ids, _ in source.sequences(renderer, item))
    except BadConversation as problem:  # characters outside the base vocabulary, answers the template hides
        return problem
    if length > block_size:
        return BadConversation("too long", source.too_long(length, block_size))
    return None


def choose_val(good: list[int], val_fraction: float, seed: int, noun: str = "conversation") -> set[int]:
    """Whole conversations (or pairs) for the validation split, by a seeded draw."""
    count = max(1, round(len(good) * val_fraction))
    if count >= len(good):
        raise UserError(f"val_fraction {val_fraction} leaves no training {noun}s out of {len(good)}; lower it "
                        f"or add {noun}s")
    return set(np.random.default_rng(seed).choice(good, size=count, replace=False).tolist())


# ----- writing ------------------------------------------------------------------------------------------------


class SplitWriter:
    """One split's files in the staging folder: the ids, the mask, the conversations' offsets."""

    def __init__(self, folder: Path, split: str, dtype: str):
        self.dtype = dtype
        self.files = [open(folder / f"{name}.bin", "wb") for name in (split, f"{split}_mask", f"{split}_docs")]
        self.tokens = 0
        self.conversations = 0
        self.max_id = 0

    def add(self, ids: list[int], mask: list[int]) -> None:
        tokens, targets, offsets = self.files
        np.asarray(ids, dtype=self.dtype).tofile(tokens)
        np.asarray(mask, dtype=np.uint8).tofile(targets)
        np.asarray([self.tokens], dtype=np.int64).tofile(offsets)
        self.tokens += len(ids)
        self.conversations += 1
        self.max_id = max(self.max_id, *ids)

    def close(self) -> None:
        for f in self.files:
            f.close()


def write_splits(files: list[Path], folder: Path, source: Source, renderer, dtype: str, keep: set[int],
                 val: set[int]) -> dict:
    """Render the kept conversations (or pairs) into folder (the staging folder); returns the counts meta.json
    records."""
    writers = {split: SplitWriter(folder, split, dtype) for split in SPLITS}
    written = dict.fromkeys(SPLITS, 0)
    try:
        for index, _, item, _ in items(files, source):
            if index in keep:
                split = "val" if index in val else "train"
                for ids, mask in source.sequences(renderer, item):
                    writers[split].add(ids, mask)
                written[split] += 1
    finally:
        for writer in writers.values():
            writer.close()
    counts = {f"{split}_tokens": writers[split].tokens for split in SPLITS}
    counts |= {f"{split}_conversations": writers[split].conversations for split in SPLITS}
    counts["max_token_id"] = max(writer.max_id for writer in writers.values())
    return counts | source.split_counts(written)


# ----- the whole preparation ---------------------------------------------------------------------------------


def prepare_chat(inputs: list[Path], out_dir: Path, options: ChatPrepareOptions) -> tuple[dict, bool, Problems]:
    """Prepare the conversations in `inputs` into out_dir; returns meta.json's content, whether out_dir already
    held exactly this dataset (then nothing was written), and the bad conversations skipped. A failed preparation
    leaves out_dir as it found it."""
    check_options(options)
    outdir.check_creatable(out_dir, "--out")
    files = [require_file(Path(p), "input", 'give .jsonl files of conversations ({"messages": [...]}) or of '
                          'preference pairs ({"prompt": ..., "chosen": ..., "rejected": ...}), one per line')
             for p in inputs]
    source = source_of(files)
    base, block_size = base_tokenizer(options.tokenizer, files, options.block_size, options.checkpoint, source)
    renderer = source.renderer(base)
    problems = Problems(options.on_error, source.noun)
    found = survey(files, source, renderer, block_size, problems)
    if not found.good:
        why = problems.summary() or "the files hold none"
        raise UserError(f"no usable {source.noun}s in {', '.join(map(str, inputs))}; {why}")
    val = choose_val(found.good, options.val_fraction, options.seed, source.noun)
    meta = chat_meta(base, renderer, found, block_size, problems, source)
    with outdir.claimed(out_dir, "--out"):
        keep_existing = check_existing(out_dir, meta, options.overwrite)
        with staged(out_dir, names.GPTRAIN_OUTPUT) as stage:
            meta.update(write_splits(files, stage.path, source, renderer, meta["dtype"], set(found.good), val))
            publish_or_verify(stage, meta, keep_existing)
    return meta, keep_existing, problems


def check_options(options: ChatPrepareOptions) -> None:
    if not 0.0 < options.val_fraction < 1.0:  # also refuses nan
        raise UserError(f"--val_fraction must be between 0 and 1, got {options.val_fraction}")
    if not 0 <= options.seed < 2**63:
        raise UserError(f"--seed must be between 0 and 2**63 - 1, got {options.seed}")
    if options.block_size is not None and options.block_size < 1:
        raise UserError(f"--block_size must be a positive number of tokens, got {options.block_size}")
    if options.on_error not in ON_ERROR:
        raise UserError(f"--on_error must be one of {', '.join(ON_ERROR)}, got {options.on_error!r}")


def chat_meta(base, renderer, found: Survey, block_size: int, problems: Problems, source: Source) -> dict:
    """meta.json's content, the counts still to be filled in (the key order is part of the bytes). Plain-text pairs
    have no template, so no "chat" entry."""
    fields = meta_fields(base)
    # A tokenizer's JSON is one very long line: it goes last, below the figures a reader looks for.
    carried = {"tokenizer_json": fields.pop("tokenizer_json")} if "tokenizer_json" in fields else {}
    vocab_size = renderer.tokenizer.vocab_size
    block = renderer.chat_block()
    return {
        "tokenizer": base.name,
        "vocab_size": vocab_size,
        "dtype": smallest_token_dtype(vocab_size),
        **fields,
        **({"chat": block} if block is not None else {}),
        "train_tokens": None,
        "val_tokens": None,
        "max_token_id": None,
        "characters": found.characters,
        "documents": len(found.good) * source.sequences_per_item,  # the sequences: conversations, 2 per pair
        "split": f"by {source.noun}",
        "block_size": block_size,  # every sequence fits in this many tokens
        "train_conversations": None,
        "val_conversations": None,
        **source.meta_fields(),
        f"skipped_{source.noun}s": sum(problems.counts.values()),
        **carried,
    }


def describe(meta: dict, out_dir: Path, unchanged: bool) -> str:
    """What gptrain prepare chat prints when it is done."""
    if meta.get("preference") is True:
        pairs = meta["pairs"]
        counted = (f"{pairs['train'] + pairs['val']:,} preference pairs ({pairs['train']:,} train, {pairs['val']:,} "
                   f"val), each answer with its prompt at most {meta['block_size']} tokens")
    else:
        counted = (f"{meta['documents']:,} conversations ({meta['train_conversations']:,} train, "
                   f"{meta['val_conversations']:,} val), each at most {meta['block_size']} tokens")
    return (f"{counted}\n"
            f"tokenizer {meta['tokenizer']} {template_words(meta.get('chat'))}, vocab size {meta['vocab_size']:,} "
            f"({meta['dtype']})\n"
            f"train has {meta['train_tokens']:,} tokens, val has {meta['val_tokens']:,} tokens\n"
            + (f"{out_dir} already held this dataset, byte for byte: left unchanged" if unchanged
               else f"wrote {out_dir}/train.bin, val.bin, their _mask.bin and _docs.bin, meta.json"))


def template_words(block: dict | None) -> str:
    """How describe names the template of a "chat" entry (None: plain text, no template)."""
    if block is None:
        return "without a chat template (plain text)"
    if block.get("template") == JINJA:
        return "with the model's own chat template"
    return f"+ {len(block['special_tokens'])} chat tokens"
