import json
import math

import pytest
import torch
from conftest import run_cli

from gptrain.analysis.grads import global_norm, gradient_rows
from gptrain.model import GPT, GPTConfig


def model_with_grads(prepare=None) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=32))
    if prepare:
        with torch.no_grad():
            prepare(model)
    idx = torch.randint(0, 40, (4, 16))
    _, loss = model(idx, idx.roll(-1, 1))
    loss.backward()
    return model


def test_rows_match_the_gradients():
    model = model_with_grads()
    rows = gradient_rows(model)
    assert [r.name for r in rows] == [n for n, _ in model.named_parameters()]
    row = next(r for r in rows if r.name == "transformer.h.1.mlp.c_fc.weight")
    p = model.transformer.h[1].mlp.c_fc.weight
    assert row.shape == [128, 32]
    assert row.grad_mean == pytest.approx(p.grad.mean().item(), abs=1e-12)
    assert row.grad_std == pytest.approx(p.grad.std().item(), rel=1e-5)
    assert row.grad_max_abs == pytest.approx(p.grad.abs().max().item())
    assert row.ratio == pytest.approx(p.grad.norm().item() / p.norm().item(), rel=1e-5)
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    assert global_norm(rows) == pytest.approx(expected, rel=1e-5)
    assert not any(r.flags for r in rows)


def test_zero_gradients_are_flagged():
    # A zero final LayerNorm gain cuts every block off from the loss.
    rows = gradient_rows(model_with_grads(lambda m: m.transformer.ln_f.weight.zero_()))
    flags = {r.name: r.flags for r in rows}
    assert flags["transformer.h.0.attn.c_attn.weight"] == ["zero"]
    assert flags["transformer.ln_f.weight"] == []


def test_nonfinite_gradients_are_flagged():
    rows = gradient_rows(model_with_grads(lambda m: m.transformer.h[1].mlp.c_fc.weight[0, 0].fill_(math.inf)))
    assert "non-finite" in next(r for r in rows if r.name == "transformer.h.1.mlp.c_fc.weight").flags
    assert math.isnan(global_norm(rows)) or math.isinf(global_norm(rows))


def test_outliers_are_flagged():
    rows = gradient_rows(model_with_grads(lambda m: m.transformer.h[0].mlp.c_fc.weight.mul_(1e-4)))
    flagged = [r.name for r in rows if any(f.startswith("outlier") for f in r.flags)]
    assert flagged == ["transformer.h.0.mlp.c_fc.weight"]


@pytest.mark.slow
def test_grads_cli_from_config_and_checkpoint(tmp_path, tiny_config):
    import yaml
    from conftest import TINY

    from gptrain.train import train

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "dataset": str(tiny_config().dataset)}))
    table = run_cli("grads", str(config))
    assert table.returncode == 0, table.stderr
    assert "transformer.wte.weight" in table.stdout and "global gradient norm:" in table.stdout
    random = run_cli("grads", str(config), "--random", "--json", "--batch_size=2")
    data = json.loads(random.stdout)
    assert len(data["parameters"]) == 2 + 2 * 12 + 2  # embeddings, 12 tensors per block, final LayerNorm
    assert data["global_norm"] > 0
    train(tiny_config(max_iters=3, eval_interval=3))
    from_ckpt = run_cli("grads", "--ckpt", str(tmp_path / "run"), "--json")
    assert from_ckpt.returncode == 0, from_ckpt.stderr
    assert json.loads(from_ckpt.stdout)["global_norm"] > 0
    neither = run_cli("grads")
    assert neither.returncode == 2 and "CONFIG file or --ckpt" in neither.stderr
