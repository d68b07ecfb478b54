"""`gptrain eval`: a checkpoint's loss, perplexity and bits per byte on text files and dataset splits, and its
accuracy on multiple-choice questions in HellaSwag's format.

Long inputs are scored in windows of block_size tokens that start `stride` tokens apart (the sliding window of
Hugging Face's perplexity guide): each window scores only the tokens the previous one did not, with the tokens
before them as context, so every token after the first is scored once, with at least block_size - stride tokens
of context (fewer only in the first window). The first token is context only. Tokens are read and scored a chunk
at a time, so memory stays flat whatever the input's size.

Bits per byte (nanochat's figure) is the summed loss in bits over the UTF-8 bytes of the scored tokens: unlike the
loss per token, it does not depend on the tokenizer, so a character model and a BPE model compare on the same
text. The end-of-text token a BPE dataset puts between documents is no text: it counts 0 bytes (its loss counts).

The model computes in float32 on every device (no TF32, no autocast), so a CPU and a GPU give the same figures
to about six digits.
"""

from __future__ import annotations

import codecs
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gptrain.checkpoint import find_checkpoint, model_from_checkpoint
from gptrain.data.dataset import check_same_tokenizer, check_token_range, load_meta, open_split, resolve_dataset_dir
from gptrain.data.readers import safe_cut
from gptrain.data.tokenizer import tokenizer_from_meta
from gptrain.errors import UserError
from gptrain.model import GPT
from gptrain.monitor.console import quiet_bar
from gptrain.monitor.metrics import finite_or_none
from gptrain.runtime.device import resolve_device
from gptrain.runtime.files import read_text, require_file
from gptrain.runtime.signals import stop_if_signalled

READ_BYTES = 1 << 16  # a text file is read and tokenised 64 KiB at a time
CHUNK_TOKENS = 1 << 16  # a dataset split is read 64K tokens at a time
# The longest default window: the open models' contexts (32k-128k tokens) would make one window's logits alone
# tens of gigabytes (131,072 positions x 128,256 tokens x 4 bytes for Llama 3.2).
DEFAULT_WINDOW = 2048
LOGITS_BUDGET = 1 << 25  # float32 logits per forward pass (128 MiB): windows are batched up to this
MAX_ROWS = 64  # ... and up to this many windows a batch


@dataclass
class EvalOptions:
    ckpt: Path
    texts: list[Path] = field(default_factory=list)
    dataset: str | None = None
    split: str | None = None  # val when a dataset is given
    hellaswag: Path | None = None
    stride: int | None = None  # block_size // 2 when not given
    device: str = "auto"
    block_size: int | None = None  # the window: the model's context, at most DEFAULT_WINDOW, when not given


@dataclass
class Score:
    """The summed loss of one input's scored tokens, and the UTF-8 bytes those tokens stand for."""

    name: str
    tokens: int = 0
    bytes: int = 0
    nats: float = 0.0

    @property
    def loss(self) -> float:
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        try:
            return math.exp(self.loss)
        except OverflowError:  # a loss above ~709 nats per token
            return math.inf

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / self.bytes if self.bytes else math.nan


@dataclass
class Choices:
    """Multiple-choice results: `correct` picks the ending of lowest summed loss (acc), `correct_norm` the one of
    lowest mean loss per token (acc_norm, which does not favour short endings)."""

    name: str
    examples: int = 0
    correct: int = 0
    correct_norm: int = 0


@dataclass
class Report:
    checkpoint: str
    device: str
    block_size: int
    stride: int
    inputs: list[Score]
    choices: Choices | None


# ----- the model's per-token loss --------------------------------------------------------------------------------


class Scorer:
    def __init__(self, model: GPT, device: torch.device, tokenizer, block_size: int | None = None):
        self.model, self.device, self.tokenizer = model, device, tokenizer
        self.block_size = min(model.config.block_size, DEFAULT_WINDOW) if block_size is None else block_size
        if not 1 <= self.block_size <= model.config.block_size:
            raise UserError(f"--block_size must be between 1 and the model's context {model.config.block_size}, got "
                            f"{self.block_size}")
        self.byte_lengths = token_byte_lengths(tokenizer)  # (V,)

    @torch.no_grad()
    def token_losses(self, idx: np.ndarray, targets: np.ndarray) -> torch.Tensor:
        """The loss (B, T) of predicting each target from the tokens of idx up to it; targets of -1 are not
        scored (loss 0). idx and targets: (B, T) int64."""
        x = torch.from_numpy(idx).to(self.device)
        y = torch.from_numpy(targets).to(self.device)
        logits, _ = self.model(x, y)  # (B, T, V)
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")
        return losses.view_as(y)


def token_byte_lengths(tokenizer) -> np.ndarray:
    """The UTF-8 length of every token id (V,): a chunk's bytes are then one table lookup, exact even where a BPE
    token holds part of a character."""
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for token in range(tokenizer.vocab_size):
        if token != tokenizer.eot_token:
            try:
                lengths[token] = len(tokenizer.token_bytes(token))
            except KeyError:  # an id no text maps to (tiktoken leaves gaps among its special tokens)
                pass
    return lengths


# ----- sliding windows over a token stream ------------------------------------------------------------------------


class SlidingWindow:
    """Scores a stream of token chunks window by window. Window k starts at token k * stride and scores the tokens
    after the previous window's last, up to its own last (block_size tokens after its start)."""

    def __init__(self, scorer: Scorer, stride: int, rows: int | None = None):
        self.scorer, self.stride, self.block_size = scorer, stride, scorer.block_size
        vocab = scorer.model.config.vocab_size
        self.rows = rows or max(1, min(MAX_ROWS, LOGITS_BUDGET // (self.block_size * vocab)))

    def score(self, chunks: Iterator[np.ndarray], name: str) -> Score:
        score = Score(name)
        buffer = np.zeros(0, dtype=np.int64)  # the tokens from position `base` on
        base = start = scored_to = 0  # start: the next window's first token; scored_to: the last token scored
        for chunk in chunks:
            stop_if_signalled()
            buffer = np.concatenate([buffer, chunk.astype(np.int64)])
            end = base + len(buffer)
            while start + self.block_size < end:  # a whole window (block_size + 1 tokens) is there
                starts = np.arange(start, end - self.block_size, self.stride)[: self.rows]
                scored_to = self.score_windows(score, buffer, starts - base, scored_to - base) + base
                start = int(starts[-1]) + self.stride
            buffer, base = buffer[start - base:], start
        if base + len(buffer) < 2:
            raise UserError(f"{name} holds {base + len(buffer)} token(s); at least 2 are needed (the first is only "
                            "the context of the second)")
        if scored_to < base + len(buffer) - 1:  # the last window is short: it ends where the tokens do
            self.score_windows(score, buffer, np.array([start - base]), scored_to - base, len(buffer) - 1)
        return score

    def score_windows(self, score: Score, tokens: np.ndarray, starts: np.ndarray, scored_to: int,
                      length: int | None = None) -> int:
        """Score the windows of `length` (block_size) inputs at `starts` in tokens, each the tokens after the
        previous one's end (the first: after scored_to). Returns the position of the last token scored."""
        length = self.block_size if length is None else length
        rows = tokens[starts[:, None] + np.arange(length + 1)]  # (R, T + 1)
        ends = starts + length  # the last token each window scores
        firsts = np.maximum(np.concatenate([[scored_to], ends[:-1]]) - starts, 0)  # first scored target, per row
        scored = np.arange(length) >= firsts[:, None]  # (R, T)
        targets = np.where(scored, rows[:, 1:], -1)
        losses = self.scorer.token_losses(rows[:, :-1], targets)
        score.tokens += int(scored.sum())
        score.bytes += int(self.scorer.byte_lengths[rows[:, 1:]][scored].sum())
        score.nats += losses.sum().item()
        return int(ends[-1])


# ----- inputs: text files and dataset splits ------------------------------------------------------------------------


def text_chunks(path: Path, tokenizer) -> Iterator[np.ndarray]:
    """A text file's tokens, a piece at a time, cut where the tokenizer would cut anyway (data.readers'
    safe_cut), so the pieces tokenise exactly as the whole file would. One piece per read, the last at the end."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, offset = "", 0
    with open(path, "rb") as f:
        while True:
            data = f.read(READ_BYTES)
            final = len(data) < READ_BYTES
            held = len(decoder.getstate()[0])  # bytes of a character begun in the previous read
            try:
                text = carry + decoder.decode(data, final=final)
            except UnicodeDecodeError as exc:
                raise UserError(f"--text {path} is not UTF-8 text: the bytes at offset {offset - held + exc.start} "
                                "cannot be decoded; save it as UTF-8") from None
            offset += len(data)
            cut = len(text) if final else safe_cut(text)
            carry = text[cut:]
            try:
                yield tokenizer.encode_array(text[:cut], "int64")
            except UserError as exc:  # a character the model's vocabulary lacks
                raise UserError(f"--text {path}: {exc}") from None
            if final:
                return


def score_text(window: SlidingWindow, path: Path) -> Score:
    pieces = path.stat().st_size // READ_BYTES + 1
    chunks = quiet_bar(text_chunks(path, window.scorer.tokenizer), desc=f"eval {path.name}", total=pieces)
    return window.score(chunks, str(path))


def score_split(window: SlidingWindow, dataset: str, split: str, ckpt_meta: dict, source: Path) -> Score:
    """A prepared split, read from its memory map a chunk at a time (TokenFile releases the pages it read)."""
    folder = resolve_dataset_dir(dataset)
    meta = load_meta(folder)
    check_same_tokenizer(ckpt_meta, meta, source)
    tokens = open_split(folder, split, meta["dtype"], window.scorer.model.config.vocab_size)
    check_token_range(tokens, meta)
    total = tokens.num_tokens
    chunks = (tokens.gather(np.array([at]), min(CHUNK_TOKENS, total - at))[0]
              for at in range(0, total, CHUNK_TOKENS))
    bar = quiet_bar(chunks, desc=f"eval {split}", total=math.ceil(total / CHUNK_TOKENS))
    return window.score(bar, f"{folder} {split}")


# ----- multiple choice: HellaSwag's format --------------------------------------------------------------------------


@dataclass
class Question:
    context: list[int]
    endings: list[list[int]]
    label: int


def read_questions(path: Path, tokenizer, block_size: int) -> list[Question]:
    """Every question of a .jsonl file in HellaSwag's format, tokenised; any bad line is an error naming it
    before anything is scored. Blank lines are skipped."""
    text = read_text(path, "--hellaswag file", "give a .jsonl file in HellaSwag's format (ctx, endings, label)")
    questions = []
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                questions.append(parse_question(line, tokenizer, block_size))
            except UserError as exc:
                raise UserError(f"--hellaswag {path}, line {number}: {exc}") from None
    if not questions:
        raise UserError(f"--hellaswag {path} holds no questions; give HellaSwag's hellaswag_val.jsonl or the like")
    return questions


def parse_question(line: str, tokenizer, block_size: int) -> Question:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise UserError(f"not valid JSON ({getattr(exc, 'msg', 'nested too deeply')})") from None
    ctx, endings, label = (record.get(k) if isinstance(record, dict) else None for k in ("ctx", "endings", "label"))
    if not isinstance(ctx, str) or not ctx:
        raise UserError("needs 'ctx', a non-empty string")
    if not (isinstance(endings, list) and len(endings) >= 2 and all(isinstance(e, str) for e in endings)):
        raise UserError("needs 'endings', a list of at least 2 strings (HellaSwag has 4)")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
        raise UserError(f"needs 'label', the index of the right ending (0 to {len(endings) - 1}), got {label!r}")
    # build-nanogpt's rule: an ending follows the context after a space, tokenised with it (for BPE, " word" is one
    # token, as in running text).
    tokens = [tokenizer.encode(" " + ending) for ending in endings]
    longest = max(map(len, tokens))
    if longest > block_size:
        raise UserError(f"an ending of {longest} tokens does not fit the model's block_size {block_size}")
    return Question(tokenizer.encode(ctx), tokens, label)


def question_rows(question: Question, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets (E, L) for the context followed by each ending; only the ending's tokens are targets
    (the rest -1). A context too long for block_size keeps its last tokens; rows are padded at the end."""
    sequences = [(question.context + ending)[-(block_size + 1):] for ending in question.endings]
    width = max(map(len, sequences)) - 1
    idx = np.zeros((len(sequences), width), dtype=np.int64)
    targets = np.full((len(sequences), width), -1, dtype=np.int64)
    for row, (sequence, ending) in enumerate(zip(sequences, question.endings)):
        idx[row, : len(sequence) - 1] = sequence[:-1]
        targets[row, len(sequence) - 1 - len(ending): len(sequence) - 1] = ending
    return idx, targets


def score_questions(scorer: Scorer, path: Path) -> Choices:
    questions = read_questions(path, scorer.tokenizer, scorer.block_size)
    choices = Choices(str(path))
    for question in quiet_bar(questions, desc=f"eval {path.name}"):
        summed = scorer.token_losses(*question_rows(question, scorer.block_size)).sum(dim=1)  # (E,)
        lengths = torch.tensor([len(e) for e in question.endings], device=summed.device)
        choices.examples += 1
        choices.correct += int(summed.argmin()) == question.label
        choices.correct_norm += int((summed / lengths).argmin()) == question.label
    return choices


# ----- the command ------------------------------------------------------------------------------------------------


def check_inputs(options: EvalOptions) -> None:
    """What can be told before the checkpoint is loaded."""
    if options.split is not None and options.dataset is None:
        raise UserError("--split chooses a split of --dataset DIR; give --dataset too")
    if not (options.texts or options.dataset or options.hellaswag):
        raise UserError("gptrain eval needs something to score: --text FILE ..., --dataset DIR, --hellaswag FILE or "
                        "--tasks NAME")
    for path in options.texts:
        require_file(path, "--text", "give UTF-8 text files")
    if options.hellaswag is not None:
        require_file(options.hellaswag, "--hellaswag file", "give a .jsonl file in HellaSwag's format; see "
                     "docs/evaluation.md for where to download hellaswag_val.jsonl")


def load_scorer(ckpt: Path, device_name: str, block_size: int | None = None) -> tuple[Scorer, dict, Path]:
    device = resolve_device(device_name)
    path = find_checkpoint(ckpt)
    model, state = model_from_checkpoint(path, device)
    model.eval()
    if not state.get("dataset_meta"):
        raise UserError(f"{path} records no tokenizer, so text cannot be turned into its tokens")
    tokenizer = tokenizer_from_meta(state["dataset_meta"])
    return Scorer(model, device, tokenizer, block_size), state["dataset_meta"], path


def run_eval(options: EvalOptions) -> Report:
    check_inputs(options)
    scorer, meta, path = load_scorer(options.ckpt, options.device, options.block_size)
    stride = options.stride if options.stride is not None else max(1, scorer.block_size // 2)
    if not 1 <= stride <= scorer.block_size:
        raise UserError(f"--stride must be between 1 and the window's block_size {scorer.block_size}, got {stride}")
    window = SlidingWindow(scorer, stride)
    inputs = [score_text(window, text) for text in options.texts]
    if options.dataset is not None:
        inputs.append(score_split(window, options.dataset, options.split or "val", meta, path))
    choices = score_questions(scorer, options.hellaswag) if options.hellaswag is not None else None
    return Report(str(path), str(scorer.device), scorer.block_size, stride, inputs, choices)


def to_json(report: Report) -> str:
    result = {"checkpoint": report.checkpoint, "device": report.device, "block_size": report.block_size,
              "stride": report.stride, "inputs": [
                  {"name": s.name, "tokens": s.tokens, "bytes": s.bytes, "loss": finite_or_none(s.loss),
                   "perplexity": finite_or_none(s.perplexity), "bits_per_byte": finite_or_none(s.bits_per_byte)}
                  for s in report.inputs]}
    if report.choices is not None:
        c = report.choices
        result["hellaswag"] = {"name": c.name, "examples": c.examples, "acc": c.correct / c.examples,
                               "acc_norm": c.correct_norm / c.examples}
    return json.dumps(result, indent=1)


def render(report: Report) -> str:
    lines = [f"{report.checkpoint} on {report.device}: block_size {report.block_size}, stride {report.stride}"]
    if report.inputs:
        width = max(len("input"), *(len(s.name) for s in report.inputs))
        lines.append(f"{'input':<{width}}  {'tokens':>12}  {'bytes':>12}  {'loss':>7}  {'perplexity':>10}  "
                     f"{'bits/byte':>9}")
        lines.extend(f"{s.name:<{width}}  {s.tokens:>12,}  {s.bytes:>12,}  {s.loss:>7.4f}  {s.perplexity:>10.3f}  "
                     f"{s.bits_per_byte:>9.4f}" for s in report.inputs)
    if report.choices is not None:
        c = report.choices
        lines.append(f"{c.name}: {c.examples:,} questions, acc {c.correct / c.examples:.4f} (lowest summed loss), "
                     f"acc_norm {c.correct_norm / c.examples:.4f} (lowest mean loss per token)")
    return "\n".join(lines)
