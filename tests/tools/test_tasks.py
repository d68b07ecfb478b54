"""gptrain eval --tasks: a checkpoint as an lm-evaluation-harness model, on local task files (multiple choice,
generation, perplexity), offline. Its log-likelihoods against the model's own forward pass computed by hand, and
against lm-eval's own Hugging Face backend (HFLM) on export-hf of the same model: request by request and as task
scores. Bad inputs are one error line."""

import json
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
from conftest import SHAKESPEARE, prepare_text, run_cli  # noqa: E402
from hf_tokenizers import build_tokenizer_folder  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from test_bad_input import expect_error  # noqa: E402

from gptrain.checkpoint import find_checkpoint, save_checkpoint  # noqa: E402
from gptrain.cli import main, run_guarded  # noqa: E402
from gptrain.commands.export_hf import export_hf  # noqa: E402
from gptrain.model import GPT, GPTConfig  # noqa: E402
from gptrain.tasks import load_lm  # noqa: E402

LINES = SHAKESPEARE.read_text(encoding="utf-8")[:3000].split("\n")
QUESTIONS = [  # multiple choice in the characters of Tiny Shakespeare
    {"question": "ROMEO: But soft, what light through yonder window", "choices": ["breaks?", "eats?", "sings?"],
     "label": 0},
    {"question": "JULIET: O Romeo, Romeo, wherefore art thou", "choices": ["Romeo?", "a fish?", "late?"], "label": 0},
    {"question": LINES[0] + " " + LINES[1] + " " + LINES[3], "choices": [LINES[4], "zzq", "Hear me."], "label": 0},
    {"question": "First Citizen:", "choices": ["We are accounted poor citizens", "qZ", "the"], "label": 0},
]
CHOICES = [(q["question"], " " + choice) for q in QUESTIONS for choice in q["choices"]]  # as lm-eval asks them
ANSWERS = [  # generation: the text up to the first newline, exact match
    {"question": "First Citizen:\nYou are all resolved rather to die than to", "answer": " famish."},
    {"question": "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the", "answer": " people."},
    {"question": "All:\nWe know't, we know't.\n\nFirst Citizen:\nLet us kill him, and we'll have corn at our own",
     "answer": " price."},
]
TASKS = {
    "choice": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
               "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
    "answer": {"output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
               "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8}, "metric_list": [{"metric": "exact_match"}]},
    "text": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{question}}",
             "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}]},
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # datasets and the Hub fail at once instead of waiting
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_task(folder, name: str, records: list[dict], **config) -> str:
    """An lm-eval task file reading `records` from a local .jsonl (datasets' json loader)."""
    import yaml

    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"task": name, "dataset_path": "json", "test_split": "test",
                                    "dataset_kwargs": {"data_files": {"test": str(data)}}, **config}))
    return str(path)


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("tasks")
    records = {"choice": QUESTIONS, "answer": ANSWERS, "text": QUESTIONS + ANSWERS}
    return {name: write_task(folder, f"demo_{name}", records[name], **config) for name, config in TASKS.items()}


def random_model(folder, tokenizer: str, block_size: int = 24):
    """An untrained model with weights wide enough that its next-token choices are not near ties."""
    meta = prepare_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], folder / "data", tokenizer)
    config = GPTConfig(block_size=block_size, vocab_size=meta["vocab_size"], n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
    save_checkpoint({"model": model.state_dict(), "model_config": asdict(config), "dataset_meta": meta},
                    folder / "ckpt.pt")
    return folder / "ckpt.pt"


@pytest.fixture(scope="module")
def gpt2_bpe(tmp_path_factory):
    """(checkpoint, its export-hf folder) of a small model with GPT-2's BPE."""
    folder = tmp_path_factory.mktemp("gpt2_bpe")
    ckpt = random_model(folder, "gpt2")
    export_hf(str(ckpt), folder / "hf")
    return ckpt, folder / "hf"


def hf_backend(folder, **options) -> HFLM:
    return HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=3, **options)


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, args, 0, ("demo", number, 1)) for number, args in enumerate(arguments)]


LONG = " ".join(LINES[:12])  # over 100 tokens of GPT-2's BPE: cut on the left to the model's 24
PAIRS = [
    ("ROMEO: But soft, what light", " through yonder window"),
    ("To be, or not to ", "be"),  # the context's space moves to the continuation
    ("First Citizen", ":"),  # one-token continuations of one context share a forward pass
    ("First Citizen", "!"),
    ("We are accounted poor", "est citizens"),  # "poorest" may merge across the boundary
    ("", "Before we proceed"),  # no context: the start token
    (LONG, " the patricians good."),
]


def assert_loglikelihoods_agree(ours, theirs, pairs):
    mine, hf = (lm.loglikelihood(requests("loglikelihood", pairs)) for lm in (ours, theirs))
    assert [greedy for _, greedy in mine] == [greedy for _, greedy in hf]
    assert [logprob for logprob, _ in mine] == pytest.approx([logprob for logprob, _ in hf], abs=1e-4)


def assert_rolling_agrees(ours, theirs, texts):
    """A text's log-likelihood sums hundreds of tokens': within 1e-4, or a millionth of it."""
    mine, hf = (lm.loglikelihood_rolling(requests("loglikelihood_rolling", texts)) for lm in (ours, theirs))
    assert mine == pytest.approx(hf, rel=1e-6, abs=1e-4)


def test_loglikelihoods_and_generations_equal_lm_evals_hf_backend_on_the_export(gpt2_bpe):
    ckpt, export = gpt2_bpe
    ours, theirs = load_lm(ckpt, "cpu"), hf_backend(export)
    assert_loglikelihoods_agree(ours, theirs, PAIRS + CHOICES)
    assert_rolling_agrees(ours, theirs, [(LONG,), (LINES[0],), (" ".join(LINES[:40]),)])  # up to 17 windows
    generations = requests("generate_until", [
        (LONG, {"until": ["\n"], "max_gen_toks": 10}),  # the context keeps its last 24 - 10 tokens
        ("First Citizen:", {"until": [" the", "."], "max_gen_toks": 16}),
        ("ROMEO:", {"until": ["zzz"], "max_new_tokens": 5}),
    ])
    mine = ours.generate_until(generations)
    assert mine == theirs.generate_until(generations) and all(mine)


def test_a_character_model_agrees_with_the_hf_backend_given_a_start_token(trained_run, tmp_path):
    """A character model's export has no BOS or EOS, which HFLM needs even when the context is not empty; given
    one (the newline, id 0), the log-likelihoods are the same."""
    export_hf(str(trained_run), tmp_path / "hf")
    pairs = [pair for pair in PAIRS + CHOICES if pair[0]]
    assert_loglikelihoods_agree(load_lm(find_checkpoint(trained_run), "cpu"),
                                hf_backend(tmp_path / "hf", prefix_token_id=0), pairs)


def next_token_logprob(model, context: list[int], target: int) -> float:
    logits, _ = model(torch.tensor([context]))
    return F.log_softmax(logits[0, -1].double(), dim=-1)[target].item()


@torch.no_grad()
def test_loglikelihoods_and_generations_by_hand(trained_run):
    """Each continuation token scored from the tokens before it within the last block_size + 1; greedy
    generation from the context's last block_size - max_gen_toks tokens, cut at the first `until`."""
    lm = load_lm(find_checkpoint(trained_run), "cpu")
    T, encode = lm.block_size, lm.tokenizer.encode
    assert len(encode(CHOICES[6][0])) > T  # a context cut on the left
    by_hand = []
    for context, continuation in CHOICES:
        tokens = encode(context + continuation)
        first = max(0, len(tokens) - (T + 1))
        by_hand.append(sum(next_token_logprob(lm.model, tokens[first:p], tokens[p])
                           for p in range(len(encode(context)), len(tokens))))
    scores = lm.loglikelihood(requests("loglikelihood", CHOICES))
    assert [logprob for logprob, _ in scores] == pytest.approx(by_hand, rel=1e-5)
    context = ANSWERS[2]["question"]
    ids = torch.tensor([encode(context)[-(T - 6):]])
    text = lm.tokenizer.decode(lm.model.generate(ids, 6, temperature=0.0)[0, ids.shape[1]:].tolist())
    stop = text[2]  # a stop string the greedy text holds
    generated = lm.generate_until(requests("generate_until", [(context, {"until": [stop], "max_gen_toks": 6}),
                                                              (context, {"until": ["@"], "max_gen_toks": 6})]))
    assert generated == [text[: text.index(stop)], text]
    lm.end_ids = frozenset(encode(text[3]))  # the model's end token: the text ends before it
    assert lm.generate_until(requests("generate_until", [(context, {"until": ["@"], "max_gen_toks": 6})])) == [
        text[: text.index(text[3])]]


def eval_tasks(capsys, *args) -> str:
    code = run_guarded(main, ["eval", *map(str, args), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_task_scores_equal_the_hf_backends(gpt2_bpe, task_files, capsys):
    """The same task files through `gptrain eval --tasks` and through lm-eval's simple_evaluate on the export."""
    ckpt, export = gpt2_bpe
    ours = json.loads(eval_tasks(capsys, "--ckpt", ckpt, "--tasks", ",".join(task_files.values()), "--json"))
    theirs = lm_eval.simple_evaluate(model=hf_backend(export), tasks=list(task_files.values()), log_samples=False,
                                     task_manager=lm_eval.tasks.TaskManager(include_defaults=False))
    assert set(ours["results"]) == {"demo_choice", "demo_answer", "demo_text"}
    for task, figures in theirs["results"].items():
        for key, value in figures.items():
            if "," in key and "stderr" not in key:
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-5), (task, key)
    assert ours["results"]["demo_text"]["bits_per_byte,none"] > 0


def test_the_table_and_json_on_a_character_model(trained_run, task_files, capsys):
    files = f"{task_files['choice']},{task_files['answer']}"
    table = eval_tasks(capsys, "--ckpt", trained_run, "--tasks", files, "--limit", "3").splitlines()
    assert table[0].endswith(" on cpu") and table[1].split() == ["task", "metric", "value", "stderr"]
    assert [line.split()[:2] for line in table[2:]] == [["demo_choice", "acc"], ["demo_choice", "acc_norm"],
                                                       ["demo_answer", "exact_match"]]
    result = json.loads(eval_tasks(capsys, "--ckpt", trained_run, "--tasks", files, "--limit", "3", "--json"))
    assert result["n-samples"]["demo_choice"] == {"original": 4, "effective": 3}
    assert 0 <= result["results"]["demo_choice"]["acc,none"] <= 1


@pytest.mark.slow
def test_a_llama_3_tokenizer_adds_its_bos_as_the_hf_backend_does(tmp_path):
    """An imported Hugging Face model with its own tokenizer, whose post-processor puts <|begin_of_text|> before
    every text: scored as lm-eval scores the original folder."""
    folder = tmp_path / "llama"
    tokenizer = build_tokenizer_folder(folder, "llama3_2")
    vocab = len(transformers.AutoTokenizer.from_pretrained(tokenizer))
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=24)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    build_tokenizer_folder(folder, "llama3_2")  # its generation_config.json, over the one save_pretrained wrote
    assert run_guarded(main, ["import-hf", str(folder), "--out", str(tmp_path / "imported")]) == 0
    ours, theirs = load_lm(find_checkpoint(tmp_path / "imported"), "cpu"), hf_backend(folder)
    assert ours.prefix == theirs.tok_encode("")[:1] == [theirs.prefix_token_id]
    assert_loglikelihoods_agree(ours, theirs, PAIRS + CHOICES)
    assert_rolling_agrees(ours, theirs, [(LONG,), ("Hello there, how are you?",)])


def test_bad_inputs_are_one_error_line(trained_run, task_files, tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("task: [unclosed\n")
    no_task = tmp_path / "no_task.yaml"
    no_task.write_text("dataset_path: json\n")
    no_data = write_task(tmp_path, "no_data", [], **TASKS["choice"])
    (tmp_path / "no_data.jsonl").unlink()
    ckpt = ["eval", "--ckpt", str(trained_run)]
    cases = [
        ([*ckpt, "--tasks", task_files["choice"], "--limit", "0"], "--limit must be a number of documents"),
        ([*ckpt, "--tasks", task_files["choice"], "--limit", "x"], "--limit: invalid int value"),
        ([*ckpt, "--limit", "3", "--text", task_files["choice"]], "--limit counts the documents of each --tasks"),
        ([*ckpt, "--tasks", task_files["choice"], "--text", task_files["choice"]], "in another call"),
        ([*ckpt, "--tasks", str(tmp_path / "missing.yaml")], "missing.yaml not found"),
        ([*ckpt, "--tasks", str(bad_yaml)], "bad.yaml: not a valid lm-eval task"),
        ([*ckpt, "--tasks", str(no_task)], "no_task.yaml: not a valid lm-eval task"),
        ([*ckpt, "--tasks", no_data], "no_data.jsonl"),
        ([*ckpt, "--tasks", task_files["text"]], "needs a token that starts a text"),
        (["eval", "--ckpt", str(tmp_path), "--tasks", task_files["choice"]], "no checkpoint in"),
    ]
    for argv, message in cases:
        expect_error(capsys, argv, message, folder=trained_run)


def test_without_lm_eval_the_error_says_how_to_install_it(trained_run, task_files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    monkeypatch.delitem(sys.modules, "gptrain.tasks")
    expect_error(capsys, ["eval", "--ckpt", str(trained_run), "--tasks", task_files["choice"]],
                 "pip install 'gptrain[eval]'", folder=trained_run)


def test_a_task_whose_data_is_not_in_the_cache_says_how_to_get_it(trained_run, tmp_path):
    """Offline, a task of the Hub's data that datasets never downloaded here (a fresh process, so that datasets
    reads HF_DATASETS_OFFLINE)."""
    hub_task = tmp_path / "hub.yaml"
    hub_task.write_text("task: hub_task\ndataset_path: gptrain-tests/not-downloaded\noutput_type: multiple_choice\n"
                        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\n")
    result = run_cli("eval", "--ckpt", str(trained_run), "--tasks", str(hub_task), "--device", "cpu")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "gptrain-tests/not-downloaded" in lines[0] and "run it once with network access" in lines[0]


@pytest.mark.slow
def test_an_unknown_task_name_is_one_error_line(trained_run, capsys):
    """lm-eval's own tasks are indexed (about 9 s) to tell a name it has from one it does not."""
    line = expect_error(capsys, ["eval", "--ckpt", str(trained_run), "--tasks", "hellaswagg"], "'hellaswagg' is "
                        "neither one of lm-eval's tasks nor a task file", folder=trained_run)
    assert "did you mean hellaswag" in line
