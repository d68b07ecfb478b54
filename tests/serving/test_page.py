"""The chat page at /, driven in a real headless Chromium (the system's package, through Selenium and the system's
chromedriver): it types a question, sends it, and reads the answer as it streams in, which must be the model's
greedy answer. CI installs Chromium (.ci/run); the test is skipped only where no browser is installed."""

import shutil

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("fastapi")

from live_server import LiveServer, greedy  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from test_chat import build_chat_model  # noqa: E402

from gptrain.checkpoint import find_checkpoint, load_checkpoint  # noqa: E402
from gptrain.data.jinja_chat import template_of  # noqa: E402
from gptrain.data.tokenizer import tokenizer_from_meta  # noqa: E402

pytestmark = pytest.mark.slow
BROWSER, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (BROWSER and DRIVER):
        pytest.skip("no Chromium and chromedriver installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def ask(browser, url: str, question: str) -> str:
    """Open the page, set greedy decoding, type and send the question; the answer once it has streamed in."""
    browser.get(url)
    wait = WebDriverWait(browser, 120)  # a hang detector: the answer is awaited by its "done" mark, not a time
    wait.until(lambda b: b.find_element(By.ID, "title").text != "gptrain")  # /v1/models answered
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    tokens = browser.find_element(By.ID, "max_tokens")
    tokens.clear()
    tokens.send_keys("12")
    browser.find_element(By.ID, "question").send_keys(question)
    browser.find_element(By.ID, "send").click()
    answer = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".assistant[data-done='true']"))
    return answer.get_attribute("textContent")  # as streamed in (.text would fold its whitespace)


def test_the_page_streams_a_chat_models_answer(browser, tmp_path):
    run = build_chat_model(tmp_path / "chat", block_size=64)
    tokenizer = tokenizer_from_meta(load_checkpoint(find_checkpoint(run))["dataset_meta"])
    template = template_of(tokenizer)
    ends = frozenset(t for t in range(tokenizer.vocab_size) if template.ends_answer(t))
    expected = greedy(run, template.render_prompt([{"role": "user", "content": "hello there"}]), 12, ends)
    server = LiveServer(run, name="chat")
    try:
        assert ask(browser, server.url + "/", "hello there") == expected
        assert "(chat)" in browser.find_element(By.ID, "title").text
    finally:
        server.close()


def test_the_page_continues_a_text_model(browser, trained_run):
    tokenizer = tokenizer_from_meta(load_checkpoint(find_checkpoint(trained_run))["dataset_meta"])
    expected = greedy(trained_run, tokenizer.encode("ROMEO:"), 12)
    server = LiveServer(trained_run, name="shakespeare")
    try:
        assert ask(browser, server.url + "/", "ROMEO:") == "ROMEO:" + expected
    finally:
        server.close()
