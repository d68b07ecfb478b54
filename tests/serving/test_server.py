"""`gptrain serve` against real clients on loopback: the official `openai` package (streamed and not, completions
and chat, errors), 16 concurrent streaming clients, a client that leaves mid-stream, and raw HTTP for what the
client cannot send (malformed JSON)."""

import json
import threading

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from live_server import LiveServer, greedy, wait_for  # noqa: E402
from test_chat import build_chat_model  # noqa: E402

from gptrain.checkpoint import find_checkpoint, load_checkpoint  # noqa: E402
from gptrain.data.jinja_chat import template_of  # noqa: E402
from gptrain.data.tokenizer import tokenizer_from_meta  # noqa: E402

PROMPTS = ["ROMEO:", "First Citizen", "The king", "Now is the", "What, ho!", "O, ", "My lord", "And",
           "Speak", "Good morrow", "Alas", "Come", "HAMLET", "Nay", "I will", "Sir"]


@pytest.fixture(scope="module")
def text_server(trained_run):
    server = LiveServer(trained_run, name="shakespeare")
    yield server
    server.close()


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    run = build_chat_model(tmp_path_factory.mktemp("served") / "chat", block_size=64)
    server = LiveServer(run, name="chat", api_key="sesame")
    yield server, run
    server.close()


def client(server, key="unused"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def tokenizer_of(run):
    return tokenizer_from_meta(load_checkpoint(find_checkpoint(run))["dataset_meta"])


def test_models_lists_the_served_model(text_server):
    assert [m.id for m in client(text_server).models.list().data] == ["shakespeare"]


def test_completions_whole_and_streamed_are_gptrain_samples_greedy_text(text_server, trained_run):
    tokenizer = tokenizer_of(trained_run)
    expected = greedy(trained_run, tokenizer.encode("ROMEO:"), 20)
    whole = client(text_server).completions.create(model="shakespeare", prompt="ROMEO:", max_tokens=20,
                                                   temperature=0)
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (6, 20, 26)
    chunks = list(client(text_server).completions.create(model="shakespeare", prompt="ROMEO:", max_tokens=20,
                                                         temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) > 2


def test_a_stop_string_ends_the_text_before_it(text_server, trained_run):
    expected = greedy(trained_run, tokenizer_of(trained_run).encode("ROMEO:"), 20)
    stop = expected[5:7]
    for stream in (False, True):
        result = client(text_server).completions.create(model="shakespeare", prompt="ROMEO:", max_tokens=20,
                                                        temperature=0, stop=[stop, "\x00never"], stream=stream)
        chunks = list(result) if stream else [result]
        assert "".join(c.choices[0].text for c in chunks) == expected[: expected.index(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_seed_makes_sampling_repeatable(text_server):
    def sample(seed):
        return client(text_server).completions.create(model="shakespeare", prompt="The", max_tokens=15,
                                                      temperature=1.0, top_p=0.9, seed=seed).choices[0].text
    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_chat_completions_answer_through_the_template(chat_server):
    server, run = chat_server
    tokenizer = tokenizer_of(run)
    template = template_of(tokenizer)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    ends = frozenset(t for t in range(tokenizer.vocab_size) if template.ends_answer(t))
    expected = greedy(run, template.render_prompt(messages), 12, ends)
    chat = client(server, "sesame").chat.completions
    whole = chat.create(model="chat", messages=messages, max_tokens=12, temperature=0)
    assert whole.choices[0].message.content == expected and whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len(template.render_prompt(messages))
    streamed = list(chat.create(model="chat", messages=messages, max_tokens=12, temperature=0, stream=True,
                                stream_options={"include_usage": True}))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
    assert streamed[-1].usage.completion_tokens == 12


def test_without_the_key_every_api_request_is_401(chat_server):
    server, _ = chat_server
    for key in ("wrong", "unused"):
        with pytest.raises(openai.AuthenticationError) as refused:
            client(server, key).models.list()
        assert refused.value.status_code == 401 and "API key" in refused.value.body["message"]
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/").status_code == 200  # the page is static; it asks for the key


BAD_REQUESTS = {
    "unknown model": (dict(model="gpt-4", prompt="ROMEO:"), "does not exist", "model"),
    "max_tokens past the context": (dict(model="shakespeare", prompt="ROMEO:", max_tokens=27), "at most 26",
                                    "max_tokens"),
    "a prompt longer than the context": (dict(model="shakespeare", prompt="a" * 40), "the prompt is 40 tokens",
                                         "prompt"),
    "a character the model does not know": (dict(model="shakespeare", prompt="caf\u00e9"), "not in this model's",
                                            "prompt"),
    "a negative temperature": (dict(model="shakespeare", prompt="a", temperature=-1), "temperature", "temperature"),
    "top_p above 1": (dict(model="shakespeare", prompt="a", top_p=1.5), "top_p", "top_p"),
    "two choices": (dict(model="shakespeare", prompt="a", n=2), "n must be 1", "n"),
    "a prompt of numbers": (dict(model="shakespeare", prompt=[[1, 2]]), "prompt must be a string", "prompt"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_are_400_with_openais_error_and_the_server_goes_on(text_server, case):
    body, message, param = BAD_REQUESTS[case]
    with pytest.raises(openai.BadRequestError) as refused:
        client(text_server).completions.create(**body)
    error = refused.value.body
    assert refused.value.status_code == 400 and message in error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert client(text_server).completions.create(model="shakespeare", prompt="a", max_tokens=2).choices


def test_requests_the_client_cannot_send_are_400_too(text_server, chat_server):
    for payload, message in ((b"{not json", "not valid JSON"), (b"[1, 2]", "must be a JSON object")):
        response = httpx.post(text_server.url + "/v1/completions", content=payload)
        assert response.status_code == 400 and message in response.json()["error"]["message"]
    response = httpx.post(text_server.url + "/v1/chat/completions",
                          json={"model": "shakespeare", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400 and "not a chat model" in response.json()["error"]["message"]
    server, _ = chat_server
    for messages, message in (([], "non-empty list"), ([{"role": "wizard", "content": "hi"}], "role"),
                              ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "user")):
        response = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": "Bearer sesame"},
                              json={"model": "chat", "messages": messages})
        assert response.status_code == 400 and message in response.json()["error"]["message"], messages


def test_sixteen_concurrent_streaming_clients_all_get_their_own_greedy_text(text_server, trained_run):
    tokenizer = tokenizer_of(trained_run)
    expected = {prompt: greedy(trained_run, tokenizer.encode(prompt), 12) for prompt in PROMPTS}
    answers, start = {}, threading.Barrier(len(PROMPTS))

    def ask(prompt):
        start.wait()  # all at once, so they decode in one batch
        stream = client(text_server).completions.create(model="shakespeare", prompt=prompt, max_tokens=12,
                                                        temperature=0, stream=True)
        answers[prompt] = "".join(chunk.choices[0].text for chunk in stream)

    threads = [threading.Thread(target=ask, args=(prompt,)) for prompt in PROMPTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == expected


def test_a_client_that_leaves_mid_stream_frees_its_slot(text_server):
    engine = text_server.served.engine
    body = {"model": "shakespeare", "prompt": "ROMEO:", "max_tokens": 26, "temperature": 0, "stream": True}
    with httpx.stream("POST", text_server.url + "/v1/completions", json=body) as response:
        first = next(response.iter_lines())
        assert json.loads(first.removeprefix("data: "))["object"] == "text_completion"
    wait_for(lambda: engine.busy() == 0, "the left request to free its slot")
    assert len(engine.free) == engine.cache.shape[1]
    assert client(text_server).completions.create(model="shakespeare", prompt="a", max_tokens=3).choices


def test_the_command_refuses_a_busy_port_and_bad_options_with_one_line(trained_run, capsys):
    import socket

    from gptrain.cli import main, run_guarded

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for argv, message in ((["--port", port], f"cannot listen on 127.0.0.1:{port}"),
                              (["--port", "70000"], "--port must be between 0 and 65535"),
                              (["--slots", "0"], "--slots must be between 1 and 256"),
                              (["--context", "1"], "--context at least 2")):
            assert run_guarded(main, ["serve", "--ckpt", str(trained_run), *argv]) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_the_server_leaves_a_core_to_its_event_loop_unless_omp_num_threads_says(monkeypatch):
    import torch

    from gptrain.commands.serve import leave_a_core_to_the_server

    before = torch.get_num_threads()
    try:
        for threads, told, expected in ((3, None, 2), (1, None, 1), (3, "3", 3)):
            torch.set_num_threads(threads)
            if told is None:
                monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
            else:
                monkeypatch.setenv("OMP_NUM_THREADS", told)
            leave_a_core_to_the_server()
            assert torch.get_num_threads() == expected, (threads, told)
    finally:
        torch.set_num_threads(before)
