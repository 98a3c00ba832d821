"""``loadwarden serve``'s /v1 API against a real server, a real worker and a real Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from loadwarden.worker.cli import main as cli
from loadwarden.worker.serve.config import is_loopback
from loadwarden.worker.serve.openapi import PATH as OPENAPI_PATH
from loadwarden.worker.serve.openapi import render as render_openapi
from tests.conftest import call_until
from tests.serve_stack import TOKEN, Stack, models, no_leaked_processes, remember_failure, stack

__all__ = ["models", "no_leaked_processes", "stack"]  # fixtures, imported for this module

PROBLEM = "application/problem+json"


@pytest.fixture
def api(stack: Stack, redis_url: str) -> Iterator[httpx.Client]:
    """A /v1 client over a freshly flushed database."""
    with stack.api() as client:
        yield client


def _is_problem(reply: httpx.Response, status: int) -> dict[str, object]:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == PROBLEM
    body = reply.json()
    assert body["status"] == status and body["title"] and body["detail"]
    assert "Traceback" not in reply.text
    return dict(body)


def _enqueue(api: httpx.Client, source: Path, **fields: object) -> str:
    reply = api.post("/v1/loads", json={"source": str(source), **fields})
    assert reply.status_code == 202, reply.text
    return str(reply.json()["job_id"])


def _finished(api: httpx.Client, job_id: str) -> dict[str, object]:
    reply = api.get(f"/v1/loads/{job_id}", params={"wait": 30})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["state"] == "complete", body
    return dict(body)


def test_serve_refuses_open_bind_without_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a token, serve will not listen on anything but loopback (exit 2, says why)."""
    monkeypatch.delenv("LOADWARDEN_API_TOKEN", raising=False)
    runner = CliRunner()
    args = ["serve", "--redis", "redis://127.0.0.1:1", "--port", "1"]
    for host in ["0.0.0.0", "::", "10.1.2.3", "example.com"]:
        done = runner.invoke(cli.app, [*args, "--host", host])
        assert done.exit_code == 2, done.output
        assert "without an API token" in done.output
    monkeypatch.setenv("LOADWARDEN_API_TOKEN", "short")
    done = runner.invoke(cli.app, [*args, "--host", "127.0.0.1"])
    assert done.exit_code == 2 and "at least 16" in done.output


def test_loopback_hosts_need_no_token() -> None:
    """127.0.0.0/8, ::1 and localhost count as loopback; anything else does not."""
    assert all(map(is_loopback, ["127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.2", "host.example"]))


@pytest.mark.parametrize("header", [None, "Bearer wrong-token-0123456789", f"Basic {TOKEN}"])
def test_v1_requires_the_bearer_token(stack: Stack, redis_url: str, header: str | None) -> None:
    """Every /v1 call without the right bearer token is a 401 problem with WWW-Authenticate."""
    headers = {"Authorization": header} if header else {}
    for method, path in [
        ("GET", "/v1/queue"),
        ("POST", "/v1/loads"),
        ("DELETE", "/v1/dead-letters"),
        ("DELETE", "/v1/failing-models"),
    ]:
        reply = httpx.request(method, stack.url + path, headers=headers, json={"source": "x"})
        _is_problem(reply, 401)
        assert reply.headers["www-authenticate"].startswith("Bearer")


def test_enqueue_wait_and_read_the_report(api: httpx.Client, models: Path) -> None:
    """POST /v1/loads answers 202 with the job id; GET ?wait= returns the finished report."""
    reply = api.post(
        "/v1/loads",
        json={"source": str(models / "small.safetensors"), "labels": {"team": "search"}},
    )
    assert reply.status_code == 202, reply.text
    job_id = reply.json()["job_id"]
    assert reply.headers["location"] == f"/v1/loads/{job_id}"
    body = _finished(api, job_id)
    report = body["report"]
    assert isinstance(report, dict)
    assert report["outcome"] == "ok" and report["job_id"] == job_id
    assert report["model"]["tensors"][0]["name"] == "w"
    assert report["labels"] == {"team": "search"}
    listed = api.get("/v1/loads", params={"outcome": "ok", "label": "team=search"}).json()
    assert [entry["job_id"] for entry in listed] == [job_id]
    assert api.get("/v1/loads", params={"label": "team=other"}).json() == []


def test_idempotency_key_names_one_job(api: httpx.Client, models: Path) -> None:
    """The same Idempotency-Key returns the same job; reused with another body it is a 409."""
    body = {"source": str(models / "small.safetensors")}
    first = api.post("/v1/loads", json=body, headers={"Idempotency-Key": "order-42"})
    again = api.post("/v1/loads", json=body, headers={"Idempotency-Key": "order-42"})
    assert first.status_code == again.status_code == 202
    assert first.json()["job_id"] == again.json()["job_id"]
    _finished(api, first.json()["job_id"])
    after = api.post("/v1/loads", json=body, headers={"Idempotency-Key": "order-42"})
    assert after.json()["job_id"] == first.json()["job_id"]  # still the same job, finished
    other = {**body, "labels": {"x": "y"}}
    _is_problem(api.post("/v1/loads", json=other, headers={"Idempotency-Key": "order-42"}), 409)


def test_bad_requests_are_problem_documents(api: httpx.Client, stack: Stack) -> None:
    """Malformed, unknown, oversized and out-of-range input gets a 4xx problem, never a 500."""
    _is_problem(
        api.post("/v1/loads", content=b"{not json", headers={"content-type": "application/json"}),
        422,
    )
    invalid = _is_problem(api.post("/v1/loads", json={"source": "x", "pickle": True}), 422)
    assert invalid["type"] == "/problems/invalid-request" and invalid["errors"]
    _is_problem(api.post("/v1/loads", json={"source": ""}), 422)
    _is_problem(api.get("/v1/loads/no-such-job"), 404)
    _is_problem(api.get("/v1/loads/bad%20id%3Cx%3E"), 422)
    _is_problem(api.get("/v1/loads/x", params={"wait": 3600}), 422)
    _is_problem(api.delete("/v1/loads/no-such-job"), 404)
    _is_problem(api.post("/v1/dead-letters/retry", json={}), 400)
    _is_problem(api.post("/v1/dead-letters/retry", json={"ids": ["0-1"]}), 404)
    _is_problem(api.post("/v1/dead-letters/retry", json={"ids": ["not-an-id"]}), 422)
    big = {"source": "x", "labels": {"pad": "y" * 200}, "junk": "z" * (2 << 20)}
    _is_problem(api.post("/v1/loads", json=big), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap counts the bytes
        for _ in range(40):
            yield b" " * 65536

    _is_problem(
        api.post("/v1/loads", content=chunks(), headers={"content-type": "application/json"}), 413
    )
    _is_problem(api.get("/v1/nothing-here"), 404)


def test_cancel_of_finished_and_unknown_jobs(api: httpx.Client, models: Path) -> None:
    """DELETE on a finished load is a 409, on an unknown one a 404; a queued one is cancelled."""
    job_id = _enqueue(api, models / "small.safetensors")
    _finished(api, job_id)
    _is_problem(api.delete(f"/v1/loads/{job_id}"), 409)


def test_cancel_a_deferred_load(api: httpx.Client, stack: Stack, models: Path) -> None:
    """DELETE on a waiting load answers 202 and the load ends ``cancelled``."""
    stack.defer("waiting-1", models / "small.safetensors")
    reply = api.delete("/v1/loads/waiting-1")
    assert reply.status_code == 202 and reply.json()["state"] == "deferred"
    assert _finished(api, "waiting-1")["report"]["outcome"] == "cancelled"  # type: ignore[index]


def _events(reply: httpx.Response) -> Iterator[tuple[str, dict[str, object]]]:
    name = None
    for line in reply.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: ") and name:
            yield name, json.loads(line[6:])
            name = None


def test_events_follow_a_load_to_its_report(api: httpx.Client, models: Path) -> None:
    """The event stream tells started (or queued) then finished with the report, then closes."""
    job_id = _enqueue(api, models / "small.safetensors")
    with api.stream("GET", f"/v1/loads/{job_id}/events") as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        seen = list(_events(reply))
    names = [name for name, _ in seen]
    assert names[-1] == "finished" and names[0] in ("queued", "started")
    assert seen[-1][1]["outcome"] == "ok" and seen[-1][1]["job_id"] == job_id


def _open_streams(stack: Stack) -> float:
    text = httpx.get(stack.url + "/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("loadwarden_serve_event_streams "))
    return float(line.split()[1])


def test_an_event_stream_ends_when_its_client_leaves(
    api: httpx.Client, stack: Stack, models: Path
) -> None:
    """A client that leaves a stream mid-way leaves no stream (and no polling) behind."""
    stack.defer("waiting-2", models / "small.safetensors")
    assert _open_streams(stack) == 0
    with api.stream("GET", "/v1/loads/waiting-2/events") as reply:
        events = _events(reply)  # held: dropping the generator would close the response
        name, data = next(events)
        assert (name, data["state"]) == ("queued", "deferred")
        assert _open_streams(stack) == 1
    call_until(lambda: _open_streams(stack) == 0, timeout_s=5)
    _is_problem(api.get("/v1/loads/no-such-job/events"), 404)


def test_queue_workers_and_dead_letters(api: httpx.Client, models: Path) -> None:
    """A failed load shows in /v1/dead-letters; retry re-runs it; DELETE purges; queue counts."""
    call_until(lambda: api.get("/v1/workers").json(), timeout_s=15)
    worker = api.get("/v1/workers").json()[0]
    assert worker["memory_budget_bytes"] > 0
    job_id = _enqueue(api, models / "broken.safetensors")
    assert _finished(api, job_id)["report"]["outcome"] == "invalid"  # type: ignore[index]
    letters = api.get("/v1/dead-letters").json()
    assert [letter["job_id"] for letter in letters] == [job_id]
    queue = api.get("/v1/queue").json()
    assert queue["dead_letters"] == 1 and queue["workers"] == 1
    assert queue["outcomes_last_hour"]["invalid"] == 1
    retried = api.post("/v1/dead-letters/retry", json={"ids": [letters[0]["id"]]})
    assert retried.status_code == 202
    (again,) = retried.json()["job_ids"]
    assert again.startswith(job_id + "-r")
    assert _finished(api, again)["report"]["outcome"] == "invalid"  # type: ignore[index]
    call_until(lambda: len(api.get("/v1/dead-letters").json()) == 1)
    assert api.delete("/v1/dead-letters").json() == {"purged": 1}
    assert api.get("/v1/dead-letters").json() == []


def test_failing_models_are_listed_and_cleared(api: httpx.Client, stack: Stack) -> None:
    """GET /v1/failing-models lists the failure memory; DELETE by identity (or all) clears it."""
    identity = "file:" + "ab" * 32
    remember_failure(stack.redis_url, identity)
    (held,) = api.get("/v1/failing-models").json()
    assert held["identity"] == identity and held["refused"] is True
    assert [f["error_code"] for f in held["failures"]] == ["deadline"]
    _is_problem(api.delete("/v1/failing-models/not-an-identity"), 422)
    assert api.delete(f"/v1/failing-models/{identity}").json() == {"cleared": 1}
    assert api.get("/v1/failing-models").json() == []
    remember_failure(stack.redis_url, identity)
    assert api.delete("/v1/failing-models").json() == {"cleared": 1}


def test_openapi_document_is_committed_and_served(stack: Stack) -> None:
    """The committed OpenAPI document is the generated one, and the server publishes it."""
    committed = OPENAPI_PATH.read_text()
    assert committed == render_openapi(), "stale: python -m loadwarden.worker.serve.openapi"
    served = httpx.get(stack.url + "/openapi.json").json()
    assert served == json.loads(committed)
    assert {
        "/v1/loads",
        "/v1/loads/{job_id}",
        "/v1/loads/{job_id}/events",
        "/v1/queue",
        "/v1/workers",
        "/v1/dead-letters",
        "/v1/dead-letters/retry",
    } <= set(served["paths"])


def test_metrics_count_requests_by_route(api: httpx.Client, stack: Stack) -> None:
    """/metrics counts requests and their latency by route template, not by raw path."""
    api.get("/v1/loads/some-job-id")
    text = httpx.get(stack.url + "/metrics").text
    assert (
        'loadwarden_serve_requests_total{method="GET",route="/v1/loads/{job_id}",status="404"}'
        in text
    )
    assert "loadwarden_serve_request_duration_seconds_bucket" in text
    assert "some-job-id" not in text


def test_probes_need_no_token(stack: Stack, redis_url: str) -> None:
    """/livez and /readyz answer without a token (they say nothing but ok)."""
    assert httpx.get(stack.url + "/livez").json() == {"status": "ok"}
    assert httpx.get(stack.url + "/readyz").json() == {"status": "ok"}


def _preload(api: httpx.Client, catalog: str) -> httpx.Response:
    return api.post("/v1/preloads", content=catalog, headers={"content-type": "application/toml"})


def test_preload_a_catalog_and_follow_its_progress(api: httpx.Client, models: Path) -> None:
    """POST /v1/preloads runs a TOML catalog; GET shows each entry's progress, then totals."""
    catalog = (
        f'[[model]]\nname = "small"\nsource = "{models / "small.safetensors"}"\n'
        f'[[model]]\nname = "broken"\nsource = "{models / "broken.safetensors"}"\n'
    )
    reply = _preload(api, catalog)
    assert reply.status_code == 202, reply.text
    started = reply.json()
    assert started["state"] == "running"
    assert [e["name"] for e in started["entries"]] == ["small", "broken"]

    def finished() -> dict[str, object] | None:
        progress = api.get(f"/v1/preloads/{started['id']}").json()
        return progress if progress["state"] == "finished" else None

    done = call_until(finished, timeout_s=30, interval_s=0.1)
    assert isinstance(done, dict)
    outcomes = {e["name"]: e["outcome"] for e in done["entries"]}
    assert outcomes == {"small": "ok", "broken": "invalid"}
    assert done["done"] == 2 and done["totals"]["ok"] == 1 and done["totals"]["failed"] == 1


def test_bad_catalogs_are_problem_documents(api: httpx.Client) -> None:
    """A catalog with defects, relative sources or bad TOML is a 422 listing why; no such
    preload is a 404."""
    defects = _is_problem(_preload(api, '[[model]]\nname = "x"\nsource = "rel/x.npy"\n'), 422)
    assert defects["errors"] == ["model 'x': relative source"]
    _is_problem(_preload(api, "[[model]\nname = "), 422)
    listed = _is_problem(_preload(api, '[[model]]\nname = "x"\nsha256 = "no"\n'), 422)
    assert listed["errors"]
    _is_problem(_preload(api, ""), 422)
    _is_problem(api.get("/v1/preloads/" + "0" * 32), 404)
