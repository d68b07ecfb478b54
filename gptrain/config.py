"""The training configuration: a typed dataclass with nanoGPT's key names, read from YAML plus --key=value."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml

from gptrain.errors import UserError
from gptrain.lora import LoraTarget
from gptrain.model import GPTConfig, MlpKind, Norm, PosEmb, RopeScaling
from gptrain.runtime.device import DEVICE_PATTERN
from gptrain.runtime.files import check_output_file, kind_of, read_text, write_atomically
from gptrain.runtime.rundir import RunDir

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Parallel = Literal["ddp", "fsdp"]
OptimizerKind = Literal["adamw", "muon"]
LrSchedule = Literal["cosine", "wsd", "linear"]
CompileSetting = Literal["auto", True, False]
TrackerKind = Literal["tensorboard", "wandb"]
DataOrder = Literal["random", "epochs"]
Objective = Literal["lm", "dpo"]
DpoLoss = Literal["sigmoid", "ipo"]
AUTO = "auto"  # batch_size: auto, until Trainer resolves it (build.settle_batch_size)


def key(default, help: str, group: str | None = None):
    """A config key: its default and its meaning, declared together (litgpt's way); `group` opens a new group of
    keys. `gptrain train --help`, the docs' table and the did-you-mean errors all read from here."""
    metadata = {"help": help, "group": group}
    if isinstance(default, list):  # a fresh list for each config
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every key of a training config; nanoGPT's names where nanoGPT has the key."""

    out_dir: str = key("out", "folder for checkpoints, `config.yaml` and `metrics.jsonl`", group="I/O")
    eval_interval: int = key(2000, "evaluate (and maybe checkpoint) every this many iterations, and at the end")
    log_interval: int = key(1, "print and record the training loss every this many iterations")
    eval_iters: int = key(200, "batches per split in each evaluation")
    chat_eval_answers: int = key(100, "chat datasets: at each evaluation, answer this many held-out conversations "
                                      "(those whose last answer is short) greedily and report the exact-match rate "
                                      "(0: off)")
    eval_only: bool = key(False, "evaluate once and exit (with `init_from: resume`, evaluates the saved model)")
    log_to: list[TrackerKind] = key([], "also send metrics.jsonl's rows to `tensorboard` and/or `wandb` (a list, "
                                        "or one name); a tracker that fails warns and training goes on")
    tensorboard_dir: str | None = key(None, "TensorBoard's folder (default `out_dir/tb`)")
    wandb_project: str = key("gptrain", "the W&B project")
    wandb_run_name: str | None = key(None, "the W&B run's name (default: `out_dir`'s name)")
    always_save_checkpoint: bool = key(True, "write `ckpt_last.pt` at every evaluation, not only when val loss "
                                             "improves")
    checkpoint_interval: int = key(0, "also write `ckpt_last.pt` every this many iterations, whatever val does "
                                      "(0: off)")
    early_stop_evals: int = key(0, "stop when val loss has not improved for this many evaluations in a row; "
                                   "`ckpt_best.pt` keeps the best model (0: off)")
    init_from: str = key("scratch", "`scratch` for a new model, `resume` to continue from `out_dir/ckpt_last.pt`, "
                                    "`from:PATH` to fine-tune a checkpoint, a run folder or a Hugging Face folder "
                                    "(GPT-2 or Llama), whose model keys the config may leave out")
    dataset: str = key("shakespeare_char", "a prepared folder: a path, or a name under `data/`", group="data")
    gradient_accumulation_steps: int = key(1, "micro-batches per optimizer step (over all ranks)")
    batch_size: int | Literal["auto"] = key(12, "sequences per micro-batch, or `auto`: the largest that fits the "
                                                "device's memory, found at start (needs `global_batch_size`)")
    global_batch_size: int | None = key(None, "sequences per optimizer step over all ranks, which `batch_size: "
                                              "auto` keeps: its micro-batch is a divisor of this (over the ranks) "
                                              "and gradient_accumulation_steps the rest; with a number for "
                                              "batch_size, sets gradient_accumulation_steps when that is not given")
    block_size: int = key(1024, "context length in tokens")
    data_order: DataOrder = key("random", "`random` windows anywhere in train.bin (nanoGPT), or `epochs`: every "
                                          "window once per epoch, in an order reshuffled each epoch")
    n_layer: int = key(12, "transformer blocks", group="model")
    n_head: int = key(12, "attention heads (must divide `n_embd`)")
    n_embd: int = key(768, "width of the residual stream")
    dropout: float = key(0.0, "dropout probability, in [0, 1)")
    bias: bool = key(True, "biases in linear layers and LayerNorms (GPT-2 has them)")
    pos_emb: PosEmb = key("learned", "`learned` position table (GPT-2) or `rope` (rotary embeddings)",
                          group="architecture options beyond GPT-2 (the defaults are GPT-2's)")
    norm: Norm = key("layernorm", "`layernorm` (GPT-2) or `rmsnorm`")
    qk_norm: bool = key(False, "RMS-normalise queries and keys before attention")
    mlp: MlpKind = key("gelu", "`gelu` (GPT-2's 4x MLP), `relu2` (ReLU squared) or `swiglu`")
    tie_embeddings: bool = key(True, "share the token embedding with the LM head (GPT-2)")
    zero_init_proj: bool = key(False, "start the residual output projections (and an untied head) at zero")
    logit_softcap: float | None = key(None, "if set, logits become `cap * tanh(logits / cap)`")
    vocab_pad_multiple: int = key(64, "embedding and head rows rounded up to a multiple of this (GPT-2: 50,257 -> "
                                      "50,304); padded ids get no logit")
    n_kv_head: int | None = key(None, "key/value heads, each shared by `n_head / n_kv_head` query heads "
                                      "(grouped-query attention; 1: multi-query; null: one per head)",
                                group="options of the open models (Llama 3, Qwen2.5, Qwen3, SmolLM2)")
    head_dim: int | None = key(None, "width of each head (null: `n_embd / n_head`)")
    qkv_bias: bool | None = key(None, "biases on q, k and v (Qwen2: true with `bias: false`; null: as `bias`)")
    mlp_hidden: int | None = key(None, "the MLP's hidden width (null: 4 x `n_embd`, or 8/3 x for `swiglu`)")
    norm_eps: float = key(1e-5, "the epsilon of every LayerNorm / RMSNorm")
    qk_norm_gain: bool = key(False, "QK-norm with a learned per-channel gain and `norm_eps` (Qwen3; needs "
                                    "`qk_norm: true`)")
    rope_theta: float = key(10000.0, "rotary embeddings' frequency base")
    rope_scaling: RopeScaling = key("none", "`none`, or `llama3`: Llama 3.1's stretch of the low frequencies")
    rope_factor: float = key(8.0, "`llama3` scaling: how many times longer the context is than `rope_original_context`")
    rope_low_freq_factor: float = key(1.0, "`llama3` scaling: wavelengths above `rope_original_context / this` "
                                           "are stretched by `rope_factor`")
    rope_high_freq_factor: float = key(4.0, "`llama3` scaling: wavelengths below `rope_original_context / this` "
                                            "are kept; those between are blended")
    rope_original_context: int = key(8192, "`llama3` scaling: the context length the model was first trained at")
    optimizer: OptimizerKind = key("adamw", "`adamw`, or `muon` for the hidden matrices with AdamW for the rest",
                                   group="optimizer")
    learning_rate: float = key(6e-4, "peak learning rate (with Muon: of the AdamW groups)")
    max_iters: int = key(600000, "optimizer steps to train for")
    weight_decay: float = key(0.1, "AdamW decoupled weight decay, on matrices only")
    beta1: float = key(0.9, "AdamW first-moment decay")
    beta2: float = key(0.95, "AdamW second-moment decay")
    grad_clip: float = key(1.0, "clip the global gradient norm to this; `0` disables clipping")
    muon_lr: float = key(0.02, "peak learning rate of Muon's matrices")
    muon_momentum: float = key(0.95, "Muon's (Nesterov) momentum")
    lora_rank: int = key(0, "LoRA: train rank-r adapters of the `lora_targets` layers instead of the whole model, "
                            "whose weights stay frozen (needs `init_from: from:PATH`; 0: off)",
                         group="LoRA (parameter-efficient fine-tuning, with Hugging Face peft)")
    lora_alpha: float = key(16.0, "LoRA: the adapters' output is scaled by `lora_alpha / lora_rank`")
    lora_dropout: float = key(0.0, "LoRA: dropout on the adapters' input, in [0, 1)")
    lora_targets: list[LoraTarget] = key(["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
                                         "LoRA: the linear layers of each block that get adapters (`attn.c_attn` is "
                                         "q, k and v)")
    objective: Objective = key("lm", "`lm`: the next-token loss (on a chat dataset, over the answers); `dpo`: Direct "
                                     "Preference Optimization on a preference dataset, against the starting model",
                               group="objective")
    dpo_beta: float = key(0.1, "DPO: how far the model may move from the reference (TRL's `beta`; the rewards "
                               "are `dpo_beta` x the log-probability ratio)")
    dpo_loss: DpoLoss = key("sigmoid", "DPO: `sigmoid` (the DPO paper's, TRL's default) or `ipo` (IPO's squared "
                                       "loss on per-token log-ratios, as TRL computes it)")
    decay_lr: bool = key(True, "warmup + decay schedule; `false` keeps the learning rates flat",
                         group="learning-rate schedule")
    lr_schedule: LrSchedule = key("cosine", "`cosine`, `linear`, or `wsd` (warmup-stable-decay)")
    warmup_iters: int = key(2000, "linear warmup steps (from `learning_rate / (warmup_iters + 1)`)")
    lr_decay_iters: int = key(600000, "step where the decay reaches `min_lr` (constant after)")
    min_lr: float = key(6e-5, "the floor of the schedule")
    decay_fraction: float = key(0.2, "`wsd`: the last fraction of the iterations up to `lr_decay_iters` that "
                                     "decays")
    device: str = key("auto", "`auto`, `cpu`, `cuda`, `cuda:N` or `mps`; auto picks CUDA, then MPS, then CPU",
                      group="system")
    dtype: Dtype = key("auto", "`auto`, `float32`, `bfloat16` or `float16` autocast (auto: bfloat16 where the "
                               "device computes it natively, else float32)")
    compile: CompileSetting = key("auto", "`torch.compile` the model: `auto` on CUDA only, or `true` / `false`")
    seed: int = key(1337, "seeds the weights, dropout and the batch order")
    parallel: Parallel = key("ddp", "under torchrun: `ddp` replicates the model, `fsdp` shards it with FSDP2")
    activation_checkpointing: bool = key(False, "recompute each block in the backward pass instead of keeping its "
                                                "activations (less memory, ~1/3 more compute)")
    max_bad_steps: int = key(10, "stop (exit code 3) after this many consecutive steps with a non-finite loss or "
                                 "gradient", group="health monitor")
    grad_spike_factor: float = key(10.0, "warn when the gradient norm exceeds this multiple of its running median")
    update_ratio_interval: int = key(10, "measure ‖Δw‖/‖w‖ at the first logged step at or after every this many "
                                         "iterations")
    update_ratio_min: float = key(1e-4, "lower edge of the healthy band of ‖Δw‖/‖w‖ per step")
    update_ratio_max: float = key(1e-2, "upper edge of that band; 10 logged steps in a row outside it give a "
                                        "warning")
    overfit_evals: int = key(3, "warn of overfitting when val loss rose this many evaluations in a row while train "
                                "loss fell")

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The model keys of this config (every GPTConfig field shares its name with one here)."""
        keys = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size"}
        return GPTConfig(vocab_size=vocab_size, **{k: getattr(self, k) for k in keys})

    @property
    def run_dir(self) -> RunDir:
        """out_dir, and where each of the run's files lives in it."""
        return RunDir(self.out_dir)

    @property
    def tokens_per_iter(self) -> int:
        """Tokens per optimizer step; with `batch_size: auto` still unresolved, global_batch_size's."""
        if self.batch_size == AUTO:
            return self.global_batch_size * self.block_size
        return self.gradient_accumulation_steps * self.batch_size * self.block_size


def key_groups() -> list[tuple[str, list[dataclasses.Field]]]:
    """The keys in declaration order, under their groups."""
    groups = []
    for f in dataclasses.fields(TrainConfig):
        if f.metadata["group"]:
            groups.append((f.metadata["group"], []))
        groups[-1][1].append(f)
    return groups


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def format_value(value) -> str:
    """A value as YAML writes it: true, null, 6e-4."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float) and value and abs(value) < 1e-3:
        return f"{value:.0e}".replace("e-0", "e-")
    return str(value)


def keys_table() -> str:
    """The table of keys in docs/configuration.md, in Markdown (a test checks that the page holds it unchanged)."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{f.name}` | `{format_value(default_of(f))}` | {f.metadata['help']} |"
             for f in dataclasses.fields(TrainConfig)]
    return "\n".join(rows)


def keys_help(width: int = 118) -> str:
    """Every key with its default and meaning, grouped: the end of `gptrain train --help`."""
    lines = ["config keys (set in the YAML file, or as --name=value; [default]):"]
    for title, keys in key_groups():
        lines.append(f"\n{title}:")
        for f in keys:
            name = f"  {f.name} [{format_value(default_of(f))}]"
            text = f.metadata["help"].replace("`", "")
            lines += textwrap.wrap(text, width, initial_indent=f"{name:<40}", subsequent_indent=" " * 40)
    return "\n".join(lines)


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `1e-3` is a string; YAML 1.2 (and every user) reads it as a float."""


    def construct_mapping(self, node, deep=False):
        """A key given twice is a mistake, not an override: PyYAML would silently keep the last value."""
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a name, not a list or a mapping", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice (lines {seen[key]} and "
                                f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str):
    try:
        return yaml.load(text, Loader=_Yaml12Loader)
    except RecursionError:
        raise UserError(f"{source}: the YAML is nested too deeply to be a config; a config is a flat mapping") \
            from None
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"{source}: malformed YAML{where}: {problem}; fix the syntax") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults, then the YAML file (or the shipped config of that name), then each --key=value override;
    validated as a whole."""
    return build_config(config_values(path, overrides))


def config_values(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """The keys the YAML file and the overrides set (the rest take their defaults), not yet checked."""
    values: dict = {}
    if path is not None:
        values.update(read_config_file(config_path(path)))
    values.update(parse_overrides(overrides))
    return values


def shipped_configs() -> dict[str, Path]:
    """The configs gptrain ships (the repository's configs/, carried by the wheel), by name."""
    folder = Path(str(resources.files("gptrain") / "configs"))
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def config_path(name: str | Path) -> Path:
    """A config file: the path given, or, when no such file exists, the shipped config of that name."""
    path = Path(name)
    shipped = shipped_configs()
    if kind_of(path) is None and path.name == str(name) and path.stem in shipped and path.suffix in ("", ".yaml"):
        return shipped[path.stem]
    if kind_of(path) is None:
        raise UserError(f"config {name} not found: neither a file nor a shipped config ({', '.join(shipped)}; "
                        "`gptrain configs` lists them)")
    return path


def summary_line(path: Path) -> str:
    """What a shipped config is, from the first sentence of its header comment."""
    header = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# ").strip())
    text = " ".join(header)
    return (text.split(". ")[0].rstrip(".") + ".") if text else ""


def copy_shipped_config(name: str, dest: Path, overwrite: bool = False) -> Path:
    """Write shipped config `name` to dest (a file, or a folder to hold NAME.yaml), to edit."""
    shipped = shipped_configs()
    if name.removesuffix(".yaml") not in shipped:
        raise UserError(f"no shipped config named {name!r}; `gptrain configs` lists them ({', '.join(shipped)})")
    source = shipped[name.removesuffix(".yaml")]
    target = dest / source.name if kind_of(dest) == "dir" else dest
    check_output_file(target, "DEST")
    if kind_of(target) is not None and not overwrite:
        raise UserError(f"{target} already exists; choose another path, or pass --overwrite to replace it")
    write_atomically(target, source.read_bytes())
    return target


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    text = read_text(path, "config file", "pass the path of a YAML file, or the name of a shipped config (`gptrain "
                                          "configs` lists them)")
    data = parse_yaml(text, str(path))
    if data is None:
        # An empty file would silently become the 124M, 600,000-iteration default run.
        raise UserError(f"{path} is empty (or only comments); a config sets at least the keys that differ from the "
                        "defaults, see configs/shakespeare_char_cpu.yaml")
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a YAML mapping of key: value lines, got a {type(data).__name__}")
    return data


def parse_overrides(args: list[str]) -> dict:
    values = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"unexpected argument {arg!r}; override config keys as --name=value")
        key, raw = arg[2:].split("=", 1)
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError:  # bytes the locale could not decode arrive as lone surrogates
            raise UserError(f"--{key}: the value is not valid UTF-8 text") from None
        # A path or name is taken as typed: YAML would read init_from=from: as a mapping, a key as a number.
        values[key] = raw if STRING_KEYS.get(key) or raw == "" else parse_yaml(raw, f"--{key}")
    return values


STRING_KEYS = {name: hint is str or str in typing.get_args(hint)  # str, and str | None
               for name, hint in typing.get_type_hints(TrainConfig).items()}


def build_config(values: dict) -> TrainConfig:
    hints = typing.get_type_hints(TrainConfig)
    for key, value in values.items():
        if key not in hints:
            raise UserError(f"unknown config key {key!r}{_suggestion(key, hints)}")
        values[key] = _check_type(key, value, hints[key])
    derive_accumulation(values)
    config = TrainConfig(**values)
    check_values(config)
    return config


def _suggestion(key: str, known) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    if not close:
        return "; `gptrain train --help` lists every key"
    meaning = TrainConfig.__dataclass_fields__[close[0]].metadata["help"].replace("`", "")
    return f"; did you mean {close[0]!r} ({meaning})?"


def _check_type(key: str, value, hint):
    if typing.get_origin(hint) is list:  # one name, or a list of them
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise UserError(f"{key} must be a list (or one value), got {value!r}")
        (item_hint,) = typing.get_args(hint)
        return list(dict.fromkeys(_check_type(key, item, item_hint) for item in items))  # each once, in order
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if not any(value == c and type(value) is type(c) for c in choices):  # 1 is not true, 1.0 not 1
            raise UserError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None, or int | Literal["auto"]
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        words = [c for arg in args if typing.get_origin(arg) is Literal for c in typing.get_args(arg)]
        if any(value == w and type(value) is type(w) for w in words):
            return value
        hint = next(arg for arg in args if arg is not type(None) and typing.get_origin(arg) is not Literal)
        if words:
            try:
                return _check_type(key, value, hint)
            except UserError as exc:
                raise UserError(f"{exc}; or {' or '.join(map(str, words))}") from None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise UserError(f"{key} must be {_type_name(hint)}, got {value!r}")
    if hint is float and not math.isfinite(value):
        raise UserError(f"{key} must be a finite number, got {value}")
    if hint is int and not -(2**63) <= value < 2**63:  # int64: beyond it torch and numpy overflow
        raise UserError(f"{key} is far too large: {value}")
    return value


def _type_name(hint) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def check_heads(c: TrainConfig) -> None:
    """Heads, key/value heads and their width: what attention can split the projections into."""
    _require_at_least(c, 1, *(name for name in ("n_kv_head", "head_dim", "mlp_hidden") if getattr(c, name) is not None))
    if c.head_dim is None and c.n_embd % c.n_head != 0:
        raise UserError(f"n_embd ({c.n_embd}) must be divisible by n_head ({c.n_head}); change one of them, or give "
                        "head_dim")
    if c.n_kv_head is not None and c.n_head % c.n_kv_head:
        raise UserError(f"n_head ({c.n_head}) must be a multiple of n_kv_head ({c.n_kv_head}): each key/value head "
                        "serves the same number of query heads")
    if c.qk_norm_gain and not c.qk_norm:
        raise UserError("qk_norm_gain gives QK-norm a learned gain: set qk_norm: true too")
    if not 0 < c.norm_eps < 1:
        raise UserError(f"norm_eps must be in (0, 1), got {c.norm_eps}")


def check_rope(c: TrainConfig) -> None:
    head_size = c.head_dim or c.n_embd // c.n_head
    if c.pos_emb == "rope" and head_size % 2:
        raise UserError(f"rotary embeddings rotate channel pairs: the head size ({head_size}) must be even")
    if c.rope_theta <= 0:
        raise UserError(f"rope_theta must be positive, got {c.rope_theta}")
    if c.rope_scaling == "llama3" and not (c.rope_factor >= 1 and 0 < c.rope_low_freq_factor < c.rope_high_freq_factor
                                           and c.rope_original_context >= 1):
        raise UserError("llama3 rope scaling needs rope_factor >= 1, 0 < rope_low_freq_factor < "
                        "rope_high_freq_factor and rope_original_context >= 1")


def derive_accumulation(values: dict) -> None:
    """global_batch_size, when set, is the step's sequences over all ranks. With `batch_size: auto`, Trainer finds
    the micro-batch and sets gradient_accumulation_steps from it, so the config must not give that too. With a
    number, gradient_accumulation_steps is global_batch_size / batch_size when not given; a given one wins (as on
    the command line over a config's target), and global_batch_size then records what the step is."""
    total, batch = values.get("global_batch_size"), values.get("batch_size", TrainConfig.batch_size)
    if batch == AUTO:
        if total is None:
            raise UserError("batch_size: auto needs global_batch_size, the sequences per optimizer step to keep "
                            "(e.g. 480 for nanoGPT's 12 x 40); the micro-batch found and gradient_accumulation_steps "
                            "then make up exactly that")
        if "gradient_accumulation_steps" in values:
            raise UserError("batch_size: auto sets gradient_accumulation_steps itself (global_batch_size / the "
                            "micro-batch found): drop gradient_accumulation_steps, or give batch_size as a number")
        return
    if total is None or batch < 1 or total < 1:  # check_values reports the values below 1
        return
    if "gradient_accumulation_steps" not in values:
        if total % batch:
            raise UserError(f"global_batch_size ({total}) must be a multiple of batch_size ({batch}): the step is a "
                            "whole number of micro-batches; change one, or give gradient_accumulation_steps")
        values["gradient_accumulation_steps"] = total // batch
    values["global_batch_size"] = batch * values["gradient_accumulation_steps"]


def check_values(c: TrainConfig) -> None:
    """Checks between values that types alone cannot express."""
    check_lora(c)
    check_objective(c)
    if c.batch_size != AUTO and c.batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {c.batch_size}; or auto")
    _require_at_least(c, 1, "block_size", "n_layer", "n_head", "n_embd", "vocab_pad_multiple",
                      "eval_interval", "update_ratio_interval",
                      "log_interval", "eval_iters", "gradient_accumulation_steps", "max_bad_steps",
                      "overfit_evals", "grad_spike_factor")
    if c.global_batch_size is not None:
        _require_at_least(c, 1, "global_batch_size")
    _require_at_least(c, 0, "max_iters", "checkpoint_interval", "early_stop_evals", "warmup_iters", "lr_decay_iters",
                      "learning_rate", "min_lr", "weight_decay", "grad_clip")
    check_heads(c)
    if c.logit_softcap is not None and c.logit_softcap <= 0:
        raise UserError(f"logit_softcap must be a positive number or null, got {c.logit_softcap}")
    check_rope(c)
    if not 0.0 < c.decay_fraction <= 1.0:
        raise UserError(f"decay_fraction must be in (0, 1], got {c.decay_fraction}")
    _require_at_least(c, 0, "muon_lr")
    if not 0.0 <= c.muon_momentum < 1.0:
        raise UserError(f"muon_momentum must be in [0, 1), got {c.muon_momentum}")
    if not 0.0 <= c.dropout < 1.0:
        raise UserError(f"dropout must be in [0, 1), got {c.dropout}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(c, name) < 1.0:
            raise UserError(f"{name} must be in [0, 1), got {getattr(c, name)}")
    if c.decay_lr and c.min_lr > c.learning_rate:
        raise UserError(f"min_lr ({c.min_lr:g}) is above learning_rate ({c.learning_rate:g}): the schedule decays "
                        "from learning_rate down to min_lr; lower min_lr (nanoGPT uses learning_rate / 10)")
    if not 0 <= c.seed < 2**63:
        raise UserError(f"seed must be between 0 and 2**63 - 1, got {c.seed}")
    if c.decay_lr and c.lr_decay_iters < c.warmup_iters:
        raise UserError(
            f"lr_decay_iters ({c.lr_decay_iters}) must be >= warmup_iters ({c.warmup_iters}); "
            "the cosine decay starts where the warmup ends"
        )
    if c.init_from not in ("scratch", "resume") and not (c.init_from.startswith("from:") and len(c.init_from) > 5):
        raise UserError(f"init_from must be scratch, resume or from:PATH (a checkpoint or a Hugging Face GPT-2 "
                        f"folder to fine-tune), got {c.init_from!r}")
    if not 0 < c.update_ratio_min < c.update_ratio_max:
        raise UserError(
            f"the update ratio band needs 0 < update_ratio_min < update_ratio_max, got "
            f"{c.update_ratio_min} and {c.update_ratio_max}"
        )
    if not DEVICE_PATTERN.fullmatch(c.device):
        raise UserError(f"device must be auto, cpu, cuda, cuda:N or mps; got {c.device!r}")
    for name in ("out_dir", "dataset"):
        if not getattr(c, name).strip():
            raise UserError(f"{name} must not be empty")


def check_objective(c: TrainConfig) -> None:
    """DPO's keys (which dataset goes with which objective is checked where the dataset is opened)."""
    if c.dpo_beta <= 0:
        raise UserError(f"dpo_beta must be a positive number, got {c.dpo_beta:g} (TRL's default is 0.1)")
    if c.objective == "dpo" and c.batch_size == AUTO:
        raise UserError("batch_size: auto does not search DPO's micro-batches (each pair is two sequences): give "
                        "batch_size as a number of pairs")


def check_lora(c: TrainConfig) -> None:
    _require_at_least(c, 0, "lora_rank", "chat_eval_answers")
    if c.lora_alpha <= 0:
        raise UserError(f"lora_alpha must be a positive number, got {c.lora_alpha}")
    if not 0.0 <= c.lora_dropout < 1.0:
        raise UserError(f"lora_dropout must be in [0, 1), got {c.lora_dropout}")
    if c.lora_rank and not c.lora_targets:
        raise UserError("lora_targets is empty: name the layers that get adapters (e.g. [attn.c_attn, mlp.c_fc]), "
                        "or set lora_rank: 0")
    if c.lora_rank and c.optimizer != "adamw":
        raise UserError("LoRA trains its adapters with AdamW: set optimizer: adamw (Muon orthogonalises whole weight "
                        "matrices, not rank-r factors)")
    if c.lora_rank and c.init_from == "scratch":
        raise UserError("lora_rank > 0 adapts a trained model: set init_from: from:PATH (its checkpoint stays the "
                        "frozen base)")


def _require_at_least(c: TrainConfig, minimum, *names: str) -> None:
    for name in names:
        if getattr(c, name) < minimum:
            raise UserError(f"{name} must be >= {minimum}, got {getattr(c, name)}")


def config_to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def write_config(config: TrainConfig, path: Path) -> None:
    write_atomically(path, yaml.safe_dump(config_to_dict(config), sort_keys=False).encode("utf-8"))
