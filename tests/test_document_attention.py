"""Packed documents attend through FlexAttention's block masks on a GPU: the same attention as the dense mask,
checked here on the CPU (whose FlexAttention computes the forward pass only)."""

import pytest
import torch

from gptrain.model import GPT, GPTConfig, document_block_mask, document_mask

SHAPES = {
    "gpt2": dict(n_layer=2, n_head=4, n_embd=64, block_size=160, vocab_size=97),
    "llama-gqa": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=160, vocab_size=97, pos_emb="rope",
                      norm="rmsnorm", mlp="swiglu", bias=False),
}


def packed_positions(lengths_per_row: list[list[int]]) -> torch.Tensor:
    """Each row packs documents of the given lengths, each numbered from 0."""
    return torch.tensor([[p for n in lengths for p in range(n)] for lengths in lengths_per_row])


def test_the_block_mask_allows_exactly_what_the_dense_mask_allows():
    positions = packed_positions([[40, 3, 90, 27], [160], [1] * 160])  # long, one, and one-token documents
    block_mask = document_block_mask(positions)
    dense = document_mask(positions)[:, 0]  # (B, T, T)
    for b in range(3):
        allowed = torch.tensor([[bool(block_mask.mask_mod(torch.tensor(b), torch.tensor(0), torch.tensor(q),
                                                          torch.tensor(kv)))
                                 for kv in range(0, 160, 7)] for q in range(0, 160, 5)])
        assert torch.equal(allowed, dense[b, ::5, ::7])
    # Blocks where no query may attend to any key are skipped: 512 tokens of 16-token documents in 128-blocks keep
    # one (diagonal) block of the 16, where one 512-token document keeps the 10 on or below the diagonal.
    short_documents = document_block_mask(packed_positions([[16] * 32]))
    one_document = document_block_mask(packed_positions([[512]]))
    assert short_documents.sparsity() == 75.0 and one_document.sparsity() == 37.5


@pytest.mark.parametrize("shape", SHAPES)
def test_block_masked_attention_equals_the_dense_mask(shape):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPES[shape])).eval()
    idx = torch.randint(0, 97, (3, 160))
    positions = packed_positions([[40, 3, 90, 27], [160], [17] * 9 + [7]])
    with torch.no_grad():
        model.sparse_documents = False
        dense_logits, dense_loss = model(idx, idx, positions)
        model.sparse_documents = True
        sparse_logits, sparse_loss = model(idx, idx, positions)
    assert torch.allclose(sparse_logits, dense_logits, atol=1e-5, rtol=1e-5)
    assert sparse_loss.item() == pytest.approx(dense_loss.item(), rel=1e-6)


def test_training_with_dropout_keeps_the_dense_mask_which_flex_attention_cannot_drop_out():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPES["gpt2"], dropout=0.1)).train()
    model.sparse_documents = True
    idx = torch.randint(0, 97, (1, 160))
    _, loss = model(idx, idx, packed_positions([[40, 3, 90, 27]]))
    loss.backward()  # FlexAttention has no backward pass on a CPU: this ran on the dense mask
    assert model.lm_head.weight.grad is not None


@pytest.mark.slow
def test_compiled_block_masked_attention_equals_the_dense_mask():
    # The GPU runs compiled: the block mask is built inside the graph and FlexAttention compiled with it.
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPES["llama-gqa"])).eval()
    idx = torch.randint(0, 97, (3, 160))
    positions = packed_positions([[40, 3, 90, 27], [160], [17] * 9 + [7]])
    with torch.no_grad():
        model.sparse_documents = False
        dense_logits, _ = model(idx, idx, positions)
        model.sparse_documents = True
        sparse_logits, _ = torch.compile(model)(idx, idx, positions)
    assert torch.allclose(sparse_logits, dense_logits, atol=1e-5, rtol=1e-5)
