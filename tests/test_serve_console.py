"""The web console over HTTP: sign-in, CSRF, escaping of hostile strings, headers, no secrets."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from loadwarden.worker.serve.console import visible
from loadwarden.worker.serve.middleware import CONTENT_SECURITY_POLICY
from tests.safetensors_files import entry, raw_file, valid_model
from tests.serve_stack import (
    HOSTILE,
    TOKEN,
    Stack,
    models,
    no_leaked_processes,
    remember_failure,
    stack,
)

__all__ = ["models", "no_leaked_processes", "stack"]  # fixtures, imported for this module

PAGES = ["/", "/loads", "/dead-letters", "/failing-models", "/enqueue"]


@pytest.fixture
def console(stack: Stack, redis_url: str) -> Iterator[httpx.Client]:
    with stack.console() as client:
        yield client


def _csrf(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]{64})"', page.text)
    assert found, page.text
    return found.group(1)


@pytest.mark.parametrize("path", [*PAGES, "/loads/some-job", "/overview.json"])
def test_console_needs_a_session(stack: Stack, redis_url: str, path: str) -> None:
    """Without a session cookie every console page sends the visitor to the sign-in page."""
    reply = httpx.get(stack.url + path)
    assert reply.status_code == 303 and reply.headers["location"] == "/login"


def test_sign_in_takes_the_token_only(stack: Stack, redis_url: str) -> None:
    """A wrong token is refused; the right one gives an HttpOnly, SameSite=Strict cookie."""
    assert httpx.post(stack.url + "/login", data={"token": "nope"}).status_code == 401
    reply = httpx.post(stack.url + "/login", data={"token": TOKEN})
    assert reply.status_code == 303
    cookie = reply.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert TOKEN.lower() not in cookie
    forged = httpx.get(stack.url + "/", cookies={"loadwarden_session": "1.deadbeef"})
    assert forged.status_code == 303


@pytest.mark.parametrize("path", PAGES)
def test_pages_carry_security_headers_and_no_secret(console: httpx.Client, path: str) -> None:
    """Each page has the CSP and friends, and shows neither the token nor the Redis URL."""
    reply = console.get(path)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.headers["x-frame-options"] == "DENY"
    assert TOKEN not in reply.text and "redis://" not in reply.text
    assert "<script>" not in reply.text and " style=" not in reply.text  # CSP needs neither


def test_hostile_strings_are_escaped_everywhere(
    console: httpx.Client, stack: Stack, models: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Tensor names, labels, sources and errors from files and producers print as text."""
    job_id = stack.finish(models / "hostile.safetensors", {HOSTILE[0]: HOSTILE[1], "k": HOSTILE[3]})
    folder = tmp_path_factory.mktemp("hostile-source")
    bad = folder / '<img src=x onerror="alert(9)">.safetensors'
    # The error message names the tensor: a hostile name travels into the report's error.
    bad.write_bytes(raw_file({"<script>alert(8)</script>": entry("X99", [1], 0, 1)}, b"\0"))
    failed = stack.finish(bad, {"who": "<b>bold</b>"})
    bodies = [
        console.get(p).text
        for p in [
            f"/loads/{job_id}",
            f"/loads/{failed}",
            "/",
            "/loads",
            "/dead-letters",
            "/loads?label=" + HOSTILE[0],
        ]
    ]
    for body in bodies:
        for raw in ["<script>window", "<img src=x", "<b>bold", "\x07", "\x1b", "\u202e", "\x00"]:
            assert raw not in body
    page = bodies[0]
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in page
    assert "&#34;&gt;&lt;img src=x onerror=&#34;window.__pwned=2&#34;&gt;" in page
    assert "ctl\\u0007\\u001b[31mred\\u202eevil\\u0000" in page
    assert "&lt;img src=x onerror=&#34;alert(9)&#34;&gt;.safetensors" in bodies[1]
    assert "&lt;script&gt;alert(8)&lt;/script&gt;" in bodies[1]  # in the error message
    assert "<script>alert(8)" not in "".join(bodies)


def test_actions_need_the_csrf_token(console: httpx.Client, stack: Stack, models: Path) -> None:
    """Purge, retry and cancel without the form's token (or from another origin) are 403."""
    stack.finish(models / "broken.safetensors")
    for data in [{}, {"csrf": "0" * 64}]:
        assert console.post("/dead-letters/purge", data=data).status_code == 403
    csrf = _csrf(console.get("/dead-letters"))
    cross = console.post(
        "/dead-letters/purge", data={"csrf": csrf}, headers={"Origin": "http://evil.example"}
    )
    assert cross.status_code == 403
    assert "broken.safetensors" in console.get("/dead-letters").text
    assert console.post("/dead-letters/purge", data={"csrf": csrf}).status_code == 303
    assert "no dead letter" in console.get("/dead-letters").text


def test_failing_models_page_escapes_and_forgets(console: httpx.Client, stack: Stack) -> None:
    """The failure memory's page shows sources as text; Forget needs the form's token."""
    identity = "file:" + "cd" * 32
    remember_failure(stack.redis_url, identity, source='/m/<img src=x onerror="alert(9)">')
    page = console.get("/failing-models")
    assert identity in page.text and 'outcome-refused">refused</span>' in page.text
    assert "&lt;img src=x onerror=&#34;alert(9)&#34;&gt;" in page.text
    assert "<img src=x" not in page.text
    forget = {"identity": identity}
    assert console.post("/failing-models/forget", data=forget).status_code == 403
    csrf = _csrf(page)
    bad = console.post("/failing-models/forget", data={"csrf": csrf, "identity": "x"})
    assert bad.status_code == 404
    done = console.post("/failing-models/forget", data={"csrf": csrf, **forget})
    assert done.status_code == 303
    assert "no failing model" in console.get("/failing-models").text


def test_enqueue_form_runs_a_load(console: httpx.Client, stack: Stack, models: Path) -> None:
    """The enqueue form queues a load and leads to its page; a bad form shows why."""
    csrf = _csrf(console.get("/enqueue"))
    reply = console.post(
        "/enqueue",
        data={
            "csrf": csrf,
            "source": str(models / "small.safetensors"),
            "labels": "team=ops\nrun=1",
            "memory_bytes": "",
        },
    )
    assert reply.status_code == 303
    page = reply.headers["location"]
    assert page.startswith("/loads/")
    with stack.api() as api:
        done = api.get("/v1" + page, params={"wait": 30}).json()
    assert done["report"]["outcome"] == "ok" and done["report"]["labels"] == {
        "team": "ops",
        "run": "1",
    }
    bad = console.post("/enqueue", data={"csrf": csrf, "source": "x", "sha256": "nothex"})
    assert bad.status_code == 422 and "sha256" in bad.text


def test_load_page_draws_limits_on_charts(
    console: httpx.Client, stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A finished load's page shows its limits with their derivation and two SVG charts."""
    folder = tmp_path_factory.mktemp("chart-model")
    valid_model(folder / "m.safetensors", {"w": np.ones((512, 512), dtype=np.float32)})
    job_id = stack.finish(folder / "m.safetensors")
    page = console.get(f"/loads/{job_id}").text
    assert page.count('<svg class="chart') == 2
    assert page.count('class="limit"') == 2
    assert "declared_size" in page or "default" in page or "history" in page


def test_cancel_from_a_load_page(console: httpx.Client, stack: Stack, models: Path) -> None:
    """A waiting load's page offers Cancel; the posted form cancels it and it ends cancelled."""
    stack.defer("waiting-console", models / "small.safetensors")
    page = console.get("/loads/waiting-console")
    assert "deferred" in page.text and 'action="/loads/waiting-console/cancel"' in page.text
    assert console.post("/loads/waiting-console/cancel", data={}).status_code == 403
    reply = console.post("/loads/waiting-console/cancel", data={"csrf": _csrf(page)})
    assert reply.status_code == 303 and reply.headers["location"] == "/loads/waiting-console"
    with stack.api() as api:
        done = api.get("/v1/loads/waiting-console", params={"wait": 30}).json()
    assert done["report"]["outcome"] == "cancelled"
    assert 'id="outcome">cancelled<' in console.get("/loads/waiting-console").text


def test_visible_escapes_controls_but_keeps_lines() -> None:
    """Control, format and bidi characters print as escapes; newlines and tabs stay."""
    assert visible("a\nb\tc") == "a\nb\tc"
    assert visible("x\x1b[2J\u202ey\x00\r") == "x\\u001b[2J\\u202ey\\u0000\\u000d"
    assert visible(None) == "" and visible(3) == 3
