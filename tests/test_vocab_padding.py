"""Vocabulary padding: the embedding and head are padded to a multiple of vocab_pad_multiple, and nothing else
sees the padding: not the loss, not sampling, not gptrain grads, not Hugging Face exports."""

import pytest
import torch
from hf_tokenizers import save_with_tokenizer

from gptrain import checkpoint as ckpt_io
from gptrain.analysis.grads import gradient_rows
from gptrain.model import GPT, GPTConfig, sample_next_token
from gptrain.train import train

SHAPE = dict(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32)


def padded_and_plain():
    """The same model twice: padded to 128 rows, and unpadded with the same real weights."""
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**SHAPE, vocab_pad_multiple=1))
    padded = GPT(GPTConfig(**SHAPE, vocab_pad_multiple=64))
    state = plain.state_dict()
    for name in ("transformer.wte.weight", "lm_head.weight"):
        state[name] = torch.cat([state[name], torch.randn(128 - 65, 32)])  # padding rows holding noise
    padded.load_state_dict(state)
    return padded, plain


def test_padding_rounds_up_and_leaves_the_loss_unchanged():
    padded, plain = padded_and_plain()
    assert padded.transformer.wte.weight.shape == (128, 32) and padded.lm_head.weight.shape == (128, 32)
    assert GPTConfig(vocab_size=50257).padded_vocab_size == 50304
    assert GPTConfig(vocab_size=128, vocab_pad_multiple=64).padded_vocab_size == 128
    idx = torch.randint(0, 65, (2, 16))
    logits_p, loss_p = padded(idx, idx)
    logits, loss = plain(idx, idx)
    assert logits_p.shape == logits.shape == (2, 16, 65)  # padded ids have no logit at all
    torch.testing.assert_close(loss_p, loss)  # even with noise in the padding rows
    loss_p.backward()
    assert padded.transformer.wte.weight.grad[65:].abs().max() == 0  # no gradient reaches the padding


def test_a_new_model_starts_with_zero_padding_rows():
    model = GPT(GPTConfig(**SHAPE))
    assert model.transformer.wte.weight[65:].abs().max() == 0


def test_sampling_never_picks_a_padded_id():
    padded, _ = padded_and_plain()
    padded.eval()
    generator = torch.Generator().manual_seed(0)
    out = padded.generate(torch.zeros((4, 1), dtype=torch.long), 200, temperature=5.0, top_k=None,
                          generator=generator)
    assert int(out.max()) < 65
    logits = torch.zeros(3, 65)
    assert int(sample_next_token(logits, 1.0, None, None, generator).max()) < 65


def test_grads_rows_show_the_real_vocabulary_only():
    padded, _ = padded_and_plain()
    idx = torch.randint(0, 65, (2, 16))
    padded(idx, idx)[1].backward()
    rows = {r.name: r for r in gradient_rows(padded)}
    assert rows["transformer.wte.weight"].shape == [65, 32]


def test_a_resume_keeps_the_checkpoints_padding(tiny_config, tmp_path):
    """An unpadded checkpoint loads, resumes and samples: its own padding decides, whatever vocab_pad_multiple the
    config holds now."""
    train(tiny_config(max_iters=4, eval_interval=2, vocab_pad_multiple=1))
    path = tmp_path / "run" / ckpt_io.CKPT_LAST
    model, _ = ckpt_io.model_from_checkpoint(path, torch.device("cpu"))
    assert model.config.vocab_pad_multiple == 1
    resumed = train(tiny_config(max_iters=6, eval_interval=2, init_from="resume"))  # config says 64
    assert resumed.model.transformer.wte.weight.shape[0] == resumed.model.config.vocab_size


def test_hugging_face_import_pads_and_export_slices(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gptrain.commands.export_hf import export_hf
    from gptrain.commands.import_hf import import_hf

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    reference = transformers.GPT2LMHeadModel(config).eval()
    save_with_tokenizer(reference, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    ours, _ = ckpt_io.model_from_checkpoint(tmp_path / "ours" / ckpt_io.CKPT_LAST, torch.device("cpu"))
    assert ours.transformer.wte.weight.shape[0] == 128
    idx = torch.randint(0, 100, (2, 16))
    assert (ours.eval()(idx, idx)[0] - reference(idx).logits).abs().max() < 1e-4
    export_hf(str(tmp_path / "ours"), tmp_path / "back", with_tokenizer=False)  # 100 tokens: no tokenizer
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    assert back.config.vocab_size == 100 and back.transformer.wte.weight.shape[0] == 100
    assert (back(idx).logits - reference(idx).logits).abs().max() < 1e-4
