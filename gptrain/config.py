"""The training configuration: a typed dataclass with nanoGPT's key names, read from YAML plus --key=value."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from gptrain.errors import UserError
from gptrain.model import GPTConfig
from gptrain.runtime.device import DEVICE_PATTERN
from gptrain.runtime.files import read_text

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Parallel = Literal["ddp", "fsdp"]
PosEmb = Literal["learned", "rope"]
Norm = Literal["layernorm", "rmsnorm"]
MlpKind = Literal["gelu", "relu2", "swiglu"]
OptimizerKind = Literal["adamw", "muon"]
LrSchedule = Literal["cosine", "wsd", "linear"]
CompileSetting = Literal["auto", True, False]


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    eval_interval: int = 2000
    log_interval: int = 1
    eval_iters: int = 200
    eval_only: bool = False
    always_save_checkpoint: bool = True
    checkpoint_interval: int = 0
    init_from: str = "scratch"
    # data
    dataset: str = "shakespeare_char"
    gradient_accumulation_steps: int = 1
    batch_size: int = 12
    block_size: int = 1024
    # model
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    # architecture options beyond GPT-2 (the defaults are GPT-2's choices)
    pos_emb: PosEmb = "learned"
    norm: Norm = "layernorm"
    qk_norm: bool = False
    mlp: MlpKind = "gelu"
    tie_embeddings: bool = True
    zero_init_proj: bool = False
    logit_softcap: float | None = None
    vocab_pad_multiple: int = 64
    # optimizer
    optimizer: OptimizerKind = "adamw"
    learning_rate: float = 6e-4
    max_iters: int = 600000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    # learning-rate schedule
    decay_lr: bool = True
    lr_schedule: LrSchedule = "cosine"
    warmup_iters: int = 2000
    lr_decay_iters: int = 600000
    min_lr: float = 6e-5
    decay_fraction: float = 0.2
    # system
    device: str = "auto"
    dtype: Dtype = "auto"
    compile: CompileSetting = "auto"
    seed: int = 1337
    parallel: Parallel = "ddp"
    activation_checkpointing: bool = False
    # health monitor
    max_bad_steps: int = 10
    grad_spike_factor: float = 10.0
    update_ratio_interval: int = 10
    update_ratio_min: float = 1e-4
    update_ratio_max: float = 1e-2
    overfit_evals: int = 3

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The model keys of this config (every GPTConfig field shares its name with one here)."""
        keys = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size"}
        return GPTConfig(vocab_size=vocab_size, **{k: getattr(self, k) for k in keys})

    @property
    def tokens_per_iter(self) -> int:
        return self.gradient_accumulation_steps * self.batch_size * self.block_size


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
    """Defaults, then the YAML file, then each --key=value override; validated as a whole."""
    values: dict = {}
    if path is not None:
        values.update(read_config_file(path))
    values.update(parse_overrides(overrides))
    return build_config(values)


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    text = read_text(path, "config file", "pass the path of a YAML file such as configs/shakespeare_char_cpu.yaml")
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


STRING_KEYS = {name: hint is str for name, hint in typing.get_type_hints(TrainConfig).items()}


def build_config(values: dict) -> TrainConfig:
    hints = typing.get_type_hints(TrainConfig)
    for key, value in values.items():
        if key not in hints:
            raise UserError(f"unknown config key {key!r}{_suggestion(key, hints)}")
        values[key] = _check_type(key, value, hints[key])
    config = TrainConfig(**values)
    check_values(config)
    return config


def _suggestion(key: str, known) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else "; see the config table in README.md"


def _check_type(key: str, value, hint):
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if not any(value == c and type(value) is type(c) for c in choices):  # 1 is not true, 1.0 not 1
            raise UserError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
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


def check_values(c: TrainConfig) -> None:
    """Checks between values that types alone cannot express."""
    _require_at_least(c, 1, "batch_size", "block_size", "n_layer", "n_head", "n_embd", "vocab_pad_multiple",
                      "eval_interval", "update_ratio_interval",
                      "log_interval", "eval_iters", "gradient_accumulation_steps", "max_bad_steps",
                      "overfit_evals", "grad_spike_factor")
    _require_at_least(c, 0, "max_iters", "checkpoint_interval", "warmup_iters", "lr_decay_iters", "learning_rate",
                      "min_lr", "weight_decay", "grad_clip")
    if c.n_embd % c.n_head != 0:
        raise UserError(f"n_embd ({c.n_embd}) must be divisible by n_head ({c.n_head}); change one of them")
    if c.logit_softcap is not None and c.logit_softcap <= 0:
        raise UserError(f"logit_softcap must be a positive number or null, got {c.logit_softcap}")
    if c.pos_emb == "rope" and (c.n_embd // c.n_head) % 2:
        raise UserError(f"rotary embeddings rotate channel pairs: the head size n_embd / n_head "
                        f"({c.n_embd // c.n_head}) must be even")
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


def _require_at_least(c: TrainConfig, minimum, *names: str) -> None:
    for name in names:
        if getattr(c, name) < minimum:
            raise UserError(f"{name} must be >= {minimum}, got {getattr(c, name)}")


def config_to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def write_config(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")
