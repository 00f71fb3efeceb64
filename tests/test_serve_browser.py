"""The chat page in headless Chromium (Debian's chromium), against a real ``chatrl serve``.

Greedy decoding (temperature 0 in the page's settings) makes each reply predictable: the
engine, in this process, must write the same text for the same conversation.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from playwright.sync_api import expect
from servers import SERVE_KEY

from chatrl.engine import SamplingParams

pytestmark = pytest.mark.browser

IMAGE = '<img src="x" onerror="window.pwned = 1">'


def greedy(engine, messages, max_tokens):
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0)
    return engine.generate_chat([messages], params)[0]


def texts(page) -> list[str]:
    """Every message's text on the page, exactly (Playwright's matchers normalise spaces)."""
    return page.locator("#messages .text").evaluate_all("nodes => nodes.map(n => n.textContent)")


def send(page, text: str) -> None:
    page.locator("#input").fill(text)
    page.locator("#input").press("Enter")


def wait_for_reply(page, count: int) -> None:
    expect(page.locator(".message.assistant:not(.streaming)")).to_have_count(count)
    expect(page.locator("#send")).to_be_visible()


def test_chat_in_the_browser(browser, serve_url, micro_engine):
    url = serve_url
    page = browser.new_page()
    page_errors = []
    page.on("pageerror", lambda error: page_errors.append(error))
    page.goto(url)
    expect(page.locator("#input")).to_be_focused()

    # The server wants an API key: the page says so and opens its settings to take it.
    expect(page.locator("#status")).to_have_text(
        "This server needs an API key: enter it under Settings."
    )
    expect(page.locator("#api-key")).to_be_visible()
    page.locator("#api-key").fill(SERVE_KEY)
    page.locator("#api-key").blur()
    expect(page.locator("#model")).to_have_text("micro")
    expect(page.locator("#status")).to_have_text("")
    page.locator("#temperature").fill("0")
    page.locator("#max-tokens").fill("24")

    # A message with markup is shown as typed; the streamed reply is the model's greedy one.
    question = "Say <b>hi</b> & bye"
    conversation = [{"role": "user", "content": question}]
    send(page, question)
    wait_for_reply(page, 1)
    first = greedy(micro_engine, conversation, 24)
    assert texts(page) == [question, first.text]
    assert page.locator("#messages b").count() == 0

    # The conversation continues: the reply answers all of it.
    conversation += [
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "and then?"},
    ]
    send(page, "and then?")
    wait_for_reply(page, 2)
    assert texts(page) == [
        question,
        first.text,
        "and then?",
        greedy(micro_engine, conversation, 24).text,
    ]

    # New chat starts over; Stop ends a reply mid-stream and the server stops generating.
    page.locator("#new-chat").click()
    assert texts(page) == []
    page.locator("#max-tokens").fill("400")
    full = greedy(micro_engine, [{"role": "user", "content": "hello"}], 400)
    assert full.finish_reason == "length"  # long enough to be stopped
    send(page, "hello")
    page.wait_for_function(
        "() => document.querySelector('.message.assistant .text').textContent.length > 0"
    )
    expect(page.locator("#stop")).to_be_visible()  # text shows while the reply still streams
    page.locator("#stop").click()
    expect(page.locator(".message.assistant .note")).to_have_text("stopped")
    partial = texts(page)[1]
    assert 0 < len(partial) < len(full.text) and full.text.startswith(partial)
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/health").json()["queued_or_running"]:
        assert time.monotonic() < deadline, "the stopped reply is still being generated"
        time.sleep(0.05)

    # A reply that contains HTML is shown as text, never rendered.
    chunks = [{"choices": [{"index": 0, "delta": {"content": IMAGE}, "finish_reason": None}]}]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body),
    )
    send(page, "show me some HTML")
    wait_for_reply(page, 2)
    assert texts(page)[-1] == IMAGE
    assert page.locator("#messages img").count() == 0
    assert page.evaluate("window.pwned") is None
    assert page_errors == []
