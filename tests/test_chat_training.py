"""Training on conversations: the loss counts the assistant's tokens only, packed conversations do not see each
other, accumulation weighs every counted token alike, a base model gains the chat tokens, and evaluation reports
exact matches."""

import copy

import pytest
import torch
import torch.nn.functional as F
from chat_data import CHAT_BLOCK
from conftest import TINY, first_step_gradients, metrics_rows

from gptrain.checkpoint import load_checkpoint
from gptrain.config import build_config
from gptrain.data.chat_batches import IGNORE
from gptrain.errors import UserError
from gptrain.exact_match import Question, answers, last_answer
from gptrain.model import GPT, GPTConfig
from gptrain.runtime.rng import TRAIN_STREAM
from gptrain.train import Trainer, train

CHAT = dict(TINY, block_size=CHAT_BLOCK, batch_size=4, eval_iters=2, chat_eval_answers=4)


def chat_config(dataset, out_dir, **overrides):
    return build_config({**CHAT, "dataset": str(dataset), "out_dir": str(out_dir), **overrides})


def tiny_gpt(**options) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=40, n_layer=2, n_head=2, n_embd=16, **options)).eval()


# ----- the model: packing and masking -------------------------------------------------------------------------


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_a_packed_conversation_computes_as_if_it_were_alone(pos_emb):
    """Two conversations packed in one row: the second's logits equal its logits alone (from position 0), and do
    not change when the first's tokens do: no attention crosses from one conversation to the other."""
    model = tiny_gpt(pos_emb=pos_emb)
    first, second = torch.randint(0, 40, (1, 12)), torch.randint(0, 40, (1, 20))
    positions = torch.cat([torch.arange(12), torch.arange(20)]).unsqueeze(0)  # (1, 32)
    with torch.no_grad():
        packed = model(torch.cat([first, second], 1), torch.zeros(1, 32, dtype=torch.long), positions)[0]
        other = model(torch.cat([(first + 7) % 40, second], 1), torch.zeros(1, 32, dtype=torch.long), positions)[0]
        alone = model(second, torch.zeros(1, 20, dtype=torch.long))[0]
        first_alone = model(first, torch.zeros(1, 12, dtype=torch.long))[0]
    torch.testing.assert_close(packed[:, 12:], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, :12], first_alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other[:, 12:], packed[:, 12:], rtol=0, atol=0)


def gradients(model: GPT, x, y, positions) -> list[torch.Tensor]:
    model.zero_grad()
    model(x, y, positions, loss_reduction="sum")[1].backward()
    return [p.grad.clone() for p in model.parameters()]


def test_changing_a_non_assistant_target_leaves_the_gradient_unchanged(chat_dataset):
    """Targets come from the tokens and the mask; changing the target at a position the mask does not count (a
    user or system token) changes nothing, at a counted one it changes the gradient. The gradient also equals
    that of a cross-entropy over the counted positions alone, computed without the ignore index."""
    trainer = Trainer(chat_config(chat_dataset, "unused"))
    x, y, positions = trainer.train_batches.next_batch()
    model = trainer.model
    counted = y != IGNORE
    uncounted_at, counted_at = (~counted).nonzero()[5], counted.nonzero()[5]
    base = gradients(model, x, y, positions)
    for where, changes in ((uncounted_at, False), (counted_at, True)):
        targets = torch.where(counted, y, x.roll(-1, dims=1))  # what every target would be, unmasked
        targets[tuple(where)] = (targets[tuple(where)] + 1) % model.config.vocab_size
        masked = torch.where(counted, targets, IGNORE)
        changed = any(not torch.equal(a, b) for a, b in zip(base, gradients(model, x, masked, positions)))
        assert changed == changes
    model.zero_grad()
    logits = model(x, y, positions)[0]
    F.cross_entropy(logits[counted], y[counted], reduction="sum").backward()
    for ours, reference in zip(base, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)


# ----- the step: accumulation weighted by tokens --------------------------------------------------------------


def test_accumulation_weighs_tokens_as_one_big_batch_would(chat_dataset, tmp_path):
    """Two micro-batches of 2 rows give the gradient of the mean over every counted token of their 4 rows, which
    differs from the mean of the two micro-batches' means (their counts differ)."""
    config = chat_config(chat_dataset, tmp_path / "run", gradient_accumulation_steps=2, batch_size=2, grad_clip=0.0)
    trainer = Trainer(config)
    reference = copy.deepcopy(trainer.model)
    same_stream = trainer.make_sampler("train", TRAIN_STREAM)  # draws the batches the step will draw
    batches = [same_stream.next_batch() for _ in range(2)]
    counts = [int((y != IGNORE).sum()) for _, y, _ in batches]
    assert counts[0] != counts[1]
    ours = first_step_gradients(trainer)
    x, y, positions = (torch.cat(parts) for parts in zip(*batches))
    reference(x, y, positions)[1].backward()  # the mean over all counted tokens of the 4 rows
    for got, want in zip(ours, [p.grad for p in reference.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    reference.zero_grad()
    sum(reference(*batch)[1] / 2 for batch in batches).backward()  # the mean of means: not what a step does
    assert not all(torch.allclose(got, p.grad, rtol=1e-4, atol=1e-7) for got, p in zip(ours, reference.parameters()))


# ----- the vocabulary grows by the chat tokens ----------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_new_token_rows_start_as_the_mean_as_transformers_resize_does(tie):
    """gptrain's grow_vocab against transformers' resize_token_embeddings(mean_resizing=True), which samples the
    new rows around the old rows' mean with a covariance scaled by 1e-9: they agree to that noise."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = tiny_gpt(tie_embeddings=tie, vocab_pad_multiple=8)  # 40 ids in 40 rows: the 4 new ones need new rows
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                    tie_word_embeddings=tie))
    with torch.no_grad():
        hf.transformer.wte.weight.copy_(model.transformer.wte.weight[:40])
        hf.lm_head.weight.copy_(model.lm_head.weight[:40])
    hf.resize_token_embeddings(44, mean_resizing=True)
    old_logits = model(torch.arange(10).unsqueeze(0))[0][0, -1]
    model.grow_vocab(44)
    assert model.transformer.wte.weight.shape == (48, 16) and model.config.vocab_size == 44
    torch.testing.assert_close(model.transformer.wte.weight[:44], hf.transformer.wte.weight, rtol=0, atol=1e-4)
    torch.testing.assert_close(model.lm_head.weight[:44], hf.lm_head.weight, rtol=0, atol=1e-4)
    assert not model.transformer.wte.weight[44:].any()  # padding stays zero
    new_logits = model(torch.arange(10).unsqueeze(0))[0][0, -1]
    torch.testing.assert_close(new_logits[:40], old_logits)  # the old tokens' logits do not move
    torch.testing.assert_close(new_logits[40:], old_logits.mean().expand(4))  # each new one is the average's


def test_new_tokens_take_existing_padding_rows():
    model = tiny_gpt(vocab_pad_multiple=64)  # 40 ids in 64 rows
    model.grow_vocab(44)
    assert model.transformer.wte.weight.shape == (64, 16) and model.lm_head.weight is model.transformer.wte.weight
    assert not model.transformer.wte.weight[44:].any()


def test_fine_tuning_a_base_model_on_chat_data_adds_the_chat_tokens(chat_base, chat_dataset, tmp_path):
    base = tmp_path / "base"
    train(build_config({**CHAT, "block_size": 64, "dataset": str(chat_base), "out_dir": str(base), "max_iters": 2,
                        "eval_interval": 2}))
    tuned = train(chat_config(chat_dataset, tmp_path / "tuned", init_from=f"from:{base}", block_size=64,
                              max_iters=2, eval_interval=2, chat_eval_answers=0))
    base_vocab = load_checkpoint(base / "ckpt_last.pt")["model_config"]["vocab_size"]
    saved = load_checkpoint(tmp_path / "tuned" / "ckpt_last.pt")
    assert saved["model_config"]["vocab_size"] == base_vocab + 4 == tuned.model.config.vocab_size
    assert saved["dataset_meta"]["chat"]["first_special_id"] == base_vocab  # the template travels with the model


def test_a_base_of_another_tokenizer_is_refused(trained_run, chat_dataset, tmp_path):
    with pytest.raises(UserError, match="another character set"):
        Trainer(chat_config(chat_dataset, tmp_path / "tuned", init_from=f"from:{trained_run}", block_size=32))


# ----- evaluation: masked loss and exact match ----------------------------------------------------------------


def test_evaluation_reports_the_masked_loss_and_an_exact_match_rate(chat_dataset, tmp_path):
    train(chat_config(chat_dataset, tmp_path / "run", max_iters=2, eval_interval=2))
    evals = [row for row in metrics_rows(tmp_path / "run") if "val_loss" in row]
    assert [row["iter"] for row in evals] == [0, 2]
    assert all(0.0 <= row["val_exact_match"] <= 1.0 for row in evals)


def test_the_last_answer_is_the_last_run_of_counted_tokens():
    import numpy as np

    ids = np.arange(10)
    counted = np.array([0, 0, 1, 1, 0, 0, 0, 1, 1, 1], dtype=bool)
    assert last_answer(ids, counted) == Question(tuple(range(7)), (7, 8, 9))
    # A model's own template writes a "\n" after the end token, which the loss does not count: not the answer's.
    assert last_answer(ids, np.array([0, 0, 1, 1, 0, 0, 0, 1, 1, 0], dtype=bool)) == Question(tuple(range(7)), (7, 8))
    assert last_answer(ids, np.zeros(10, dtype=bool)) is None  # no answer at all
    assert last_answer(ids, np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=bool)) is None  # nothing before it


def test_batched_answers_equal_one_question_at_a_time():
    model = tiny_gpt()
    questions = [Question((1, 2, 3), (4, 5)), Question((6, 7, 8), (9,)), Question((1, 2), (3, 4, 5))]
    alone = [tuple(model.generate(torch.tensor([q.prompt]), len(q.answer), temperature=0.0)[0, len(q.prompt):]
                   .tolist()) for q in questions]
    assert answers(model, questions, torch.device("cpu")) == alone
