"""The web page in a real headless browser (Debian's chromium, driven by playwright): upload an
image, ask, and watch the answer stream in with the accepted draft tokens marked."""

import shutil

import pytest

from serve_helpers import image_bytes, running_server

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        pytest.skip("no Chromium on this machine: `make setup` installs Debian's chromium (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS, headless=True)
        yield b
        b.close()


def test_page_streams_an_answer_with_marked_draft_tokens(served_models, browser, tmp_path):
    # The target drafting for itself: every proposal it makes is accepted, so marks must appear.
    target, _, processor = served_models
    img = tmp_path / "photo.png"
    img.write_bytes(image_bytes(4))
    with running_server(target, target, processor) as (url, _, _):
        page = browser.new_page()
        page.goto(url + "/")
        page.set_input_files("#image", str(img))
        page.wait_for_selector("#preview:not([hidden])")
        page.fill("#question", "What is in this picture?")
        page.fill("#max-tokens", "40")
        page.click("#send")
        page.wait_for_selector("#answer[data-done]", timeout=30_000)
        assert page.locator("#answer .tok").count() > 0
        assert page.locator("#answer .tok.draft").count() > 0, "no accepted draft token was marked"
        assert page.locator("#answer .tok.target").count() > 0
        tau = float(page.text_content("#tau"))
        assert tau > 1.0
        assert int(page.text_content("#ntok")) == 40
        assert "done (length)" in page.text_content("#status")
        assert page.text_content("#answer") != ""
        page.close()


def test_page_shows_a_server_error(server, browser):
    """A refused request is said on the page (here: the max_tokens cap of the test server, 64)."""
    url, _, _ = server
    page = browser.new_page()
    page.goto(url + "/")
    page.fill("#max-tokens", "1000")
    page.click("#send")
    page.wait_for_function("document.querySelector('#status').textContent.includes('at most')", timeout=15_000)
    assert "max_tokens is 1000" in page.text_content("#status")
    page.close()


def test_page_works_with_an_api_key(served_models, browser):
    """A server with --api-key: the page shows a key box, refuses without the key and answers with it."""
    from specllava.serve.security import Security

    with running_server(*served_models, security=Security(api_keys=("sk-page",))) as (url, _, _):
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("#key-box:not([hidden])")
        page.fill("#max-tokens", "8")
        page.click("#send")
        page.wait_for_function("document.querySelector('#status').textContent.includes('API key')", timeout=15_000)
        page.fill("#api-key", "sk-page")
        page.click("#send")
        page.wait_for_selector("#answer[data-done]", timeout=30_000)
        assert int(page.text_content("#ntok")) == 8
        page.close()
