import pytest
from conftest import ROOT

from gptrain.config import TrainConfig, build_config, load_config, parse_overrides
from gptrain.errors import UserError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_then_file_then_overrides(tmp_path):
    path = write(tmp_path, "n_layer: 4\nlearning_rate: 1e-3\nbias: false\n")
    config = load_config(path, ["--n_layer=6", "--dropout=0.1", "--device=cpu"])
    assert config.n_layer == 6 and config.dropout == 0.1 and config.device == "cpu"
    assert config.learning_rate == 1e-3  # YAML 1.2 float, which PyYAML alone reads as a string
    assert config.bias is False
    assert config.n_embd == TrainConfig().n_embd


def test_gpt2_configs_describe_the_four_gpt2_sizes_at_half_a_million_tokens_per_step():
    from gptrain.model import GPT

    shapes = {"gpt2": (12, 12, 768, 124), "gpt2-medium": (24, 16, 1024, 355), "gpt2-large": (36, 20, 1280, 774),
              "gpt2-xl": (48, 25, 1600, 1558)}
    for name, (layers, heads, width, millions) in shapes.items():
        config = load_config(ROOT / "configs" / f"{name}.yaml")
        assert (config.n_layer, config.n_head, config.n_embd, config.block_size) == (layers, heads, width, 1024)
        assert config.tokens_per_iter == 491_520 and config.compile == "auto" and config.vocab_pad_multiple == 64
        import torch

        with torch.device("meta"):
            model = GPT(config.model_config(50257))
        assert round(model.num_params() / 1e6) in (millions, millions + 1)  # + the 47 padding rows


def test_shipped_configs_load():
    cpu = load_config(ROOT / "configs/shakespeare_char_cpu.yaml")
    assert (cpu.n_layer, cpu.n_head, cpu.n_embd, cpu.block_size, cpu.batch_size) == (4, 4, 128, 64, 12)
    assert (cpu.max_iters, cpu.lr_decay_iters, cpu.eval_iters) == (2000, 2000, 20)
    assert (cpu.dropout, cpu.log_interval) == (0.0, 1)
    gpu = load_config(ROOT / "configs/shakespeare_char.yaml")
    assert (gpu.n_layer, gpu.n_head, gpu.n_embd, gpu.block_size, gpu.batch_size) == (6, 6, 384, 256, 64)
    assert (gpu.learning_rate, gpu.max_iters, gpu.dropout, gpu.eval_interval) == (1e-3, 5000, 0.2, 250)
    fast = load_config(ROOT / "configs/shakespeare_char_cpu_fast.yaml")
    assert (fast.n_layer, fast.n_head, fast.n_embd, fast.block_size) == (4, 2, 80, 64)
    assert (fast.optimizer, fast.pos_emb, fast.max_iters, fast.lr_decay_iters) == ("muon", "rope", 220, 220)
    tune = load_config(ROOT / "configs/finetune_shakespeare.yaml")
    assert tune.init_from == "from:models/gpt2" and tune.dataset == "shakespeare"
    assert (tune.n_layer, tune.n_head, tune.n_embd, tune.bias, tune.learning_rate) == (12, 12, 768, True, 3e-5)


def test_integers_are_accepted_for_float_keys():
    assert build_config({"learning_rate": 1}).learning_rate == 1.0


@pytest.mark.parametrize("values, message", [
    ({"n_layers": 4}, "unknown config key 'n_layers'; did you mean 'n_layer' (transformer blocks)?"),
    ({"learnig_rate": 1e-3}, "did you mean 'learning_rate' (peak learning rate"),
    ({"batch_size": "ten"}, "batch_size must be an integer, got 'ten'"),
    ({"batch_size": 2.5}, "batch_size must be an integer"),
    ({"bias": 1}, "bias must be true or false"),
    ({"n_layer": True}, "n_layer must be an integer"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"n_embd": 100, "n_head": 3}, "n_embd (100) must be divisible by n_head (3)"),
    ({"dropout": 1.5}, "dropout must be in [0, 1)"),
    ({"dtype": "float8"}, "dtype must be one of auto, float32, bfloat16, float16; got 'float8'"),
    ({"init_from": "gpt2"}, "init_from must be scratch, resume or from:PATH"),
    ({"device": "tpu"}, "device must be auto, cpu, cuda, cuda:N or mps"),
    ({"warmup_iters": 100, "lr_decay_iters": 50}, "lr_decay_iters (50) must be >= warmup_iters (100)"),
    ({"beta2": 1.0}, "beta2 must be in [0, 1)"),
])
def test_invalid_values_are_refused_with_a_clear_message(values, message):
    with pytest.raises(UserError) as info:
        build_config(values)
    assert message in str(info.value)


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="malformed YAML at line 3"):
        load_config(write(tmp_path, "n_layer: 4\nn_head: [1\n"))
    with pytest.raises(UserError, match="must be a YAML mapping"):
        load_config(write(tmp_path, "- n_layer\n- 4\n"))


def test_override_syntax():
    assert parse_overrides(["--max_iters=10", "--out_dir=a=b", "--compile=true"]) == {
        "max_iters": 10, "out_dir": "a=b", "compile": True}
    with pytest.raises(UserError, match="override config keys as --name=value"):
        parse_overrides(["--max_iters", "10"])


def test_every_key_is_documented_once_and_the_docs_table_matches_it():
    import dataclasses
    import subprocess
    import sys

    from gptrain.config import key_groups, keys_help

    keys = dataclasses.fields(TrainConfig)
    assert all(f.metadata["help"].strip() for f in keys)
    assert [f.name for _, group in key_groups() for f in group] == [f.name for f in keys]
    help_text = keys_help()
    assert all(f"  {f.name} [" in help_text for f in keys)
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_table.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_the_docs_table_check_sees_a_stale_row(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_table", ROOT / "scripts" / "config_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    stale = page.replace("| `n_layer` | `12` |", "| `n_layer` | `6` |")
    assert stale != page and table.page_with_table(stale) == page


def test_a_misspelt_key_is_answered_with_the_key_and_its_meaning():
    with pytest.raises(UserError, match=r"did you mean 'warmup_iters' \(linear warmup steps"):
        build_config({"warmup_iter": 10})
    with pytest.raises(UserError, match="gptrain train --help` lists every key"):
        build_config({"zzzzzz": 1})


def test_train_help_lists_every_key_with_its_default(capsys):
    import dataclasses

    from gptrain.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert f"{f.name} [" in out
    assert "learning_rate [6e-4]" in out and "health monitor:" in out
