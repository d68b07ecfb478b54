"""Checkpoints: one self-contained file each, written atomically, read without unpickling code.

A checkpoint is a dict of tensors and JSON-able values (nanochat's split of weights and metadata, kept in one
file so a single rename publishes both). Each stateful part of a run saves and restores its own entry, and this
module composes them (torchtitan's stateful components):
    format                        FORMAT_VERSION; a file from a newer gptrain is refused with what to do
    model                         the weights, in full (unsharded, without wrapper prefixes)
    optimizer, scaler, progress   the optimizer (keyed by parameter name), the GradScaler, the LoopState
    world_size, rng, sampler,     the random streams: rank 0's (a single process's) and, under torchrun,
      ranks                         every rank's
    model_config, train_config    the GPTConfig and the resolved TrainConfig as plain dicts
    dataset_meta                  the dataset's meta.json (tokenizer, vocabulary)
    metrics_length                the length of metrics.jsonl when it was written (a resume cuts back to it)
    trackers                      the W&B run id, so a resume continues the same tracker run
    lora                          a LoRA run's only: its base checkpoint (path, sha256) and settings; "model" then
                                    holds only the adapters (gptrain/lora.py)
The latest state lives in ckpt_last.pt (resume reads it), the best validation loss in ckpt_best.pt (sample
reads it); a LoRA run's latest adapters are also in adapter/, in peft's format (hf/adapters.py). Imported models
hold the model entries and dataset_meta only. Every reader of a model (model_from_checkpoint, load_pretrained)
takes a LoRA checkpoint as the base with its adapters merged in.

A training run writes its checkpoints in the background (RunCheckpoints.write_in_background): the state is copied
to host memory between two steps, and a thread writes and publishes it while training goes on
(runtime/background_save.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gptrain.data.dataset import validate_meta
from gptrain.errors import CheckpointWriteError, UserError, one_line
from gptrain.hf.adapters import peft_adapter_files
from gptrain.hf.folders import is_hf_folder
from gptrain.hf.gpt2 import gpt2_misfits
from gptrain.hf.llama import llama_misfits
from gptrain.hf.models import read_hf_config
from gptrain.hf.models import read_model as read_hf_model
from gptrain.lora import LoraRun, add_adapters, load_adapter_weights, merge
from gptrain.model import GPT, GPTConfig, check_fits_in_memory, strip_wrapper_prefixes
from gptrain.runtime import names, outdir
from gptrain.runtime.background_save import BackgroundWriter
from gptrain.runtime.files import fresh_tmp, publish, require_file, write_atomically
from gptrain.runtime.names import CKPT_BEST, CKPT_LAST
from gptrain.runtime.publish import reached, staged
from gptrain.runtime.rundir import RunDir
from gptrain.runtime.safe_load import safe_torch_load

FORMAT_VERSION = 1
# The sizes every checkpoint has recorded since the first version (later options have defaults).
REQUIRED_MODEL_KEYS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")
# The GPTRAIN_KILL_AT step (runtime/publish.py) at which a checkpoint is serialised into its temporary file and not
# yet renamed into place: the tests kill a writer there.
SERIALISED = "checkpoint-serialised"


def save_checkpoint(state: dict, path: Path) -> None:
    """Atomically: a crash at any moment leaves the old checkpoint or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def serialise(f) -> None:
        torch.save({"format": FORMAT_VERSION, **state}, f)
        reached(SERIALISED)

    write_atomically(path, serialise)


def publish_checkpoint_folder(folder: Path, state: dict, overwrite: bool) -> None:
    """FOLDER/ckpt_last.pt as all the gptrain output the folder holds (import-hf, merge-lora), published as one set:
    a kill leaves the folder's old content or the new. A folder holding gptrain output needs overwrite, unless it
    holds this very checkpoint and nothing else (the same command run again)."""
    outdir.check_creatable(folder, "--out")
    with outdir.claimed(folder, "--out"):
        outdir.refuse_folders_in_the_way(folder)
        with staged(folder, names.GPTRAIN_OUTPUT) as stage:
            save_checkpoint(state, stage.path / CKPT_LAST)
            found = outdir.holdings(folder)
            if found and not overwrite:
                if found == {"run": [CKPT_LAST]} and stage.holds_the_target():
                    return
                outdir.refuse_unless_overwrite(folder, overwrite)
            stage.publish()


def capture_parts(parts: dict) -> dict:
    """Each stateful part's state_dict(), under its name (some are collectives: every rank calls this)."""
    return {name: part.state_dict() for name, part in parts.items()}


def restore_parts(parts: dict, state: dict) -> None:
    for name, part in parts.items():
        part.load_state_dict(state[name])


class ScalerState:
    """The GradScaler as a stateful part: its state when it scales (float16), None otherwise."""

    def __init__(self, scaler: torch.amp.GradScaler):
        self.scaler = scaler

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler.is_enabled() else None

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.scaler.load_state_dict(state)


class RunCheckpoints:
    """A run's checkpoints: writes ckpt_last.pt (and publishes it as ckpt_best.pt), in the background or at once,
    and knows which iteration the file on disk holds, so that advice on how to continue points only at a
    checkpoint that exists."""

    def __init__(self, run: RunDir, last_iter: int | None = None):
        self.run = run
        self.last_iter = last_iter  # the iteration ckpt_last.pt holds; None while this run has written none
        self.writer = BackgroundWriter("checkpoint writer")

    def write(self, state: dict | None, it: int, best: bool = False) -> None:
        """Write now (after any write in flight): see write_in_background."""
        self.write_in_background(state, it, best)
        self.wait()

    def write_in_background(self, state: dict | None, it: int, best: bool = False) -> None:
        """After the write in flight, if any, has ended (its error raised here): start writing ckpt_last.pt in a
        thread and return. Then a LoRA run's adapters in peft's format go to adapter/ (published after it, so a
        kill between the two leaves the previous adapters whole beside the new checkpoint), and with best,
        ckpt_last.pt is published as ckpt_best.pt too. state is None on ranks other than 0 (they took part in
        gathering it); on rank 0 it must be the caller's own copy (background_save.host_copy), which nothing
        changes while it is written. A failed write raises CheckpointWriteError from wait(), whose message says
        what is intact and what to do."""
        self.wait()
        if state is None:
            self.last_iter = it
            return
        self.writer.start(lambda: self._write(state, it, best))

    def wait(self) -> None:
        """Until the write in flight, if any, has ended; raises the error it met. Called before the next write,
        before anything reads what it publishes, and before the run ends."""
        self.writer.wait()

    def settle(self, abandon: bool = False) -> None:
        """On the way out of a run that failed: let the write in flight land, its own error giving way to the one
        that ends the run; with abandon (a signal that aborts at once), leave without waiting for it."""
        if abandon:
            self.writer.abandon()
            return
        try:
            self.writer.wait()
        except Exception:  # the run's own error is the one to report; the file on disk is whole either way
            pass

    def _write(self, state: dict, it: int, best: bool) -> None:
        path = self.run.last
        self.writer.check()
        try:
            save_checkpoint(state, path)
        except OSError as exc:
            previous = (f"the previous checkpoint is intact; free disk space (or fix the folder), then "
                        f"{self.resume_advice()}" if self.last_iter is not None else
                        "no checkpoint was written before; free disk space (or fix the folder) and start again")
            raise CheckpointWriteError(f"error: could not write {path} at iter {it} ({exc.strerror or exc}); "
                                       f"{previous}") from None
        self.last_iter = it
        self.writer.check()
        adapter = peft_adapter_of(state)
        if adapter is not None:
            publish_files(self.run.adapter, adapter)
        if best:
            self.writer.check()
            self.publish_best()

    def publish_best(self) -> None:
        """ckpt_last.pt, just written, is also the best so far."""
        link_or_copy(self.run.last, self.run.best)

    def resume_advice(self) -> str:
        if self.last_iter is None or not self.run.last.is_file():
            return "no checkpoint was written yet, so start the run again (with --overwrite)"
        return f"continue from {self.run.last} (iter {self.last_iter}) with the same command plus --init_from=resume"


def peft_adapter_of(state: dict) -> dict[str, bytes] | None:
    """A LoRA checkpoint's adapters as peft writes them, for the Hugging Face model its base exports as; None for a
    run that is not LoRA, a model no Hugging Face architecture holds, or one that added chat tokens to the
    vocabulary (the base model on the Hub has no rows for them)."""
    if "lora" not in state:
        return None
    run = LoraRun.from_entry(state["lora"], "the checkpoint")
    config = GPTConfig(**state["model_config"])
    if run.settings.trained_tokens or (gpt2_misfits(config) and llama_misfits(config)):
        return None
    base = state["train_config"]["init_from"].removeprefix("from:")
    return peft_adapter_files(state["model"], run.settings, config, base)


def publish_files(folder: Path, files: dict[str, bytes]) -> None:
    """FOLDER's files replaced by these, as a whole (runtime/publish.py)."""
    with outdir.claimed(folder, str(folder)), staged(folder, tuple(files)) as stage:
        for name, payload in files.items():
            stage.write(name, payload)
        stage.publish()


def link_or_copy(source: Path, target: Path) -> None:
    """Publish `source` also as `target` (atomically), sharing the bytes through a hard link when possible."""
    tmp = fresh_tmp(target)
    try:
        os.link(source, tmp)
    except OSError:
        tmp.write_bytes(source.read_bytes())
    publish(tmp, target)


def find_checkpoint(path: str | Path, prefer: str = CKPT_BEST) -> Path:
    """A checkpoint file, or a run folder: `prefer` inside it, else the other of last/best."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in (prefer, CKPT_LAST if prefer == CKPT_BEST else CKPT_BEST):
            if (path / name).exists():
                return require_file(path / name, "checkpoint", "move the folder away")
        raise UserError(f"no checkpoint in {path} (looked for {CKPT_BEST} and {CKPT_LAST}); train first or check the "
                        "path")
    require_file(path, "checkpoint", "give a run folder (out_dir) or a .pt file")
    return path


def load_checkpoint(path: Path, map_location="cpu", mmap: bool = False) -> dict:
    ckpt = safe_torch_load(path, map_location, mmap)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path} is not a gptrain checkpoint (no model or model_config entry)")
    version = ckpt.get("format", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer gptrain (checkpoint format {version!r}; this one reads up to "
                        f"{FORMAT_VERSION}); upgrade gptrain (pip install -U gptrain) to read it")
    weights = ckpt["model"]
    if not isinstance(weights, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) and v.is_floating_point() for k, v in weights.items()):
        raise UserError(f"{path} is damaged: its 'model' entry is not a state dict of named floating-point tensors")
    if ckpt.get("dataset_meta") is not None:
        if not isinstance(ckpt["dataset_meta"], dict):
            raise UserError(f"{path} is damaged: its 'dataset_meta' entry is not a mapping")
        validate_meta(ckpt["dataset_meta"], f"{path} (its dataset_meta)")
        model_vocab = ckpt["model_config"].get("vocab_size") if isinstance(ckpt["model_config"], dict) else None
        if model_vocab != ckpt["dataset_meta"]["vocab_size"]:
            raise UserError(f"{path} is damaged: its model has {model_vocab} tokens, its tokenizer "
                            f"{ckpt['dataset_meta']['vocab_size']}")
    return ckpt


def model_config_from(ckpt: dict, path: Path) -> GPTConfig:
    """The checkpoint's GPTConfig, its values checked as a config's would be (a damaged or foreign file must
    not reach the model's constructor)."""
    from gptrain.config import build_config

    saved = ckpt["model_config"]
    missing = [k for k in REQUIRED_MODEL_KEYS if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise UserError(f"{path}: model_config lacks {', '.join(missing)}; the file is damaged")
    try:
        config = GPTConfig(**saved)
    except TypeError as exc:
        raise UserError(f"{path}: model_config does not describe a GPT ({one_line(exc)})") from None
    vocab_size = config.vocab_size
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise UserError(f"{path}: model_config has an invalid vocab_size {vocab_size!r}; the file is damaged")
    try:
        build_config({k: v for k, v in saved.items() if k != "vocab_size"})
    except UserError as exc:
        raise UserError(f"{path}: model_config is damaged ({exc})") from None
    return config


def load_model_weights(model: GPT, ckpt: dict, path: Path) -> None:
    """Load and check: the shapes must fit, and every weight must be finite (gptrain never saves non-finite
    weights, so such a file is damaged, and would only produce NaN losses or fail while sampling)."""
    try:
        model.load_state_dict(strip_wrapper_prefixes(ckpt["model"]))
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise UserError(f"{path}: weights do not fit the model ({detail})") from None
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise UserError(f"{path} holds non-finite weights (NaN or inf in {', '.join(bad[:3])}"
                        f"{' and more' if len(bad) > 3 else ''}); it cannot be used")


def load_pretrained(source: Path) -> dict:
    """Weights to fine-tune from, for init_from: from:PATH: a Hugging Face GPT-2 or Llama folder (converted to
    gptrain's names and layout), or a gptrain checkpoint or run folder (a LoRA one merged)."""
    if is_hf_folder(source) or (source.is_dir() and (source / "config.json").exists()):
        return read_hf_model(source)
    path = find_checkpoint(source)
    ckpt = load_checkpoint(path)
    if "lora" in ckpt:
        ckpt = {**ckpt, "model": merge(adapted_model(ckpt, path)).state_dict()}
    return ckpt


def model_config_of(source: Path) -> GPTConfig:
    """The model that init_from: from:SOURCE names (a Hugging Face folder, a checkpoint or a run folder), read
    without its weights (a checkpoint is memory-mapped, not loaded)."""
    if is_hf_folder(source) or (source.is_dir() and (source / "config.json").exists()):
        return read_hf_config(source)
    path = find_checkpoint(source)
    return model_config_from(load_checkpoint(path, mmap=True), path)


def model_from_checkpoint(path: Path, device: torch.device) -> tuple[GPT, dict]:
    """The model a checkpoint holds, ready to run; a LoRA checkpoint's is its base with the adapters merged in."""
    ckpt = load_checkpoint(path)
    if "lora" in ckpt:
        return merge(adapted_model(ckpt, path)).to(device), ckpt
    config = model_config_from(ckpt, path)
    check_fits_in_memory(config, device)  # a damaged model_config must not allocate terabytes
    model = GPT(config)
    load_model_weights(model, ckpt, path)
    return model.to(device), ckpt


def adapted_model(ckpt: dict, path: Path) -> GPT:
    """A LoRA checkpoint's model with its adapters (not merged): the base checkpoint it names, checked against its
    sha256, brought to the run's model (block_size cropped, chat tokens added, its dropout), with the adapters."""
    run = LoraRun.from_entry(ckpt["lora"], path)
    base_path = run.check_base(path)
    base = load_checkpoint(base_path)
    if "lora" in base:
        raise UserError(f"{path}: its base {base_path} is itself a LoRA checkpoint; the file is damaged")
    wanted, config = model_config_from(ckpt, path), model_config_from(base, base_path)
    check_fits_in_memory(config, torch.device("cpu"))
    config.dropout = wanted.dropout
    model = GPT(config)
    load_model_weights(model, base, base_path)
    if wanted.block_size < config.block_size:
        model.crop_block_size(wanted.block_size)
    if wanted.vocab_size > config.vocab_size:
        model.grow_vocab(wanted.vocab_size)
    if model.config != wanted:
        raise UserError(f"{path}: its model_config does not describe its base {base_path} with adapters; the "
                        "checkpoint is damaged")
    add_adapters(model, run.settings)
    load_adapter_weights(model, ckpt["model"], path)
    return model
