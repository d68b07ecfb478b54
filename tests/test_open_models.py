"""The whole path for the open models, with each family's tokenizer and chat template: a Qwen2.5, Qwen3 or Llama 3.2
folder made by transformers -> import-hf -> prepare chat on the model's own template -> a LoRA run -> its peft
adapter on the original model, and export-hf -> transformers' pipeline and apply_chat_template, all giving
gptrain's ids, logits and greedy text; and import -> export -> import exact, tokenizer included."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_tokenizers import auto_tokenizer, build_tokenizer_folder  # noqa: E402

from gptrain import checkpoint as ckpt_io  # noqa: E402
from gptrain.cli import main, run_guarded  # noqa: E402
from gptrain.data.tokenizer import tokenizer_from_meta  # noqa: E402

pytestmark = pytest.mark.slow
SHAPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
MODELS = {  # tokenizer family -> (config class, model class, options)
    "qwen2_5": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=12, tie_word_embeddings=True)),
    "llama3_2": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32, "rope_theta": 500000.0})),
}
CONVERSATIONS = [[{"role": "user", "content": f"What is {a} plus {b}?"},
                  {"role": "assistant", "content": f"It is {a + b}."}] for a in range(6) for b in range(4)]


def hf_folder(family: str, folder):
    """The family's tokenizer files and a random model of its architecture with 8 embedding rows more than the
    tokenizer has ids, as the published Qwen models have."""
    build_tokenizer_folder(folder, family)
    vocab = auto_tokenizer(folder).__len__() + 8
    config_class, model_class, options = MODELS[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(vocab_size=vocab, **SHAPE,
                                                                                   **options))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.3)
    generation = (folder / "generation_config.json").read_text()
    model.save_pretrained(folder)
    (folder / "generation_config.json").write_text(generation)  # the family's end tokens, not the config's default
    return model.eval()


def cli(*argv: str) -> None:
    assert run_guarded(main, list(argv)) == 0, argv


@pytest.mark.parametrize("family", list(MODELS))
def test_an_open_model_fine_tuned_on_its_template_goes_back_to_transformers_and_peft(family, tmp_path):
    original = hf_folder(family, tmp_path / "hf")
    cli("import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "base"))
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    cli("prepare", "chat", str(chats), "--tokenizer", f"from:{tmp_path / 'base'}", "--out", str(tmp_path / "data"),
        "--val_fraction", "0.25")
    (tmp_path / "lora.yaml").write_text(json.dumps({
        "init_from": f"from:{tmp_path / 'base'}", "dataset": str(tmp_path / "data"), "out_dir": str(tmp_path / "run"),
        "block_size": 128, "batch_size": 4, "lora_rank": 4, "max_iters": 6, "eval_interval": 3, "eval_iters": 2,
        "learning_rate": 3e-2, "warmup_iters": 0, "lr_decay_iters": 6, "min_lr": 3e-3, "device": "cpu",
        "dtype": "float32", "compile": False, "chat_eval_answers": 0}))
    cli("train", str(tmp_path / "lora.yaml"))
    ours, state = ckpt_io.model_from_checkpoint(tmp_path / "run" / ckpt_io.CKPT_LAST, torch.device("cpu"))
    ours.eval()
    tokenizer = tokenizer_from_meta(state["dataset_meta"])
    prompt = CONVERSATIONS[0][:1]

    # the adapter folder on the original model: PeftModel computes gptrain's logits
    reference = auto_tokenizer(tmp_path / "hf")
    ids = torch.tensor([reference.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                      return_dict=False)])
    with torch.no_grad():
        adapted = peft.PeftModel.from_pretrained(original, tmp_path / "run" / "adapter").eval()
        torch.testing.assert_close(ours(ids, ids)[0], adapted(ids).logits, rtol=1e-4, atol=1e-4)

    # export-hf: the family's class, tokenizer and template; pipeline's greedy text is gptrain's
    cli("export-hf", "--ckpt", str(tmp_path / "run" / ckpt_io.CKPT_LAST), "--out", str(tmp_path / "export"))
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(exported).__name__ == MODELS[family][1]
    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert exported_tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                  return_dict=False) == ids[0].tolist()
    with torch.no_grad():
        greedy = ours.generate(ids, 12, temperature=0.0)[0, ids.size(1):].tolist()
    ends = [at for at, token in enumerate(greedy) if token in state["dataset_meta"]["end_token_ids"]]
    answer = greedy[: ends[0]] if ends else greedy  # both stop at the model's first end token, and drop it
    # the pipeline given the conversation renders it with the exported template itself
    chat = transformers.pipeline("text-generation", model=exported, tokenizer=exported_tokenizer)(
        prompt, max_new_tokens=12, do_sample=False)
    assert chat[0]["generated_text"][-1] == {"role": "assistant", "content": tokenizer.decode(answer)}


@pytest.mark.parametrize("family", list(MODELS))
def test_import_export_import_is_exact_with_the_tokenizer(family, tmp_path):
    hf_folder(family, tmp_path / "hf")
    cli("import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "first"))
    cli("export-hf", "--ckpt", str(tmp_path / "first"), "--out", str(tmp_path / "export"))
    cli("import-hf", str(tmp_path / "export"), "--out", str(tmp_path / "second"))
    first, second = (ckpt_io.load_checkpoint(tmp_path / name / ckpt_io.CKPT_LAST) for name in ("first", "second"))
    assert first["model_config"] == second["model_config"] and first["dataset_meta"] == second["dataset_meta"]
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in first["model"])
    assert first["dataset_meta"]["vocab_size"] == first["model_config"]["vocab_size"]  # the model's rows
    assert (tmp_path / "export" / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()
