"""The arena page (`/` of billion serve) and the records page (`/report`, `billion report --html`) in
a real browser: headless Chromium (Debian's `chromium` package; .ci/run installs it) driven by
Playwright, against one real `billion serve -b all` process on the tiny model, so two engines
answer in two columns. Every request the browser makes is recorded: none may leave the server."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from contextlib import contextmanager

import pytest

from tests.servers import serve_process

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("BILLION_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium)")

ENGINES = ("mlx", "torch")
# a reply that lasts: the tiny models decode a token in a few ms, and their context is 512 tokens
LONG = 440
KEY = "arena-test-key"  # the server needs an API key: the page sends the one typed in its field


def _records(folder) -> None:
    """Records of two engines for the report: bench (a chart) and finetune (a chart of its own)."""
    from billion.records.store import make_record, write_record

    for i, engine in enumerate(ENGINES):
        write_record(make_record("bench", engine, "random:tinyllama", {"dtype": "float32"},
                                 {"decode_tps": 100.0 + 50 * i, "prefill_tps": 900.0, "ttft_s": 0.05,
                                  "bandwidth_fraction": 0.3}, started=time.time()), folder)
        history = [{"step": s, "loss": 3.0 - 0.2 * s - 0.01 * i} for s in range(1, 6)]
        write_record(make_record("finetune", engine, "random:tinyllama", {"data": "sample"},
                                 {"train_loss_final": 2.0}, started=time.time(), extra={"history": history}), folder)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("records")
    _records(folder)
    return folder


@pytest.fixture(scope="module")
def server(tiny_folder, records):
    # one slot per engine and no queue: a second request to a busy engine is a 429
    folder = tiny_folder("tinyllama")
    with serve_process(folder, "--parallel", "1", "--queue-size", "0", "--results", str(records), "--api-key", KEY,
                       backend="all") as served:
        served.name = folder.name
        yield served
    assert "Traceback" not in served.output()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    """A fresh browser profile on the arena page; afterwards, every request it made went to the server."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    context.add_init_script(f"localStorage.setItem('billion.apiKey', JSON.stringify({KEY!r}))")  # typed before
    requests, errors = [], []
    context.on("request", lambda r: requests.append(r.url))
    page = context.new_page()
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_selector(".column")
    yield page
    context.close()
    assert not errors, errors
    outside = [u for u in requests if not u.startswith(server.url + "/") and not u.startswith(("blob:", "data:"))]
    assert requests and not outside, outside


def settings(page, **values) -> None:
    if not page.is_visible("#settings .grid"):
        page.click("#settings summary")
    for name, value in values.items():
        page.fill(f"#settings [name={name}]", str(value))


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def finished(page, timeout: float = 60_000) -> None:
    """Every column's request has ended (the Stop button is disabled again)."""
    page.wait_for_function("document.querySelector('#stop').disabled", timeout=timeout)


def columns(page) -> dict[str, dict]:
    """Each column's last reply: its tokens, finish, error, the metrics and the divergence mark."""
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('.column')].map(c => {
        const reply = [...c.querySelectorAll('.reply')].at(-1), metrics = [...c.querySelectorAll('.metrics')].at(-1);
        return [c.dataset.model, {
            tokens: [...reply.querySelectorAll('.tok')].map(t => t.textContent),
            text: [...reply.querySelectorAll('.tok')].map(t => t.textContent).join(''),
            marked: [...reply.querySelectorAll('.tok.diverge')].map(t => Number(t.dataset.i)),
            error: reply.querySelector('.error')?.textContent || null,
            metrics: metrics.textContent, ...metrics.dataset}];
    }))""")


# ---------------------------------------------------------------- the arena


def test_two_engines_stream_side_by_side_with_their_metrics_and_no_mark_when_equal(page, server):
    assert [c.get_attribute("data-model") for c in page.query_selector_all(".column")] == \
        [f"{server.name}@{e}" for e in ENGINES]
    settings(page, temperature=0, max_tokens=24)
    send(page, "Hello there")
    page.wait_for_selector(".tok")  # streaming: a token shows before the replies end
    finished(page)
    cols = columns(page)
    for col in cols.values():
        assert col["error"] is None and col["finish"] == "length" and int(col["count"]) == 24, col
        assert "TTFT" in col["metrics"] and "tok/s" in col["metrics"] and "24 tokens" in col["metrics"], col
        # the page's own time (Enter to the token painted) contains the server's (arrival to first token)
        assert float(col["ttft"]) >= float(col["serverTtft"]) > 0, col
    mlx, torch = cols.values()
    assert mlx["tokens"] == torch["tokens"]  # greedy, the same float32 weights: equal replies
    assert mlx["marked"] == torch["marked"] == [] and page.query_selector(".tok.diverge") is None
    assert "differs" not in mlx["metrics"] + torch["metrics"]
    # a token's probability and the alternatives the server sent (top 5)
    page.hover(".column >> nth=1 >> .tok:not(:empty) >> nth=2")
    tip = page.wait_for_selector("#tip:not([hidden])")
    assert "p = " in tip.inner_text() and len(tip.query_selector_all("tr")) == 5
    assert "%" in tip.inner_text()


def test_the_first_differing_token_is_marked_in_each_column(page):
    settings(page, temperature=1.5, max_tokens=24)  # no seed: each engine samples its own reply
    send(page, "Tell me something")
    finished(page)
    mlx, torch = columns(page).values()
    assert mlx["tokens"] != torch["tokens"]
    first = next(i for i, (a, b) in enumerate(zip(mlx["tokens"], torch["tokens"])) if a != b)
    assert mlx["marked"] == torch["marked"] == [first]
    assert mlx["tokens"][:first] == torch["tokens"][:first]
    assert f"differs from token {first + 1}" in mlx["metrics"] and f"differs from token {first + 1}" in torch["metrics"]


def test_stop_and_escape_cancel_the_requests_on_the_server_and_the_page_stays_usable(page, server):
    settings(page, temperature=0, max_tokens=LONG)
    send(page, "Count")
    page.wait_for_function("[...document.querySelectorAll('.column')].every(c => c.querySelector('.tok'))")
    page.keyboard.press("Escape")
    finished(page)
    cols = columns(page)
    stopped = [c for c in cols.values() if c["finish"] == "stopped"]
    assert stopped, cols  # a reply of 440 tokens outlasts the key press
    ids = page.evaluate("() => JSON.parse(localStorage.getItem('billion.conversations'))[0].turns[0].replies")
    for model, col in cols.items():
        if col["finish"] == "stopped":
            assert int(col["count"]) < LONG
            request_id = ids[model]["requestId"]
            deadline = time.time() + 20
            while f"request {request_id}: the client left" not in "".join(server.log):
                assert time.time() < deadline, f"the server never saw {model}'s client leave"
                time.sleep(0.05)
    # usable: the next message is answered in full, and the Stop button works as well as Escape
    settings(page, max_tokens=8)
    send(page, "Again")
    finished(page)
    assert all(c["finish"] == "length" for c in columns(page).values())
    settings(page, max_tokens=LONG)
    page.click("#new-chat")  # (this one's history would not leave room for LONG tokens)
    send(page, "Once more")
    page.wait_for_selector(".column >> nth=1 >> .tok", state="attached")
    page.click("#stop")
    finished(page)
    assert any(c["finish"] == "stopped" for c in columns(page).values())


def test_a_json_schema_set_in_the_page_gives_valid_json_in_both_columns(page):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "additionalProperties": False, "required": ["answer", "score"],
              "properties": {"answer": {"enum": ["yes", "no", "maybe"]},
                             "score": {"type": "integer", "minimum": 0, "maximum": 9}}}
    settings(page, temperature=0, max_tokens=64, schema="{not json")
    send(page, "Answer in JSON")
    assert "not valid JSON" in page.inner_text("#notice")
    assert page.query_selector(".user") is None  # nothing was sent
    settings(page, schema=json.dumps(schema))
    send(page, "Answer in JSON")
    finished(page)
    for col in columns(page).values():
        assert col["error"] is None and col["finish"] == "stop", col
        jsonschema.validate(json.loads(col["text"]), schema)


@contextmanager
def busy(server, engine: str):
    """Keeps `engine`'s only slot taken by long requests from another client until the block ends."""
    try:
        import httpx
    except ImportError:  # openai 3 depends on httpx's successor, httpx2 (the same API)
        import httpx2 as httpx

    done = threading.Event()

    def occupy():
        with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
            while not done.is_set():
                body = {"model": f"{server.name}@{engine}", "prompt": "a", "max_tokens": LONG, "ignore_eos": True,
                        "stream": True}
                with client.stream("POST", "/v1/completions", json=body) as r:
                    for _ in r.iter_bytes():
                        if done.is_set():
                            break

    threads = [threading.Thread(target=occupy, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        done.set()
        for t in threads:
            t.join(60)


def test_400_and_429_are_shown_as_messages_in_their_columns(page, server):
    settings(page, temperature=0, max_tokens=8)
    send(page, "word " * 700)  # past the tiny models' 512-token context
    finished(page)
    for col in columns(page).values():
        assert col["error"].startswith("The server refused this request: ") and "context" in col["error"], col
    with busy(server, "torch"):
        for _ in range(20):  # the other client's requests leave a gap between them now and then
            send(page, "Are you busy?")
            finished(page)
            cols = columns(page)
            if cols[f"{server.name}@torch"]["error"]:
                break
        torch, mlx = cols[f"{server.name}@torch"], cols[f"{server.name}@mlx"]
        assert torch["error"].startswith("The server is busy with other requests (429)"), torch
        assert mlx["error"] is None and mlx["finish"] == "length"  # the other engine answers
    assert "Traceback" not in page.inner_text("body")


def test_a_dropped_connection_is_shown_in_its_column(page, server):
    def drop_torch(route):  # the connection of torch's request fails as a reset socket does
        if json.loads(route.request.post_data)["model"].endswith("@torch"):
            route.abort("connectionreset")
        else:
            route.continue_()

    page.route("**/v1/chat/completions", drop_torch)
    settings(page, temperature=0, max_tokens=8)
    send(page, "Hello")
    finished(page)
    cols = columns(page)
    assert cols[f"{server.name}@torch"]["error"].startswith("The connection to the server was lost")
    assert cols[f"{server.name}@mlx"]["error"] is None and cols[f"{server.name}@mlx"]["finish"] == "length"


def test_conversations_survive_a_reload_and_can_be_renamed_exported_and_deleted(page):
    settings(page, temperature=0, max_tokens=6)
    page.fill("#prompt", "first line")
    page.press("#prompt", "Shift+Enter")  # a new line, not a send
    page.type("#prompt", "second line")
    assert page.input_value("#prompt") == "first line\nsecond line" and page.query_selector(".user") is None
    page.press("#prompt", "Enter")
    finished(page)
    page.click("#conversations li.current .rename")
    page.fill("#conversations li input", "Renamed chat")
    page.press("#conversations li input", "Enter")
    page.click("#new-chat")
    send(page, "another topic")
    finished(page)
    page.reload()
    page.wait_for_selector(".column")
    titles = page.eval_on_selector_all("#conversations .title", "els => els.map(e => e.textContent)")
    assert titles == ["another topic", "Renamed chat"]
    page.click("#conversations .title >> text=Renamed chat")
    assert page.inner_text(".column .user") == "first line\nsecond line"
    assert all(int(c["count"]) == 6 for c in columns(page).values())  # each engine's reply is kept
    assert page.is_enabled("#regenerate")
    with page.expect_download() as download:
        page.click("#export")
    exported = json.loads(open(download.value.path()).read())
    assert [c["title"] for c in exported["conversations"]] == titles
    page.click("#conversations li.current .delete")
    page.reload()
    page.wait_for_selector(".column")
    assert page.eval_on_selector_all("#conversations .title", "els => els.map(e => e.textContent)") == ["another topic"]


def test_regenerate_replaces_the_last_replies(page):
    # seeded, each reply its own: unseeded, one draw in a few dozen ends at EOS before 12 tokens on
    # the tiny model's 1,024-token vocabulary, and the test read that as a failure
    settings(page, temperature=1.5, max_tokens=12, seed=1)
    send(page, "Say anything")
    finished(page)
    before = columns(page)
    settings(page, seed=2)
    page.click("#regenerate")
    finished(page)
    after = columns(page)
    assert page.eval_on_selector_all(".column >> nth=0 >> .user", "els => els.length") == 1
    assert [c["tokens"] for c in after.values()] != [c["tokens"] for c in before.values()]
    assert all(c["finish"] == "length" for c in after.values())
    settings(page, seed="")  # the tests after this one sample unseeded


def test_the_api_key_field_opens_a_server_that_needs_one(browser, server):
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url + "/")
    notice = page.wait_for_selector("#notice:not([hidden])")
    assert "needs a valid API key" in notice.inner_text() and page.query_selector(".column") is None
    page.fill("#api-key", "wrong")
    page.press("#api-key", "Enter")
    page.wait_for_function("document.querySelector('#notice').textContent.includes('API key')")
    assert page.query_selector(".column") is None
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    page.wait_for_selector(".column")
    assert page.is_hidden("#notice")
    page.reload()  # the key is kept in the browser
    page.wait_for_selector(".column")
    context.close()


# ---------------------------------------------------------------- the records page


def _charts_drawn(page) -> list[tuple[float, float]]:
    return page.eval_on_selector_all("figure svg", "els => els.map(e => [e.getBoundingClientRect().width, "
                                                    "e.getBoundingClientRect().height])")


def _expected_charts(folder) -> int:
    from billion.records.report import CHARTS, groups
    from billion.records.store import read_records

    records = read_records([folder])
    return sum(len(groups(records, chart)) for chart in CHARTS)


def _check_report(page, folder) -> None:
    drawn = _charts_drawn(page)
    assert len(drawn) == _expected_charts(folder) == 2
    assert all(w > 100 and h > 100 for w, h in drawn), drawn
    assert len(page.query_selector_all("tr[data-model]")) == 4
    page.select_option("select[name=engine]", "torch")  # the filters: only torch's rows and charts
    visible = page.eval_on_selector_all("tr[data-model]", "els => els.filter(e => e.offsetParent).map(e => "
                                                           "e.dataset.engines)")
    assert visible == ["torch", "torch"]
    assert all(w > 100 for w, _ in _charts_drawn(page))  # both charts show torch


def test_report_page_is_served_at_report(browser, server, records):
    context = browser.new_context()
    requests = []
    context.on("request", lambda r: requests.append(r.url))
    page = context.new_page()
    page.goto(server.url + "/report")
    _check_report(page, records)
    context.close()
    assert requests == [server.url + "/report"]


def test_report_html_is_one_self_contained_file(browser, records, tmp_path):
    from click.testing import CliRunner

    from billion.cli import cli

    out = tmp_path / "report.html"
    r = CliRunner().invoke(cli, ["report", str(records), "--html", str(out)])
    assert r.exit_code == 0, r.output
    context = browser.new_context()
    requests = []
    context.on("request", lambda r: requests.append(r.url))
    page = context.new_page()
    page.goto(out.as_uri())
    _check_report(page, records)
    context.close()
    assert requests == [out.as_uri()]  # nothing fetched: no script, style, font or image from elsewhere
