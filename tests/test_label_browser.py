"""The annotator's page in headless Chromium (Debian's chromium), against the real server."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect
from servers import label_server

from chatrl.data import Task
from chatrl.label.store import LabelStore

pytestmark = pytest.mark.browser

SCRIPT = "<script>window.pwned = 1</script>"
IMAGE = '<img src="x" onerror="window.pwned = 2">'


def test_rank_submit_and_finish_in_the_browser(browser, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'labels.db'}"
    store = LabelStore(db_url)
    question = [{"role": "user", "content": "Say something <b>bold</b>."}]
    store.import_tasks(
        [
            Task(question, ["Plain answer.", SCRIPT, IMAGE]),
            Task([{"role": "user", "content": "Second question"}], ["First", "Second"]),
        ]
    )
    token = store.add_annotator("ann")
    with label_server(db_url, tmp_path) as (url, _):
        page = browser.new_page()
        page_errors = []
        page.on("pageerror", lambda error: page_errors.append(error))
        page.goto(url)

        # Keyboard alone: the token box has the focus; type the token, Enter.
        expect(page.locator("#token")).to_be_focused()
        page.keyboard.type(token)
        page.keyboard.press("Enter")
        expect(page.locator("#progress")).to_have_text("0 ranked · 2 to go")
        expect(page.locator("#who")).to_have_text("ann")

        # Task text is shown as text, never run or parsed as HTML.
        responses = page.locator("#responses .response .text")
        expect(responses).to_have_text(["Plain answer.", SCRIPT, IMAGE])
        expect(page.locator("#conversation")).to_contain_text("<b>bold</b>")
        assert page.locator("#responses script, #responses img, #conversation b").count() == 0
        assert page.evaluate("window.pwned") is None

        # Best first: response 2, then 3 (response 1 places itself); flag 3 harmful; rewrite.
        expect(page.locator("#submit")).to_be_disabled()
        for key in ["2", "3", "h", "3", "w"]:
            page.keyboard.press(key)
        expect(page.locator("#rewrite")).to_be_focused()
        page.keyboard.type("A better reply.")
        page.keyboard.press("Escape")
        expect(page.locator("#ranking li strong")).to_have_text(
            ["Response 2", "Response 3", "Response 1"]
        )
        expect(page.locator("#submit")).to_be_enabled()
        page.keyboard.press("Enter")
        expect(page.locator("#progress")).to_have_text("1 ranked · 1 to go")

        # The mouse works too: drag response 2 above response 1, click submit.
        expect(page.locator("#conversation")).to_contain_text("Second question")
        items = page.locator("#ranking li")
        items.nth(1).drag_to(items.nth(0))
        expect(page.locator("#ranking li strong")).to_have_text(["Response 2", "Response 1"])
        page.locator("#submit").click()
        expect(page.locator("#done")).to_be_visible()
        expect(page.locator("#progress")).to_have_text("2 ranked · 0 to go")
        assert page_errors == []

    first, second = store.rankings()
    assert (first.ranking, first.annotator) == ([1, 2, 0], "ann")
    assert first.meta["flags"] == {"harmful": [2], "untruthful": []}
    assert store.demonstrations() == [
        [*question, {"role": "assistant", "content": "A better reply."}]
    ]
    assert second.ranking == [1, 0]
