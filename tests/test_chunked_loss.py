"""The head and loss a chunk of rows at a time (GPT.loss_chunk_rows, chunked_head_loss): the loss and gradients
of the whole computation, with no more than a chunk's logits at once. Under FSDP2, where it is the default, on 2
ranks: tests/optim/test_muon_distributed.py."""

import copy

import pytest
import torch
import torch.nn.functional as F

from gptrain.model import GPT, LOSS_CHUNK_ELEMENTS, GPTConfig


def tiny(**changes) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, **changes))


def batch():
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 50, (3, 16), generator=generator)
    targets = torch.randint(0, 50, (3, 16), generator=generator)
    targets[0, :5] = -1  # not counted
    return idx, targets


def loss_and_grads(model: GPT, chunk_rows: int, reduction: str = "mean", autocast: bool = False):
    model.loss_chunk_rows = chunk_rows
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits, loss = model(*batch(), loss_reduction=reduction)
    (loss / 4).backward()  # scaled, as gradient accumulation does
    grads = {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits, loss.detach(), grads


def largest_relative_difference(grads: dict, reference: dict) -> float:
    assert grads.keys() == reference.keys()
    return max(((grads[k] - reference[k]).abs().max() / reference[k].abs().max()).item() for k in reference)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("softcap", [None, 15.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_loss_and_gradients_equal_the_whole_ones_in_float32(tied, softcap, reduction):
    """7 rows at a time (48 rows: 7 chunks, the last of 6): float32 loss within 1e-6 relative, every gradient
    within 1e-6 of its tensor's largest (measured: 1-3e-7, the order of the float32 sums)."""
    model = tiny(tie_embeddings=tied, logit_softcap=softcap)
    logits, whole, expected = loss_and_grads(model, 0, reduction)
    none, chunked, grads = loss_and_grads(model, 7, reduction)
    assert logits is not None and none is None  # no whole logits to return
    assert chunked.dtype == whole.dtype == torch.float32
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    assert largest_relative_difference(grads, expected) <= 1e-6


@pytest.mark.parametrize("kind", ["autocast", "parameters"])
def test_chunked_loss_in_bfloat16_is_within_bfloat16s_own_error(kind):
    """Under bf16 autocast, or with bf16 parameters (as FSDP2's param_dtype computes): the head's weight gradient
    is summed over chunks (each rounded to bf16) instead of in one matmul. The difference stays under half of
    bf16's own error (its gradients against float32's); the loss within 1e-6."""
    reference = tiny()
    _, _, exact = loss_and_grads(reference, 0)
    model = copy.deepcopy(reference).to(torch.bfloat16) if kind == "parameters" else reference
    _, whole, expected = loss_and_grads(model, 0, autocast=kind == "autocast")
    _, chunked, grads = loss_and_grads(model, 7, autocast=kind == "autocast")
    assert chunked.item() == pytest.approx(whole.item(), abs=1e-6, rel=0)
    assert largest_relative_difference(grads, expected) <= largest_relative_difference(expected, exact) / 2


def test_no_chunk_holds_more_than_its_rows_of_logits(monkeypatch):
    """cross_entropy sees `chunk_rows` rows at a time, never the micro-batch's 48; with gradients and without."""
    model = tiny()
    seen = []
    cross_entropy = F.cross_entropy

    def recording(logits, *args, **kwargs):
        seen.append(tuple(logits.shape))
        return cross_entropy(logits, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", recording)
    loss_and_grads(model, 10)
    with torch.no_grad():
        model(*batch())
    assert seen == [(10, 50)] * 4 + [(8, 50)] + [(10, 50)] * 4 + [(8, 50)]


def test_evaluation_and_a_frozen_head_chunk_alike():
    """Without gradients (evaluation) the chunked loss is the whole one's; with the head frozen (LoRA's way)
    the other weights still get the whole loss's gradients."""
    model = tiny(tie_embeddings=False)
    with torch.no_grad():
        model.loss_chunk_rows = 0
        whole = model(*batch())[1]
        model.loss_chunk_rows = 5
        assert model(*batch())[1].item() == pytest.approx(whole.item(), rel=1e-6)
    model.lm_head.weight.requires_grad_(False)
    _, _, expected = loss_and_grads(model, 0)
    _, _, grads = loss_and_grads(model, 5)
    assert "lm_head.weight" not in grads and largest_relative_difference(grads, expected) <= 1e-6


def test_per_token_losses_are_never_chunked():
    """loss_reduction "none" (DPO's per-token log-probabilities) takes the whole path even where chunking is set."""
    model = tiny()
    model.loss_chunk_rows = 7
    logits, losses = model(*batch(), loss_reduction="none")
    assert logits is not None and losses.shape == (48,)


def test_a_model_outside_fsdp2_computes_its_loss_whole_by_default():
    """One process and DDP keep the whole loss (golden losses unchanged; the compiled model fuses it); a chunk
    of GPT-2's vocabulary holds at most 128 MiB of float32 logits."""
    model = tiny()
    assert model.loss_chunk_rows is None and model._loss_chunk_rows() == 0
    logits, _ = model(*batch())
    assert logits.shape == (3, 16, 50)
    gpt2_rows = LOSS_CHUNK_ELEMENTS // GPTConfig().padded_vocab_size
    assert gpt2_rows * 50257 * 4 <= 128 * 2**20 and gpt2_rows >= 512
