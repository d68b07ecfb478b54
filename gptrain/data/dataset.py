"""Token datasets on disk: a folder with train.bin, val.bin and meta.json, and the random-window batch sampler."""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import numpy as np
import torch

from gptrain.data.hf_bpe import OWN_BPE
from gptrain.data.model_tokenizer import HF
from gptrain.data.tokenizer import validate_meta
from gptrain.errors import UserError
from gptrain.runtime.files import kind_of, read_json_object


def resolve_dataset_dir(dataset: str) -> Path:
    """`dataset` is a path to a prepared folder, or the name of one under ./data."""
    path = Path(dataset)
    under_data = Path("data") / dataset
    for candidate in (path, under_data):
        if candidate.is_dir():
            return candidate
        if candidate.exists():
            raise UserError(f"dataset {candidate} is a file; dataset names a prepared folder (train.bin, val.bin, "
                            "meta.json), e.g. data/shakespeare_char")
    raise UserError(
        f"dataset folder {dataset!r} not found (looked at {path} and {under_data}); "
        "run gptrain prepare shakespeare, or point dataset at a prepared folder"
    )


def load_meta(folder: Path) -> dict:
    path = folder / "meta.json"
    if not path.exists():
        raise UserError(f"{path} is missing; prepare the dataset first (gptrain prepare ...)")
    meta = read_json_object(path, "dataset metadata", "prepare the dataset again")
    validate_meta(meta, path)
    return meta


def tokenizer_identity(meta: dict) -> tuple:
    """What makes token ids mean the same text: the tokenizer (gpt2 and r50k_base are one), its size and, for
    characters, the id of each character; for your own BPE and a Hugging Face tokenizer, the digest of its
    tokenizer.json."""
    name = "gpt2" if meta.get("tokenizer") == "r50k_base" else meta.get("tokenizer")
    return name, meta.get("vocab_size"), tuple(meta.get("itos") or ()), meta.get("tokenizer_sha256")


def describe_other(saved_meta: dict, dataset_meta: dict) -> str:
    """The model's tokenizer, in words that show how it differs from the dataset's."""
    kind = saved_meta.get("tokenizer")
    if kind == dataset_meta.get("tokenizer") == "char":
        return "another character set"
    if kind == dataset_meta.get("tokenizer") in (OWN_BPE, HF):
        which = "own tokenizer" if kind == OWN_BPE else "Hugging Face tokenizer"
        return (f"another {which} (sha256 {str(saved_meta.get('tokenizer_sha256'))[:12]}..., the dataset's "
                f"{str(dataset_meta.get('tokenizer_sha256'))[:12]}...)")
    return f"tokenizer {kind} ({saved_meta.get('vocab_size')} tokens)"


def check_same_tokenizer(saved_meta: dict | None, dataset_meta: dict, source) -> None:
    """A model trained on one tokenizer's ids cannot continue on another's, even of the same size."""
    if saved_meta and tokenizer_identity(saved_meta) != tokenizer_identity(dataset_meta):
        raise UserError(f"{source} was trained with {describe_other(saved_meta, dataset_meta)}, and the dataset uses "
                        f"tokenizer {dataset_meta.get('tokenizer')} ({dataset_meta.get('vocab_size')} tokens), so its "
                        "ids would mean other text; prepare the dataset with the model's tokenizer")


class TokenFile:
    """A .bin of raw token ids, memory-mapped once, every id it hands out checked against the vocabulary: an id
    at or above vocab_size would fail inside the embedding (on a GPU, as an unexplained device assert), so it is
    refused with the file and its position, whoever reads it (training, evaluation, eval, explain, exact match).
    After each gather the pages it read are released (madvise DONTNEED: they stay in the page cache, out of this
    process's resident set), so memory does not grow with the batches drawn (nanoGPT issue #287), even where the
    kernel maps file pages as 2 MB huge pages, and no batch pays for a new mapping (measured: 45 us a batch,
    against 81 us for mapping the file anew)."""

    def __init__(self, path: Path, dtype: str, vocab_size: int):
        self.path = path
        self.dtype = dtype
        self.vocab_size = vocab_size
        self._mapping = None
        self._tokens = None

    @property
    def num_tokens(self) -> int:
        return self.path.stat().st_size // np.dtype(self.dtype).itemsize

    def gather(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows tokens[s : s + length] for every s in starts, as int64 (len(starts), length)."""
        if self._tokens is None:
            with open(self.path, "rb") as f:
                self._mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._tokens = np.frombuffer(self._mapping, dtype=self.dtype)
        rows = self._tokens[starts[:, None] + np.arange(length)].astype(np.int64)
        if hasattr(mmap, "MADV_DONTNEED"):
            self._mapping.madvise(mmap.MADV_DONTNEED)
        if rows.size and int(rows.max()) >= self.vocab_size:  # ~20 us for a batch
            row, col = divmod(int(np.argmax(rows >= self.vocab_size)), rows.shape[1])
            raise_bad_id(self.path, int(rows[row, col]), int(starts[row]) + col, self.vocab_size)
        return rows


def open_split(folder: Path, split: str, dtype: str, vocab_size: int) -> TokenFile:
    """A split's token file, its size checked. Its ids are checked as they are read (TokenFile), and up front by
    check_token_range."""
    path = folder / f"{split}.bin"
    kind = kind_of(path)
    if kind in ("dir", "special"):
        raise UserError(f"{path} is {'a folder' if kind == 'dir' else 'a pipe or a device'}, not a file of token "
                        "ids; prepare the dataset again")
    if kind is None:
        raise UserError(f"{path} is missing; prepare the dataset first (gptrain prepare ...)")
    size = path.stat().st_size
    itemsize = np.dtype(dtype).itemsize
    if size == 0:
        raise UserError(f"{path} is empty; prepare the dataset again from a non-empty text")
    if size % itemsize:
        raise UserError(
            f"{path} has {size} bytes, not a multiple of {itemsize} ({dtype} from meta.json): "
            "the file is truncated or meta.json names the wrong dtype; prepare the dataset again"
        )
    return TokenFile(path, dtype, vocab_size)


def check_enough_tokens(tokens: TokenFile, block_size: int) -> None:
    """A window is block_size + 1 tokens (x, and y shifted by one), and there must be more than one to draw."""
    if tokens.num_tokens - block_size < 1:
        raise UserError(f"{tokens.path} holds {tokens.num_tokens} tokens, too few for block_size {block_size}; "
                        "lower block_size or prepare more text")


class ChunkedDraws:
    """A sampler that draws its batches a chunk at a time from one seeded generator. Its state is the generator
    state before the current chunk and how many of its batches were used, so a resumed run draws exactly the same
    batches. Subclasses set rng, _chunk, _chunk_state and _used, and define _draw_chunk."""

    # Each rank draws its own stream, so a saved state belongs to one rank at one world size (data/order.py's
    # epoch walk is global instead).
    position_is_global = False

    def state_dict(self) -> dict:
        if not self._chunk and self._used:  # the chunk is used up: the next one starts from the current state
            return {"bit_generator": as_plain_values(self.rng.bit_generator.state), "used": 0}
        return {"bit_generator": as_plain_values(self._chunk_state), "used": self._used}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["bit_generator"]
        self._chunk = []
        if state["used"]:
            self._draw_chunk()
            del self._chunk[: state["used"]]
            self._used = state["used"]


class BatchSampler(ChunkedDraws):
    """Random block_size windows from one split: x is a window, y the same window shifted by one token.

    Windows are gathered CHUNK batches at a time: one gather instead of eight costs less per batch (figures in
    docs/measurements.md).
    """

    CHUNK = 8

    def __init__(self, tokens: TokenFile, batch_size: int, block_size: int, seed: int, device: torch.device):
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.device = device
        check_enough_tokens(tokens, block_size)
        self.max_start = tokens.num_tokens - block_size  # the last window needs block_size + 1 tokens
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self._chunk: list[torch.Tensor] = []  # batches of the current chunk not used yet, each (B, T + 1)
        self._chunk_state = self.rng.bit_generator.state
        self._used = 0

    def _draw_chunk(self) -> None:
        self._chunk_state = self.rng.bit_generator.state
        starts = self.rng.integers(0, self.max_start, size=self.CHUNK * self.batch_size)
        ids = self.tokens.gather(starts, self.block_size + 1)  # (CHUNK * B, T + 1)
        rows = torch.from_numpy(ids)
        self._chunk = list(rows.view(self.CHUNK, self.batch_size, self.block_size + 1).unbind(0))
        self._used = 0

    def prefetch(self) -> None:
        """Gather the next chunk ahead, while the device computes, if the current one is used up."""
        if not self._chunk:
            self._draw_chunk()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.prefetch()
        rows = self._chunk.pop(0)  # (B, T + 1)
        self._used += 1
        return inputs_and_targets(rows, self.device)


def inputs_and_targets(rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows (B, T + 1) on the host -> x and y (B, T) each on the device, y shifted by one token."""
    rows = to_device(rows, device)
    return rows[:, :-1], rows[:, 1:]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # pinned memory lets the copy run asynchronously with the queued computation
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def as_plain_values(state: dict) -> dict:
    """A numpy bit-generator state (a dict of ints) as plain Python values, for the checkpoint."""
    return json.loads(json.dumps(state))


# Up to this size a split is read whole at start-up to check its ids (about 0.1 s a GiB from the page cache);
# a larger one is trusted to the largest id its meta.json records (a 10B-token corpus is 20 GB per rank to read),
# and TokenFile still checks every id as it is read.
SCAN_LIMIT_BYTES = 1 << 30


def check_token_range(tokens: TokenFile, meta: dict | None = None) -> None:
    """Refuse ids >= vocab_size before any work starts: the file is scanned in chunks, never read into memory at
    once; one larger than SCAN_LIMIT_BYTES whose length matches its meta.json is judged by the largest id the
    record holds."""
    split = tokens.path.stem
    recorded = (meta or {}).get("max_token_id")
    large = tokens.path.stat().st_size > SCAN_LIMIT_BYTES
    if large and isinstance(recorded, int) and (meta or {}).get(f"{split}_tokens") == tokens.num_tokens:
        if recorded >= tokens.vocab_size:
            raise UserError(f"{tokens.path.parent / 'meta.json'}: max_token_id {recorded} is >= vocab_size "
                            f"{tokens.vocab_size}; prepare the dataset again")
        return
    scan_token_range(tokens)


def scan_token_range(tokens: TokenFile, chunk: int = 1 << 24) -> None:
    itemsize = np.dtype(tokens.dtype).itemsize
    with open(tokens.path, "rb") as f:
        offset = 0
        while block := f.read(chunk * itemsize):
            ids = np.frombuffer(block, dtype=tokens.dtype)
            if ids.size and int(ids.max()) >= tokens.vocab_size:
                bad = int(np.argmax(ids >= tokens.vocab_size))
                raise_bad_id(tokens.path, int(ids[bad]), offset + bad, tokens.vocab_size)
            offset += ids.size


def raise_bad_id(path: Path, token: int, position: int, vocab_size: int) -> None:
    raise UserError(
        f"{path}: token id {token} at position {position} is >= vocab_size {vocab_size}; the .bin does not belong "
        "with its meta.json (or the model), prepare the dataset again"
    )
