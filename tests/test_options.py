"""Architecture, optimizer and schedule options beyond GPT-2."""

import itertools
import math

import pytest
import torch

from gptrain.model import GPT, GPTConfig, Rotary, apply_rotary
from gptrain.optim.muon import Muon, build_muon, newton_schulz
from gptrain.optim.schedule import LrSchedule
from gptrain.train import Trainer

BASE = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False)


def model(**options) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**BASE, **options})).eval()


def test_defaults_are_gpt2():
    gpt2 = GPT(GPTConfig(**BASE))
    assert "wpe" in gpt2.transformer and gpt2.rotary is None
    assert isinstance(gpt2.transformer.ln_f, torch.nn.LayerNorm)
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight


@pytest.mark.parametrize("options", [dict(pos_emb="rope"), dict(norm="rmsnorm"), dict(qk_norm=True),
                                     dict(mlp="relu2"), dict(mlp="swiglu"), dict(tie_embeddings=False),
                                     dict(zero_init_proj=True), dict(logit_softcap=5.0)])
def test_each_option_trains_and_keeps_shapes(options):
    m = model(**options).train()
    idx = torch.randint(0, 50, (3, 16))
    logits, loss = m(idx, idx.roll(-1, 1))
    assert logits.shape == (3, 16, 50) and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


def test_option_structure():
    assert "wpe" not in model(pos_emb="rope").transformer
    assert model(pos_emb="rope").num_params() == model().num_params() - 16 * 32
    assert isinstance(model(norm="rmsnorm").transformer.h[0].ln_1, torch.nn.RMSNorm)
    untied = model(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_params() == model().num_params() + 64 * 32  # a second (padded) 50-token matrix
    gelu, swiglu = model().transformer.h[0].mlp, model(mlp="swiglu").transformer.h[0].mlp
    assert abs(sum(p.numel() for p in swiglu.parameters()) - sum(p.numel() for p in gelu.parameters())) <= 3 * 32
    zero = model(zero_init_proj=True, tie_embeddings=False)
    assert all(torch.count_nonzero(b.attn.c_proj.weight) == 0 for b in zero.transformer.h)
    assert torch.count_nonzero(zero.lm_head.weight) == 0
    capped, _ = model(logit_softcap=2.0)(torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16)))
    assert capped.abs().max() < 2.0


@pytest.mark.parametrize("options", [dict(pos_emb="rope"), dict(pos_emb="rope", qk_norm=True, norm="rmsnorm")])
def test_causality_holds_with_rope(options):
    m = model(**options)
    idx = torch.randint(0, 50, (2, 16))
    logits, _ = m(idx, idx)
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 50
    logits_changed, _ = m(changed, changed)
    torch.testing.assert_close(logits_changed[:, :9], logits[:, :9])
    assert not torch.allclose(logits_changed[:, 9:], logits[:, 9:])


def test_rope_scores_depend_only_on_relative_position():
    rotary = Rotary(GPTConfig(block_size=64, n_head=1, n_embd=16))
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        return (apply_rotary(q, *rotary(m, 1)) * apply_rotary(k, *rotary(n, 1))).sum()

    for m, n, shift in ((5, 2, 17), (0, 0, 40), (30, 3, 20)):
        torch.testing.assert_close(score(m + shift, n + shift), score(m, n), atol=1e-5, rtol=1e-5)
    assert not torch.isclose(score(5, 2), score(5, 3))  # and they do depend on it


GRID = list(itertools.product(["learned", "rope"], ["layernorm", "rmsnorm"], [False, True],
                              ["gelu", "relu2", "swiglu"], [True, False]))


@pytest.mark.parametrize("pos_emb, norm, qk_norm, mlp, tie", GRID)
def test_kv_cache_equals_recompute_for_every_combination(pos_emb, norm, qk_norm, mlp, tie):
    m = model(pos_emb=pos_emb, norm=norm, qk_norm=qk_norm, mlp=mlp, tie_embeddings=tie,
              logit_softcap=10.0 if qk_norm else None)
    prompt = torch.randint(0, 50, (2, 3))
    runs = [m.generate(prompt, 36, generator=torch.Generator().manual_seed(1), use_kv_cache=kv) for kv in (1, 0)]
    assert torch.equal(runs[0], runs[1])  # 36 new tokens: past block_size 16 twice


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_newton_schulz_against_svd(shape):
    torch.manual_seed(0)
    g = torch.randn(shape)
    x = newton_schulz(g)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    reference = u @ vh  # the exact orthogonalisation
    # x shares g's singular vectors: in their basis it is diagonal ...
    d = u.T @ x @ vh.T
    off_diagonal = d - torch.diag(torch.diagonal(d))
    assert off_diagonal.abs().max() < 1e-4
    # ... with every singular value pushed into Keller Jordan's band around 1 (exact: all 1).
    assert 0.6 < torch.diagonal(d).min() and torch.diagonal(d).max() < 1.25
    assert torch.nn.functional.cosine_similarity(x.flatten(), reference.flatten(), dim=0) > 0.97


def test_muon_groups_and_orthogonal_update():
    m = model(tie_embeddings=False).train()
    optimizer = build_muon(m, weight_decay=0.1, adam_lr=1e-3, muon_lr=0.02, momentum=0.95, betas=(0.9, 0.95))
    muon, matrices, vectors = optimizer.param_groups
    assert muon["use_muon"] and all(p.dim() == 2 for p in muon["params"]) and len(muon["params"]) == 8
    embeddings_and_head = (m.transformer.wte.weight, m.transformer.wpe.weight, m.lm_head.weight)
    assert {id(p) for p in matrices["params"]} == {id(p) for p in embeddings_and_head}
    assert all(p.dim() == 1 for p in vectors["params"]) and vectors["weight_decay"] == 0.0
    assert muon["ns_dtype"] == "float32"  # a float32 run orthogonalises in float32
    weight = m.transformer.h[0].mlp.c_proj.weight  # 32 x 128: its gradient has full rank
    before = weight.detach().clone()
    _, loss = m(torch.randint(0, 50, (4, 16)), torch.randint(0, 50, (4, 16)))
    loss.backward()
    optimizer.step()
    update = (before - weight.detach()) / 0.02  # lr * sqrt(max(1, rows / cols)) = lr
    singular = torch.linalg.svdvals(update)  # descending
    # Every direction the gradient has moved by about the same amount. It lacks one: gradients that reach the
    # residual stream through LayerNorms have zero mean over channels, and Newton-Schulz keeps a zero a zero.
    assert 0.6 < singular[:-1].min() and singular.max() < 1.25
    assert singular[-1] < 1e-3


def test_muon_adamw_groups_match_torch_adamw():
    a, b = model(tie_embeddings=False), model(tie_embeddings=False)
    ours = Muon([{"params": [a.transformer.wte.weight], "use_muon": False, "lr": 1e-2, "weight_decay": 0.1}])
    theirs = torch.optim.AdamW([b.transformer.wte.weight], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(3):
        for m, opt in ((a, ours), (b, theirs)):
            idx = torch.arange(48).view(3, 16) % 50
            _, loss = m.train()(idx, idx.roll(-1, 1))
            loss.backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(a.transformer.wte.weight, b.transformer.wte.weight, atol=1e-6, rtol=1e-5)


def test_schedules_by_hand():
    def lr(it, shape="cosine"):  # a peak of 1e-3 and a floor of 1e-4
        return 1e-3 * LrSchedule(warmup_iters=100, decay_iters=1100, min_ratio=0.1, shape=shape).factor(it)

    assert lr(600, "linear") == pytest.approx(5.5e-4)  # halfway down the line
    assert lr(100, "linear") == pytest.approx(1e-3)
    # wsd with decay_fraction 0.2: flat until 1100 - 220 = 880, then a line to min_lr at 1100.
    assert lr(879, "wsd") == pytest.approx(1e-3)
    assert lr(990, "wsd") == pytest.approx(1e-3 - 9e-4 * 110 / 220)
    assert lr(1100, "wsd") == pytest.approx(1e-4)
    assert lr(50, "wsd") == pytest.approx(1e-3 * 51 / 101)  # warmup as before
    assert lr(600) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 2)) * 9e-4)


def test_trainer_scales_every_group_with_the_schedule(tiny_config):
    trainer = Trainer(tiny_config(optimizer="muon", muon_lr=0.05, learning_rate=1e-3, min_lr=1e-4,
                                  warmup_iters=10, lr_decay_iters=40, lr_schedule="wsd", decay_fraction=0.5))
    logged = trainer.set_lr(4)
    rates = {g["use_muon"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert logged == pytest.approx(1e-3 * 5 / 11)
    assert rates[True] == pytest.approx(0.05 * 5 / 11) and rates[False] == pytest.approx(1e-3 * 5 / 11)
    losses = [trainer.train_step().loss.item() for it in range(10)]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_speedrun_script_compares_two_recipes(tmp_path, char_dataset):
    import yaml
    from conftest import TINY, run_cli

    configs = {}
    for name, changes in (("ref", {}), ("fast", dict(optimizer="muon", pos_emb="rope", qk_norm=True))):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump({**TINY, "dataset": str(char_dataset), "max_iters": 6,
                                                 "lr_decay_iters": 6, **changes}))
    result = run_cli("scripts/speedrun.py", "--reference", str(configs["ref"]), "--fast", str(configs["fast"]),
                     "--seeds", "1", "--out", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sum(line.startswith(("reference", "fast")) and "    6 " in line for line in lines) == 2
    assert "of the reference's time" in lines[-1] and ("claim met" in lines[-1] or "claim NOT met" in lines[-1])
