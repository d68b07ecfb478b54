import math

import pytest
import torch

from gptrain.model import GPT, GPTConfig, KVCache, sample_next_token

SMALL = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)


def small_model(**changes) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**SMALL.__dict__, **changes})).eval()


def test_gpt2_124m_has_124439808_parameters():
    gpt2 = dict(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768, bias=True)
    with torch.device("meta"):  # shapes only: no 500 MB allocation
        model = GPT(GPTConfig(**gpt2, vocab_pad_multiple=1))
        padded = GPT(GPTConfig(**gpt2))
    assert model.num_params() == 124_439_808
    assert model.num_params(non_embedding=True) == 124_439_808 - 1024 * 768
    assert padded.transformer.wte.weight.shape[0] == 50_304  # nanoGPT's padded GPT-2 vocabulary
    assert padded.num_params() == 124_439_808 + 47 * 768


def test_changing_a_future_token_never_changes_earlier_logits():
    model = small_model()
    idx = torch.randint(0, 50, (2, 16))
    logits, _ = model(idx, targets=idx)  # (B, T, V) for every position
    for t in (0, 7, 14):
        changed = idx.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1) % 50
        logits_changed, _ = model(changed, targets=changed)
        torch.testing.assert_close(logits_changed[:, : t + 1], logits[:, : t + 1])
        assert not torch.allclose(logits_changed[:, t + 1:], logits[:, t + 1:])


def test_head_is_tied_to_token_embedding():
    model = small_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_gpt2_initialisation():
    model = GPT(GPTConfig(block_size=64, vocab_size=500, n_layer=8, n_head=4, n_embd=256, bias=True))
    fc = model.transformer.h[0].mlp.c_fc.weight
    proj = model.transformer.h[0].mlp.c_proj.weight
    assert fc.std().item() == pytest.approx(0.02, rel=0.05)
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert torch.all(model.transformer.h[0].attn.c_attn.bias == 0)


def test_forward_without_targets_returns_only_last_position():
    model = small_model()
    idx = torch.randint(0, 50, (3, 10))
    logits, loss = model(idx)
    full, _ = model(idx, targets=idx)
    assert loss is None and logits.shape == (3, 1, 50)
    torch.testing.assert_close(logits[:, 0], full[:, -1])


def test_loss_is_cross_entropy_and_ignores_minus_one():
    model = small_model()
    idx = torch.randint(0, 50, (2, 8))
    targets = idx.roll(-1, dims=1)
    targets[:, -3:] = -1
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, :-3].reshape(-1, 50), targets[:, :-3].reshape(-1))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=10), dict(top_p=0.8),
                                      dict(temperature=0.0)])
def test_kv_cache_generation_equals_recompute(sampling):
    model = small_model()
    prompt = torch.randint(0, 50, (2, 5))
    outputs = []
    for use_kv_cache in (True, False):
        generator = torch.Generator().manual_seed(42)
        outputs.append(model.generate(prompt, 40, generator=generator, use_kv_cache=use_kv_cache, **sampling))
    assert outputs[0].shape == (2, 45)  # 40 new tokens: more than twice the block size of 16
    assert torch.equal(outputs[0], outputs[1])


def test_prompt_longer_than_block_size_is_cropped_and_generation_continues():
    model = small_model()
    prompt = torch.randint(0, 50, (1, 40))
    out = model.generate(prompt, 5, temperature=0.0)
    # Greedy continuation depends only on the last block_size tokens of the prompt.
    out_cropped = model.generate(prompt[:, -16:], 5, temperature=0.0)
    assert torch.equal(out[:, 40:], out_cropped[:, 16:])


def test_cached_decoding_matches_full_forward_logits():
    model = small_model()
    idx = torch.randint(0, 50, (2, 12))
    full_logits, _ = model(idx, targets=idx)  # (B, T, V)
    cache = KVCache(model.config, batch_size=2)
    model(idx[:, :5], cache=cache)
    for t in range(5, 12):
        step_logits, _ = model(idx[:, t:t + 1], cache=cache)
        torch.testing.assert_close(step_logits[:, 0], full_logits[:, t], atol=1e-5, rtol=1e-5)


def test_crop_block_size():
    model = small_model()
    model.crop_block_size(8)
    assert model.config.block_size == 8
    assert model.transformer.wpe.weight.shape == (8, 32)
    logits, _ = model(torch.randint(0, 50, (1, 8)))
    assert logits.shape == (1, 1, 50)
    with pytest.raises(ValueError):
        model(torch.randint(0, 50, (1, 9)))


def test_optimizer_groups_decay_matrices_only():
    model = small_model()
    optimizer = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert optimizer.defaults["fused"] is True


def test_optimizer_step_matches_torch_adamw_reference():
    # Without biases: the key bias gets only rounding noise as gradient (softmax ignores a shift shared by all
    # keys), which Adam blows up to full-size steps of random sign in both implementations alike.
    model = small_model(bias=False)
    reference = small_model(bias=False)
    idx = torch.randint(0, 50, (2, 8))
    ours = model.configure_optimizer(0.1, 1e-2, (0.9, 0.95), "cpu")
    theirs = torch.optim.AdamW(
        [{"params": [p for p in reference.parameters() if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in reference.parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95), foreach=False,
    )
    for m, opt in ((model, ours), (reference, theirs)):
        for _ in range(3):
            _, loss = m.train()(idx, idx)
            loss.backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    draws = {sample_next_token(logits, 1.0, 2, None, generator).item() for _ in range(200)}
    assert draws == {0, 1}
    draws = {sample_next_token(logits, 1.0, None, 0.85, generator).item() for _ in range(300)}
    assert draws == {0, 1, 2}  # 0.5 + 0.3 < 0.85, so the third token is needed too
    assert sample_next_token(logits, 0.0, None, None, generator).item() == 0


@pytest.mark.parametrize("options", [{}, dict(pos_emb="rope", mlp="swiglu", dropout=0.2)])
def test_activation_checkpointing_gives_the_same_gradients(options):
    """Recomputing each block in backward (torch.utils.checkpoint, non-reentrant) changes memory, not results:
    the loss and every gradient equal the plain model's, dropout included (its RNG state is replayed)."""
    grads = []
    for checkpointing in (False, True):
        model = small_model(**options).train()
        model.checkpoint_blocks = checkpointing
        torch.manual_seed(1)
        idx = torch.randint(0, 50, (2, 16))
        loss = model(idx, idx)[1]
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_activation_checkpointing_is_a_config_key(tiny_config):
    from gptrain.train import Trainer

    assert Trainer(tiny_config(activation_checkpointing=True)).model.checkpoint_blocks
    assert not Trainer(tiny_config()).model.checkpoint_blocks
