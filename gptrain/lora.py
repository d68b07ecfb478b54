"""LoRA (Hu et al. 2021): fine-tune small low-rank adapters beside chosen linear layers while the model's own
weights stay frozen. Built on Hugging Face peft (the `lora` extra), whose LoRA layers wrap any nn.Linear.

What trains:
- each target layer W gets A (r x in, random) and B (out x r, zero at first) and computes
  W x + (lora_alpha / r) B A x, so training starts from the base model exactly;
- on a chat dataset, the chat tokens' rows of the embedding (and of the head, tied or not), through peft's
  trainable tokens: rows the run may have just added (as the mean of the others) must learn what they mean, and
  frozen, all four would stay one and the same token. Only those rows are stored.

A LoRA run's checkpoint holds only these trained tensors (its "model" entry) and a reference to the base checkpoint
it adapts (its "lora" entry: the base file's path and sha256, the settings); loading it reads the base again, and
refuses a base that is missing or changed. merge() folds the adapters into the weights, giving a plain GPT.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch.nn as nn

from gptrain.data.chat import base_vocab_size
from gptrain.errors import UserError

# The linear layers of a block, by their names in gptrain's model (attn.c_attn computes q, k and v in one matmul).
LoraTarget = Literal["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
ADAPTER = "default"  # peft's name for the one adapter


def import_peft():
    try:
        import peft
    except ImportError:
        raise UserError("LoRA (lora_rank > 0) needs Hugging Face peft: pip install 'gptrain[lora]'") from None
    return peft


@dataclass
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    targets: list[str]
    trained_tokens: list[int] = field(default_factory=list)  # ids whose embedding rows train (the chat tokens)

    def describe(self) -> str:
        return (f"lora_rank {self.rank}, lora_alpha {self.alpha:g}, lora_dropout {self.dropout:g}, lora_targets "
                f"[{', '.join(self.targets)}]")

    @classmethod
    def of(cls, config, dataset_meta: dict) -> LoraSettings:
        # The ids a chat template of gptrain's added to the vocabulary (a model's own template adds none).
        tokens = list(range(base_vocab_size(dataset_meta), dataset_meta["vocab_size"]))
        return cls(config.lora_rank, config.lora_alpha, config.lora_dropout, list(config.lora_targets), tokens)


@dataclass
class LoraRun:
    """What a LoRA run's checkpoints record beside the adapters: the settings and the base checkpoint."""

    settings: LoraSettings
    base: str  # the base checkpoint file, as an absolute path
    base_sha256: str

    @classmethod
    def on_base(cls, settings: LoraSettings, base: Path) -> LoraRun:
        return cls(settings, str(base.resolve()), file_sha256(base))

    def entry(self) -> dict:
        return {"base": self.base, "base_sha256": self.base_sha256, **asdict(self.settings)}

    @classmethod
    def from_entry(cls, entry, where) -> LoraRun:
        """A checkpoint's "lora" entry, its types checked (a damaged file must fail here, with its name)."""
        try:
            settings = LoraSettings(**{k: entry[k] for k in ("rank", "alpha", "dropout", "targets",
                                                             "trained_tokens")})
            run = cls(settings, entry["base"], entry["base_sha256"])
        except (KeyError, TypeError):
            raise UserError(f"{where}: its 'lora' entry is damaged (it needs base, base_sha256, rank, alpha, dropout, "
                            "targets, trained_tokens)") from None
        numbers = (settings.alpha, settings.dropout)
        if not (isinstance(run.base, str) and isinstance(run.base_sha256, str) and isinstance(settings.rank, int)
                and settings.rank > 0 and all(isinstance(n, (int, float)) for n in numbers)
                and isinstance(settings.targets, list) and all(isinstance(t, str) for t in settings.targets)
                and isinstance(settings.trained_tokens, list)
                and all(isinstance(t, int) for t in settings.trained_tokens)):
            raise UserError(f"{where}: its 'lora' entry is damaged (a value of the wrong type)")
        return run

    def check_base(self, where) -> Path:
        """The base checkpoint file, as it was when the adapters were trained on it."""
        base = Path(self.base)
        if not base.is_file():
            raise UserError(f"{where} holds LoRA adapters of the base checkpoint {base}, which is missing; put that "
                            "file back (the adapters are useless without it)")
        if file_sha256(base) != self.base_sha256:
            raise UserError(f"{where} holds LoRA adapters of the base checkpoint {base}, which has changed since "
                            "(its sha256 differs); the adapters fit only the weights they were trained on: restore "
                            "that file")
        return base

    def adapter_weights(self, weights: dict, model: nn.Module) -> dict:
        """The trained tensors of a full state dict (the adapters and trained token rows)."""
        trained = {name for name, param in model.named_parameters() if param.requires_grad}
        return {name: tensor for name, tensor in weights.items() if name in trained}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def add_adapters(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap the target layers (and the trained token rows) with peft's adapters, in place; only they train."""
    peft = import_peft()
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=list(settings.targets))
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    if settings.trained_tokens:
        train_token_rows(model, settings.trained_tokens)
    for name, param in model.named_parameters():
        param.requires_grad = is_adapter_parameter(name)
    return model


def is_adapter_parameter(name: str) -> bool:
    """peft's names for what an adapter adds: LoRA's matrices and the trained token rows."""
    return ".lora_" in name or ".trainable_tokens_delta." in name


def has_adapters(model: nn.Module) -> bool:
    return any(is_adapter_parameter(name) for name, _ in model.named_parameters())


def train_token_rows(model: nn.Module, tokens: list[int]) -> None:
    """peft's trainable tokens on the embedding, and on the head: a tied head follows the embedding's rows (as peft
    ties them for Hugging Face models), an untied one trains its own."""
    from peft import TrainableTokensConfig
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    config = TrainableTokensConfig(token_indices=tokens)
    embedding = TrainableTokensLayer(model.transformer.wte, ADAPTER, config=config)
    embedding.update_layer(ADAPTER, config=config)
    tied = embedding if model.config.tie_embeddings else None
    head = TrainableTokensLayer(model.lm_head, ADAPTER, config=config, tied_adapter=tied)
    head.update_layer(ADAPTER, config=config, tied_adapter=tied)
    model.transformer.wte, model.lm_head = embedding, head


def load_adapter_weights(model: nn.Module, weights: dict, where) -> None:
    """Load a LoRA checkpoint's tensors into a model with adapters; every trained tensor must be there."""
    expected = {name for name, param in model.named_parameters() if param.requires_grad}
    missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
    if missing or unexpected:
        raise UserError(f"{where}: its adapters do not fit the model (missing {missing[:2]}, unexpected "
                        f"{unexpected[:2]}); the checkpoint is damaged")
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:
        raise UserError(f"{where}: its adapters do not fit the model ({' '.join(str(exc).split())[:300]})") from None


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The model without its adapters (the base it adapts) for a while; a model without adapters as it is. peft
    turns the adapters' gradients off and back on with them: on again, exactly the adapters train, as before."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into the weight it adapts and unwrap the layers: a plain model computing the same."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for _, module in wrapped:
        module.merge()
    for name, module in wrapped:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module.get_base_layer())
    for param in model.parameters():
        param.requires_grad = True
    return model
