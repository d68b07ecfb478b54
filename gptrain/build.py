"""Building a run from its config: where it computes, its dataset, its model (new, resumed or fine-tuned) and its
optimizer. `gptrain train` and `gptrain grads` build them the same way; every check of the inputs happens here,
before anything is written."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gptrain import checkpoint as ckpt_io
from gptrain.config import AUTO, TrainConfig, build_config, config_values, write_config
from gptrain.data.chat import adds_chat_tokens, base_meta, base_vocab_size
from gptrain.data.chat_batches import ChatBatchSampler, ChatSplit, is_chat, open_chat_split
from gptrain.data.dataset import (
    BatchSampler,
    TokenFile,
    check_enough_tokens,
    check_same_tokenizer,
    check_token_range,
    load_meta,
    open_split,
    resolve_dataset_dir,
)
from gptrain.data.order import EpochSampler, RankShare
from gptrain.data.preference_batches import PreferenceBatchSampler, PreferenceSplit, open_preference_split
from gptrain.data.preference_prepare import is_preference
from gptrain.dpo import Dpo, stored_reference
from gptrain.errors import UserError
from gptrain.lora import LoraRun, LoraSettings, add_adapters
from gptrain.model import GPT, GPTConfig, check_fits_in_memory
from gptrain.monitor.metrics import cut_back
from gptrain.optim.muon import build_muon
from gptrain.optim.schedule import LrSchedule
from gptrain.runtime import outdir
from gptrain.runtime.batch_size import HEADROOM, Search, find_micro_batch, micro_batch_candidates
from gptrain.runtime.device import autocast, configure_backends, resolve_device, resolve_dtype
from gptrain.runtime.distributed import DistContext, all_reduce, check_parallel, context_from_env, process_device
from gptrain.runtime.publish import clear_output
from gptrain.runtime.rng import TRAIN_STREAM, seed_everything, stream_seed

Sampler = BatchSampler | EpochSampler | ChatBatchSampler | PreferenceBatchSampler  # a split's stream of batches

# Model keys a checkpoint decides, whatever the config says: padding changes the storage, not the model.
PADDING_KEYS = ("vocab_pad_multiple",)


@dataclass(frozen=True)
class Placement:
    """Where this process computes: its rank in the job, its device and its dtype."""

    ctx: DistContext
    device: torch.device
    dtype: torch.dtype


def place(config: TrainConfig, ctx: DistContext | None = None) -> Placement:
    ctx = ctx or context_from_env()
    device = process_device(ctx, resolve_device(config.device))
    dtype = resolve_dtype(config.dtype, device)
    auto = config.batch_size == AUTO
    if auto:
        check_auto_batch_size(config, ctx)
    # batch_size: auto picks gradient_accumulation_steps as a multiple of the world size (settle_batch_size)
    check_parallel(ctx, ctx.world_size if auto else config.gradient_accumulation_steps, config.parallel, dtype)
    configure_backends(device)
    return Placement(ctx, device, dtype)


@dataclass
class Dataset:
    folder: Path
    meta: dict
    splits: dict[str, TokenFile]
    chat: dict[str, ChatSplit] | None = None  # a chat dataset's splits, with their masks and conversation offsets
    preference: dict[str, PreferenceSplit] | None = None  # a preference dataset's splits, read as pairs

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]


def open_dataset(config: TrainConfig) -> Dataset:
    folder = resolve_dataset_dir(config.dataset)
    meta = load_meta(folder)
    splits = {split: open_split(folder, split, meta["dtype"], meta["vocab_size"]) for split in ("train", "val")}
    for tokens in splits.values():
        check_token_range(tokens, meta)
        check_enough_tokens(tokens, config.block_size)
    chat = {split: open_chat_split(folder, split, splits[split]) for split in splits} if is_chat(meta) else None
    if chat and config.data_order == "epochs":
        raise UserError(f"{folder} is a chat dataset, whose windows start at random conversations; data_order: "
                        "epochs walks a plain dataset's fixed windows: use data_order: random")
    check_objective_fits(config, folder, meta)
    preference = None
    if config.objective == "dpo":  # pairs of plain text have the files of a chat dataset, but no template
        sequences = chat or {split: open_chat_split(folder, split, splits[split]) for split in splits}
        preference = {split: open_preference_split(folder, meta, sequences[split], split, config.block_size)
                      for split in sequences}
    return Dataset(folder, meta, splits, chat, preference)


def check_objective_fits(config: TrainConfig, folder: Path, meta: dict) -> None:
    """DPO trains on pairs, and a dataset of pairs trains with DPO only (the next-token loss would learn the
    rejected answers too)."""
    if config.objective == "dpo" and not is_preference(meta):
        raise UserError(f"objective: dpo trains on preference pairs, and {folder} is not a preference dataset (its "
                        "meta.json has no \"preference\": true); prepare chosen/rejected pairs with gptrain prepare "
                        "chat, or train it with objective: lm")
    if config.objective != "dpo" and is_preference(meta):
        raise UserError(f"{folder} is a preference dataset (chosen and rejected answers), which trains with "
                        "objective: dpo; the next-token loss would learn the rejected answers as well")


# The model keys a fine-tuning run takes from its source when the config leaves them out: all but the vocabulary
# (the dataset's) and dropout (a training choice).
SHAPE_KEYS = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.name not in ("vocab_size", "dropout"))


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """load_config, where a run that fine-tunes (init_from: from:PATH) takes the model's shape from its source for
    every model key the config leaves out; one the config gives must match it (pretrained_model checks)."""
    values = config_values(path, overrides)
    source = values.get("init_from")
    if isinstance(source, str) and source.startswith("from:") and len(source) > len("from:"):
        saved = asdict(ckpt_io.model_config_of(Path(source[len("from:"):])))
        values.update({key: saved[key] for key in SHAPE_KEYS if key not in values})
    return build_config(values)


def check_same_model(saved: GPTConfig, wanted: GPTConfig, source, may_differ: tuple[str, ...] = ()) -> None:
    """A checkpoint's model and the config's must agree, but in `may_differ` and the storage-only keys."""
    wanted_fields = asdict(wanted)
    diffs = [f"{k}: {v} in {source} vs {wanted_fields[k]} in the config" for k, v in asdict(saved).items()
             if k not in (*may_differ, *PADDING_KEYS) and v != wanted_fields[k]]
    if diffs:
        raise UserError(f"{source} holds a different model ({', '.join(diffs)}); match the config to it (vocab_size "
                        "comes from the dataset: prepare it with the model's tokenizer)")


def make_sampler(config: TrainConfig, dataset: Dataset, ctx: DistContext, device: torch.device, accumulation_steps: int,
                 split: str, stream: int, *more: int) -> Sampler:
    """The training stream follows data_order. Evaluation always draws random windows: a fixed sample from its own
    stream, the same at every evaluation, so two evaluations differ only because the model did."""
    if dataset.preference is not None:
        return PreferenceBatchSampler(dataset.preference[split], config.batch_size,
                                      stream_seed(config.seed, stream, ctx.rank, *more), device)
    if dataset.chat is not None:  # a training chunk is one step's micro-batches (Trainer.loss_divisor counts them)
        chunk = accumulation_steps if (split, stream) == ("train", TRAIN_STREAM) else ChatBatchSampler.CHUNK
        return ChatBatchSampler(dataset.chat[split], config.batch_size, config.block_size,
                                stream_seed(config.seed, stream, ctx.rank, *more), device, chunk)
    if split == "train" and stream == TRAIN_STREAM and config.data_order == "epochs":
        share = RankShare(ctx.rank, ctx.world_size, accumulation_steps)
        return EpochSampler(dataset.splits[split], config.batch_size, config.block_size, config.seed, device, share)
    seed = stream_seed(config.seed, stream, ctx.rank, *more)
    return BatchSampler(dataset.splits[split], config.batch_size, config.block_size, seed, device)


def dpo_objective(config: TrainConfig, dataset: Dataset, model: GPT, placement: Placement, resume: dict | None,
                  lora: LoraRun | None) -> Dpo | None:
    """The run's DPO objective (None for objective: lm), with its reference: the base under the adapters with LoRA,
    else the starting model's log-probabilities of every pair (stored, or computed now)."""
    if config.objective != "dpo":
        return None
    model.loss_chunk_rows = 0  # DPO reads each token's log-probability, which the chunked loss does not return
    stored = None if lora is not None else stored_reference(
        model, dataset.preference, config.batch_size, placement.device, placement.dtype, placement.ctx, resume)
    return Dpo(model, config.dpo_beta, config.dpo_loss, stored)


def load_resume_checkpoint(config: TrainConfig, dataset: Dataset, announce: bool) -> dict:
    """out_dir/ckpt_last.pt, checked against the config and the dataset."""
    path = config.run_dir.last
    if not path.is_file():
        # A rank that is not rank 0 finds nothing where rank 0 saved: its node does not share out_dir.
        fix = ("train with init_from: scratch first" if announce else
               "every node of a multi-node run must see out_dir on storage they share")
        raise UserError(f"init_from: resume, but {path} does not exist; {fix}")
    state = ckpt_io.load_checkpoint(path)
    if "optimizer" not in state:
        raise UserError(f"{path} holds weights only (no training state to resume); fine-tune from it with "
                        f"init_from: from:{config.out_dir}")
    check_same_model(ckpt_io.model_config_from(state, path), config.model_config(dataset.vocab_size), path)
    check_same_tokenizer(state.get("dataset_meta"), dataset.meta, path)
    check_same_data_order(state, config.data_order, path)
    saved = state.get("dataset_meta") or {}
    counts = [(saved.get(k), dataset.meta.get(k)) for k in ("train_tokens", "val_tokens")]
    if announce and any(then is not None and then != now for then, now in counts):
        print(f"note: the dataset differs from the one {path} was trained on (train/val tokens "
              f"{counts[0][0]}/{counts[1][0]} then, {counts[0][1]}/{counts[1][1]} now); training continues on it")
    return state


def check_same_data_order(state: dict, data_order: str, path: Path) -> None:
    """A resume continues the walk through the data that the checkpoint was taking."""
    saved_config = state.get("train_config")
    saved = saved_config.get("data_order") if isinstance(saved_config, dict) else None
    if saved not in ("random", "epochs"):
        raise UserError(f"{path} records no valid data_order in its train_config; the file is damaged")
    if saved != data_order:
        raise UserError(f"{path} was trained with data_order: {saved}, and a resume continues its walk through the "
                        f"data; resume with --data_order={saved}, or fine-tune its weights in a new run "
                        f"(init_from: from:{path})")


def build_model(config: TrainConfig, dataset: Dataset, device: torch.device, resume: dict | None, announce: bool,
                lora: LoraRun | None = None) -> GPT:
    """A new model (the same initial weights on every rank), the resumed one, or one to fine-tune (with LoRA
    adapters when `lora` is given)."""
    model_config = config.model_config(dataset.vocab_size)
    if resume is not None:  # a checkpoint keeps the padding it was trained with, whatever the config says now
        model_config.vocab_pad_multiple = ckpt_io.model_config_from(resume, config.run_dir.last).vocab_pad_multiple
    check_fits_in_memory(model_config, device, 1 if config.batch_size == AUTO else config.batch_size,
                         config.block_size)
    seed_everything(config.seed)
    if config.init_from.startswith("from:"):
        model = pretrained_model(Path(config.init_from[len("from:"):]), config, dataset, announce, lora)
    elif resume is not None and lora is not None:
        model = ckpt_io.adapted_model(resume, config.run_dir.last)
    else:
        model = GPT(model_config)
        if resume is not None:
            ckpt_io.load_model_weights(model, resume, config.run_dir.last)
    model.checkpoint_blocks = config.activation_checkpointing
    return model.to(device)


def pretrained_model(source: Path, config: TrainConfig, dataset: Dataset, announce: bool,
                     lora: LoraRun | None = None) -> GPT:
    """Weights to fine-tune (a gptrain checkpoint or a Hugging Face folder): the same model as the config's, except
    that block_size may be shorter (the position table is cropped) and dropout is the config's. Training starts at
    iteration 0 with a fresh optimizer."""
    state = ckpt_io.load_pretrained(source)
    if lora is not None and "lora" in state:
        raise UserError(f"{source} holds LoRA adapters; merge them into a plain checkpoint first (gptrain merge-lora "
                        f"--ckpt {source} --out FILE) and adapt that")
    saved = ckpt_io.model_config_from(state, source)
    # A chat dataset of gptrain's template on a model of its base tokenizer: the model gains the chat tokens' rows
    # (a model's own template adds no tokens).
    grows = adds_chat_tokens(dataset.meta) and saved.vocab_size == base_vocab_size(dataset.meta)
    check_same_tokenizer(state.get("dataset_meta"), base_meta(dataset.meta) if grows else dataset.meta, source)
    wanted = config.model_config(dataset.vocab_size)
    may_differ = ("block_size", "dropout", "vocab_size") if grows else ("block_size", "dropout")
    check_same_model(saved, wanted, source, may_differ)
    if wanted.block_size > saved.block_size:
        raise UserError(f"block_size {wanted.block_size} is longer than the {saved.block_size} positions {source} "
                        f"was trained with; use at most {saved.block_size}")
    saved.dropout = wanted.dropout
    model = GPT(saved)
    ckpt_io.load_model_weights(model, state, source)
    if wanted.block_size < saved.block_size:
        model.crop_block_size(wanted.block_size)
    if grows:
        model.grow_vocab(dataset.vocab_size)
    if lora is not None:
        add_adapters(model, lora.settings)
    if announce:
        added = (f" (the chat template's {dataset.vocab_size - base_vocab_size(dataset.meta)} tokens added to its "
                 "vocabulary, each starting as the mean of the others)") if grows else ""
        print(f"fine-tuning from {source}{added}")
    return model


def lora_run(config: TrainConfig, dataset: Dataset, resume: dict | None) -> LoraRun | None:
    """The LoRA run the config asks for: the resumed one (whose settings the config must keep), or adapters of the
    checkpoint init_from names. None without LoRA."""
    wanted = LoraSettings.of(config, dataset.meta) if config.lora_rank else None
    if resume is not None:
        path = config.run_dir.last
        saved = LoraRun.from_entry(resume["lora"], path) if "lora" in resume else None
        if (saved and saved.settings) != wanted:
            then = f"with {saved.settings.describe()}" if saved else "without LoRA"
            now = wanted.describe() if wanted else "no LoRA"
            raise UserError(f"{path} was trained {then}, and the config asks for {now}; resume with the LoRA keys it "
                            f"was trained with, or start a new run from its weights (init_from: from:{path})")
        return saved
    if wanted is None:
        return None
    source = config.init_from[len("from:"):]
    try:
        base = ckpt_io.find_checkpoint(source)
    except UserError as exc:
        raise UserError(f"{exc}. LoRA adapts a gptrain checkpoint, and its checkpoints name that file (a Hugging "
                        f"Face folder: import it first, gptrain import-hf {source} --out DIR)") from None
    return LoraRun.on_base(wanted, base)


def check_auto_batch_size(config: TrainConfig, ctx: DistContext) -> None:
    """What batch_size: auto needs of the processes, checked before any of them does work."""
    if ctx.distributed and config.parallel == "fsdp":
        raise UserError("batch_size: auto does not run under parallel: fsdp, whose every step is collective (a rank "
                        "that runs out of memory in a trial would leave the others waiting); give batch_size as a "
                        "number (gradient_accumulation_steps follows from global_batch_size)")
    micro_batch_candidates(config.global_batch_size, ctx.world_size)  # refuses a global batch the ranks cannot share


@dataclass
class BatchChoice:
    """What batch_size: auto became: the micro-batch every rank uses, and this rank's search (None when the
    checkpoint being resumed gave it)."""

    batch_size: int
    search: Search | None


def settle_batch_size(config: TrainConfig, placement: Placement, dataset: Dataset, model: GPT, optimizer,
                      resume: dict | None) -> BatchChoice:
    """batch_size: auto made a number, in the config itself (so config.yaml, every checkpoint and whoever holds
    the config see the resolved one), with gradient_accumulation_steps = global_batch_size / it: the tokens per
    step stay the config's. A resume takes the checkpoint's micro-batch when it makes the same step, so it continues
    exactly; otherwise each rank searches (runtime/batch_size.py) and all take the smallest rank's result, which
    fits on every rank. One line says what was chosen and why."""
    ctx, device = placement.ctx, placement.device
    saved = batch_of_checkpoint(config, resume, ctx.world_size)
    search = None
    if saved is not None:
        chosen, how = saved, "as in the checkpoint it resumes (not searched again)"
    else:
        search = search_micro_batch(config, placement, dataset, model, optimizer)
        chosen = search.chosen
        if ctx.distributed:
            chosen = int(all_reduce(torch.tensor(chosen, device=device), torch.distributed.ReduceOp.MIN).item())
        share = config.global_batch_size // ctx.world_size
        where, who = (f"every rank's {device.type}", "rank 0 tried") if ctx.distributed else (f"{device}", "tried")
        if chosen == 0:
            raise UserError(f"batch_size: auto: not even a micro-batch of 1 sequence of {config.block_size} tokens "
                            f"fits on {where} with {HEADROOM:.0%} of its memory to spare; lower block_size, set "
                            "activation_checkpointing: true, or train a smaller model")
        of = f"{share} (each of {ctx.world_size} ranks' share)" if ctx.distributed else f"{share}"
        how = (f"the largest divisor of {of} that fits on {where} with {HEADROOM:.0%} of its memory to spare "
               f"({who} {search.describe()})")
    config.batch_size = chosen
    config.gradient_accumulation_steps = config.global_batch_size // chosen
    if ctx.is_main:
        over = f" over {ctx.world_size} ranks" if ctx.distributed else ""
        print(f"batch_size: auto -> {chosen} x {config.gradient_accumulation_steps} micro-batches{over} = "
              f"{config.global_batch_size} sequences ({config.tokens_per_iter:,} tokens) per step, {how}")
    return BatchChoice(chosen, search)


def batch_of_checkpoint(config: TrainConfig, resume: dict | None, world_size: int) -> int | None:
    """The micro-batch of the checkpoint being resumed, when its step is the one the config asks for (the same
    sequences of the same length, in micro-batches the ranks can share); None otherwise."""
    saved = (resume or {}).get("train_config")
    if not isinstance(saved, dict):
        return None
    batch, steps = saved.get("batch_size"), saved.get("gradient_accumulation_steps")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in (batch, steps)):
        return None
    same = batch * steps == config.global_batch_size and saved.get("block_size") == config.block_size
    return batch if same and steps % world_size == 0 else None


def search_micro_batch(config: TrainConfig, placement: Placement, dataset: Dataset, model: GPT,
                       optimizer) -> Search:
    """This rank's search, with trial steps on the run's own model and optimizer that leave no trace: gradients
    zeroed and learning rates at 0 for the optimizer step (the weights stay bit for bit), the optimizer's state
    dropped afterwards, the random streams restored, and torch.compile's wrappers run eagerly (the compiled graphs
    see only the run's batch shape; eager needs at least the memory compiled code does)."""
    device = placement.device
    candidates = micro_batch_candidates(config.global_batch_size, placement.ctx.world_size)
    step = trial_step(model, optimizer, device, placement.dtype, config.block_size, dataset.vocab_size,
                      chat=dataset.chat is not None)
    try:
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # the ranks sharing this machine's memory
    except ValueError:
        ranks_here = 1
    fork = [] if device.type == "cpu" else [device.index or 0]
    with torch.random.fork_rng(devices=fork, device_type=device.type), torch.compiler.set_stance("force_eager"):
        search = find_micro_batch(candidates, step, device, lambda: optimizer.zero_grad(set_to_none=True),
                                  ranks_here)
    optimizer.state.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the run's peak, not the trials'
    return search


def trial_step(model: GPT, optimizer, device: torch.device, dtype: torch.dtype, block_size: int, vocab_size: int,
               chat: bool):
    """One training step at a given micro-batch, as the loop runs it (autocast, the whole block_size, a chat
    dataset's packed-document positions and summed loss), on random tokens, that changes no weight."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step(batch: int) -> None:
        x = torch.randint(vocab_size, (batch, block_size), device=device)
        positions = (torch.arange(block_size, device=device).repeat(batch, 1),) if chat else ()
        with autocast(device, dtype):
            _, loss = model(x, x, *positions, loss_reduction="sum" if chat else "mean")
        loss.backward()
        rates = [group["lr"] for group in optimizer.param_groups]
        for p in params:
            if p.grad is not None:
                p.grad.zero_()
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        # Muon under DDP splits its orthogonalisations across the ranks and all-gathers the results (`replicated`):
        # in a trial it does them all itself, as a collective would wait for ranks whose searches took another path.
        splits = hasattr(optimizer, "replicated")
        shared = getattr(optimizer, "replicated", None)
        if splits:
            optimizer.replicated = False
        try:
            optimizer.step()  # allocates the optimizer's state and its temporaries, and moves nothing
        finally:
            for group, rate in zip(optimizer.param_groups, rates):
                group["lr"] = rate
            if splits:
                optimizer.replicated = shared
        optimizer.zero_grad(set_to_none=True)

    return step


def build_optimizer(model: GPT, config: TrainConfig, dtype: torch.dtype, device: torch.device):
    betas = (config.beta1, config.beta2)
    if config.optimizer == "muon":
        ns_dtype = "bfloat16" if dtype == torch.bfloat16 else "float32"
        optimizer = build_muon(model, config.weight_decay, config.learning_rate, config.muon_lr,
                               config.muon_momentum, betas, ns_dtype)
    else:
        optimizer = model.configure_optimizer(config.weight_decay, config.learning_rate, betas, device.type)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]  # the schedule scales every group's own rate alike
    return optimizer


def lr_schedule(config: TrainConfig) -> LrSchedule:
    """The config's schedule, as a multiplier of each group's base rate (min_lr relative to learning_rate)."""
    min_ratio = config.min_lr / config.learning_rate if config.learning_rate else 0.0
    return LrSchedule(config.warmup_iters, config.lr_decay_iters, min_ratio, config.lr_schedule, config.decay_fraction,
                      config.decay_lr)


def check_run_folder(config: TrainConfig, overwrite: bool) -> None:
    """A new run does not start over another run's files (nanoGPT silently overwrites them), and --overwrite
    never deletes what the run itself reads."""
    out_dir = config.run_dir.path
    if config.init_from == "resume":
        if overwrite:
            raise UserError("--overwrite starts over, init_from: resume continues: drop one of them")
        outdir.refuse_folders_in_the_way(out_dir)
        return
    advice = "continue it with --init_from=resume, " if config.run_dir.holds_a_run() else ""
    outdir.refuse_unless_overwrite(out_dir, overwrite, advice=advice)
    if not overwrite or not out_dir.is_dir():
        return
    dataset = Path(config.dataset) if Path(config.dataset).exists() else Path("data") / config.dataset
    source = Path(config.init_from[len("from:"):]) if config.init_from.startswith("from:") else None
    for what, path in (("the dataset", dataset), ("init_from", source)):
        if path is not None and _is_within(path, out_dir):
            raise UserError(f"{what} {path} lies in out_dir {out_dir}, which --overwrite would clear; "
                            "choose another out_dir")


def prepare_run_folder(config: TrainConfig, overwrite: bool, metrics_length: int | None, iter_num: int) -> None:
    """Make out_dir ready for the run's first write (rank 0, holding its lock): stale temporary files go, --overwrite
    clears the previous run, a resume cuts metrics.jsonl back to its checkpoint, and config.yaml is written."""
    run = config.run_dir
    run.path.mkdir(parents=True, exist_ok=True)
    for stale in run.stale_temporaries():
        stale.unlink()
    if overwrite and config.init_from != "resume":
        clear_output(run.path)
    if config.init_from == "resume":
        removed = cut_back(run.metrics, metrics_length, iter_num)
        if removed:
            print(f"{run.metrics.name}: removed {removed} line(s) logged after the checkpoint")
    write_config(config, run.config)


def _is_within(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents
