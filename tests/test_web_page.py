"""The chat page at / in a real headless Chromium (Debian's `chromium`, driven by Playwright):
the page loads, a message is sent, the reply streams in token by token, and clicking a token
shows the alternatives the model weighed, with the probabilities the API reports."""

from __future__ import annotations

import json
import math
import shutil
import urllib.request

import pytest

import emergence
from emergence.serve.app import Server, serve_in_thread

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server():
    app = Server(emergence.load(), "stories260K", slots=4)
    http, _ = serve_in_thread(app)
    yield f"http://127.0.0.1:{http.server_address[1]}"
    http.shutdown()
    app.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "the test set-up installs Debian's chromium (make test)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _api_reply(base: str, text: str, max_tokens: int) -> dict:
    body = {"model": "stories260K", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "logprobs": True, "top_logprobs": 5}
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_chat_page_streams_a_reply_with_alternatives(server, browser):
    page = browser.new_page()
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'stories260K'", timeout=20_000)
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "24")
    # count how many separate DOM insertions the reply arrives in: streamed, not all at once
    page.evaluate("""() => {
        window.insertions = 0;
        new MutationObserver(ms => { for (const m of ms) window.insertions += m.addedNodes.length; })
            .observe(document.getElementById('log'), {childList: true, subtree: true});
    }""")
    page.fill("#input", "Tell me a story")
    page.click("#send")
    page.wait_for_selector(".assistant[data-done='1']", timeout=60_000)

    expected = _api_reply(server, "Tell me a story", 24)["choices"][0]
    reply = page.inner_text(".assistant").removeprefix("Model: ")
    assert page.inner_text(".user").removeprefix("You: ") == "Tell me a story"
    assert page.eval_on_selector(".assistant", "e => Array.from(e.childNodes).map(n => n.textContent).join('')") \
        == expected["message"]["content"]
    assert reply.strip() == expected["message"]["content"].strip()
    tokens = page.query_selector_all(".assistant .tok")
    assert len(tokens) == len(expected["logprobs"]["content"]) == 24
    assert page.evaluate("window.insertions") >= 24  # one insertion per streamed token
    assert "tokens in" in page.inner_text("#status")

    # the first token's alternatives: five rows, the chosen one first (greedy) and bold
    tokens[0].click()
    rows = page.query_selector_all("#alts tr")
    first = expected["logprobs"]["content"][0]
    assert len(rows) == 5
    cells = [r.query_selector_all("td") for r in rows]
    shown = [(json.loads(c[0].inner_text()), float(c[1].inner_text().rstrip("%"))) for c in cells]
    assert [t for t, _ in shown] == [alt["token"] for alt in first["top_logprobs"]]
    for (_, percent), alt in zip(shown, first["top_logprobs"]):
        assert percent == pytest.approx(100 * math.exp(alt["logprob"]), abs=0.051)
    assert rows[0].evaluate("r => r.style.fontWeight") == "600"
    page.close()


def test_page_with_api_key(browser):
    app = Server(emergence.load(), "stories260K", slots=2, api_key="sekret")
    http, _ = serve_in_thread(app)
    base = f"http://127.0.0.1:{http.server_address[1]}"
    try:
        page = browser.new_page()
        assert page.goto(base + "/").status == 200  # the page itself holds nothing: it asks for the key
        page.wait_for_function("!document.getElementById('keyform').hidden", timeout=20_000)
        assert page.inner_text("#status") == "This server needs its API key."
        page.fill("#key", "wrong")
        page.click("#keyform button")
        page.wait_for_function("document.getElementById('status').textContent !== ''", timeout=20_000)
        assert page.inner_text("#model") == "model"  # still locked out
        page.fill("#key", "sekret")
        page.click("#keyform button")
        page.wait_for_function("document.getElementById('model').textContent === 'stories260K'", timeout=20_000)
        assert page.evaluate("document.getElementById('keyform').hidden") and "sekret" not in page.url
        page.close()
    finally:
        http.shutdown()
        app.close()


def _latent(base: str, body: dict) -> dict:
    req = urllib.request.Request(base + "/v1/latent", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_latent_panel_plots_words_and_shows_the_logit_lens(server, browser):
    from emergence.latent import logit_lens

    page = browser.new_page()
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'stories260K'", timeout=20_000)
    page.fill("#words", "dog, cat, king, queen, happy")
    page.click("#plot")
    page.wait_for_function("document.querySelectorAll('#pca circle').length === 5", timeout=20_000)
    dots = page.eval_on_selector_all("#pca circle", "cs => cs.map(c => [c.dataset.word, +c.dataset.x, +c.dataset.y, "
                                                    "+c.getAttribute('cx'), +c.getAttribute('cy')])")
    expected = _latent(server, {"words": ["dog", "cat", "king", "queen", "happy"], "layer": 0})["points"]
    assert [d[0] for d in dots] == [p["word"] for p in expected]
    assert all(d[1] == pytest.approx(p["x"]) and d[2] == pytest.approx(p["y"]) for d, p in zip(dots, expected))
    # drawn to scale: the largest x is rightmost, the largest y topmost (SVG's y grows downward)
    assert max(dots, key=lambda d: d[1])[3] == max(d[3] for d in dots)
    assert max(dots, key=lambda d: d[2])[4] == min(d[4] for d in dots)

    page.fill("#temperature", "0")
    page.fill("#max_tokens", "4")
    page.fill("#input", "Once upon a time")
    page.click("#send")
    page.wait_for_function("document.getElementById('lens').dataset.prompt === 'Once upon a time'", timeout=60_000)
    rows = [[c.inner_text() for c in r.query_selector_all("td")] for r in page.query_selector_all("#lens tr")]
    lm = emergence.load()
    lens = logit_lens(lm.model, lm.tokenizer, "Once upon a time", k=3)
    assert len(rows) == len(lens) == lm.config.n_layer + 1 and rows[0][0] == "emb"
    for row, want in zip(rows, lens):
        assert [json.loads(cell.rsplit(" ", 1)[0]) for cell in row[1:]] == [t for t, _ in want.tokens]
    page.close()
