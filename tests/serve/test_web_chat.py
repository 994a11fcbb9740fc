"""The web chat at `/`, driven in headless Chromium (Debian's /usr/bin/chromium through Playwright)."""

import shutil

import pytest
import torch
from helpers import ANSWER, QUESTION, THOUGHT, overfit_chat_model, serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (scripts/setup.sh installs Debian's)")]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def test_web_chat_streams_an_answer_with_the_thinking_collapsed_and_keeps_the_conversation(browser, tokenizer):
    torch.manual_seed(0)
    with serve(overfit_chat_model(tokenizer), tokenizer, name="tiny-chat") as s:
        page = browser.new_page()
        outside = []
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(s.url)
                   else (outside.append(route.request.url), route.abort()))
        page.goto(s.url + "/")
        page.wait_for_function("document.getElementById('model').textContent.startsWith('tiny-chat')")
        # count the answer's updates as they stream in
        page.evaluate("""() => { window.updates = 0; new MutationObserver(() => window.updates++).observe(
            document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")
        page.fill("#temperature", "0")
        page.fill("#input", QUESTION)
        page.press("#input", "Enter")
        answer = page.locator(".assistant .answer").first
        page.wait_for_function("document.querySelector('.assistant .stats')?.textContent.includes('tokens')")
        assert answer.text_content() == ANSWER
        assert page.locator(".assistant details").first.get_attribute("open") is None  # collapsed
        assert page.locator(".assistant .thinking").first.text_content() == THOUGHT
        assert page.evaluate("window.updates") > 5  # streamed, not one final write
        # a second turn sends the whole conversation; a reload keeps it
        page.fill("#input", "Thanks!")
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelectorAll('.assistant .stats').length == 2 && "
                               "document.querySelectorAll('.assistant .stats')[1].textContent.includes('tokens')")
        page.reload()
        page.wait_for_selector(".msg.user")
        assert page.locator(".msg.user").all_text_contents() == [QUESTION, "Thanks!"]
        assert page.locator(".assistant .answer").first.text_content() == ANSWER
        page.click("#new-chat")
        assert page.locator(".msg").count() == 0
        assert outside == []  # nothing loaded from anywhere else: works offline
