"""The operators' web console: server-rendered pages over the same client as the API.

Every page is rendered by Jinja2 with autoescaping, and every value printed
passes ``visible`` first, so control and bidi characters from files and
producers show as escapes instead of acting on the page. Actions are POSTed
forms carrying a CSRF token; with a token configured, a signed session cookie
(set by /login) is needed for every page.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Request
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import ValidationError
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from loadwarden.producer.client import Client, JobState
from loadwarden.producer.contract import LoadRequest, Outcome
from loadwarden.producer.recent import outcomes_last_hour, recent_loads
from loadwarden.worker.serve.api import (
    DEAD_LETTER_ID_PATTERN,
    IDENTITY_PATTERN,
    JOB_ID_PATTERN,
    load_status,
    matching,
)
from loadwarden.worker.serve.auth import SESSION_COOKIE, Auth
from loadwarden.worker.serve.charts import human_bytes, human_seconds, line_chart
from loadwarden.worker.serve.problems import Problem

router = APIRouter(include_in_schema=False)


#: Whitespace that only lays text out (tracebacks and messages keep their lines).
_PLAIN = frozenset(" \n\t")


def visible(value: object) -> object:
    """Strings with control and format characters (C0, C1, bidi overrides) as \\u escapes."""
    if not isinstance(value, str):
        return "" if value is None else value
    if value.isprintable():
        return value
    return "".join(
        c
        if c in _PLAIN or unicodedata.category(c) not in ("Cc", "Cf", "Zl", "Zp")
        else f"\\u{ord(c):04x}"
        for c in value
    )


templates = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    finalize=visible,
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters.update(bytes=human_bytes, seconds=human_seconds)


def _auth(request: Request) -> Auth:
    auth: Auth = request.app.state.auth
    return auth


def _client(request: Request) -> Client:
    client: Client = request.app.state.client
    return client


def _session(request: Request) -> str:
    session = _auth(request).session(request)
    if session is None:
        raise Problem(401, "sign in first", kind="unauthorized")
    return session


def _page(request: Request, name: str, http_status: int = 200, **context: Any) -> HTMLResponse:
    session = _auth(request).session(request)
    html = templates.get_template(name).render(
        csrf=_auth(request).csrf_token(session) if session else "",
        signed_in=session is not None and _auth(request).required,
        outcomes=[str(o) for o in Outcome],
        path=request.url.path,
        **context,
    )
    return HTMLResponse(html, http_status, headers={"Cache-Control": "no-store"})


def render_problem(request: Request, problem: Problem) -> Response | None:
    """Console paths show errors as pages; an unauthenticated visit goes to the sign-in page."""
    if problem.status == 401:
        return RedirectResponse("/login", 303)
    return _page(request, "error.html", problem.status, problem=problem)


async def _form(request: Request, session: str) -> dict[str, str]:
    """The POSTed form's fields (first value of each), once its CSRF token checked out."""
    origin = request.headers.get("origin")
    if origin and origin.split("://", 1)[-1] != request.headers.get("host"):
        raise Problem(403, "cross-origin form rejected", kind="csrf")
    fields = parse_qs((await request.body()).decode(errors="replace"), max_num_fields=64)
    form = {k: v[0] for k, v in fields.items()}
    if not _auth(request).csrf_ok(session, form.get("csrf", "")):
        raise Problem(403, "the form has expired: reload the page and try again", kind="csrf")
    return form


async def overview_data(client: Client) -> dict[str, Any]:
    """What the overview shows, as JSON (the page polls it to stay live)."""
    status = await client.status()
    return {
        "ready": status.ready,
        "deferred": status.deferred,
        "running": status.running,
        "dead_letters": status.dead_letters,
        "workers": [
            {
                "id": w.id,
                "hostname": w.hostname,
                "running": w.running,
                "waiting": w.waiting,
                "memory_in_use": human_bytes(w.memory_in_use_bytes),
                "memory_budget": human_bytes(w.memory_budget_bytes),
                "memory_in_use_bytes": w.memory_in_use_bytes,
                "memory_budget_bytes": w.memory_budget_bytes,
            }
            for w in status.workers
        ],
        "outcomes": await outcomes_last_hour(await client.redis()),
    }


@router.get("/", response_class=HTMLResponse)
async def overview(request: Request) -> Response:
    _session(request)
    client = _client(request)
    data = await overview_data(client)
    recent = await recent_loads(await client.redis(), count=10)
    return _page(request, "overview.html", data=data, recent=recent)


@router.get("/overview.json")
async def overview_json(request: Request) -> Response:
    _session(request)
    return JSONResponse(
        await overview_data(_client(request)), headers={"Cache-Control": "no-store"}
    )


@router.get("/loads", response_class=HTMLResponse)
async def loads(request: Request, outcome: str = "", label: str = "") -> Response:
    _session(request)
    found = matching(await recent_loads(await _client(request).redis()), outcome, label)
    return _page(request, "loads.html", loads=found[:200], outcome=outcome, label=label)


@router.get("/loads/{job_id}", response_class=HTMLResponse)
async def load_page(request: Request, job_id: str) -> Response:
    _session(request)
    if not re.fullmatch(JOB_ID_PATTERN, job_id):
        raise Problem(404, "no such job", kind="not-found")
    status = await load_status(_client(request), job_id)
    charts = []
    report = status.report
    if report is not None and report.resources is not None:
        series = report.resources.series
        limits = report.limits
        charts = [
            line_chart(
                "Memory (RSS)",
                [(s.t_s, float(s.rss_bytes)) for s in series],
                limit=float(limits.memory_bytes) if limits else None,
                limit_label="memory limit",
                fmt=human_bytes,
                css_class="chart-memory",
            ),
            line_chart(
                "CPU time",
                [(s.t_s, s.cpu_s) for s in series],
                limit=limits.cpu_seconds if limits else None,
                limit_label="CPU limit",
                fmt=human_seconds,
                css_class="chart-cpu",
            ),
        ]
    return _page(
        request,
        "load.html",
        status=status,
        report=report,
        charts=charts,
        active=status.state not in (JobState.COMPLETE, JobState.NOT_FOUND),
    )


@router.post("/loads/{job_id}/cancel")
async def cancel(request: Request, job_id: str) -> Response:
    await _form(request, _session(request))
    await _client(request).cancel(job_id)
    return RedirectResponse(f"/loads/{quote(job_id)}", 303)


@router.get("/dead-letters", response_class=HTMLResponse)
async def dead_letters(request: Request) -> Response:
    _session(request)
    letters = await _client(request).dead_letters(200)
    return _page(request, "dead.html", letters=letters)


@router.post("/dead-letters/retry")
async def retry(request: Request) -> Response:
    form = await _form(request, _session(request))
    ids = None if form.get("all") else [form.get("id", "")]
    if ids and not re.fullmatch(DEAD_LETTER_ID_PATTERN, ids[0]):
        raise Problem(404, "no such dead letter", kind="not-found")
    handles = await _client(request).retry_dead(ids)
    if len(handles) == 1:
        return RedirectResponse(f"/loads/{quote(handles[0].job_id)}", 303)
    return RedirectResponse("/dead-letters", 303)


@router.post("/dead-letters/purge")
async def purge(request: Request) -> Response:
    await _form(request, _session(request))
    await _client(request).purge_dead()
    return RedirectResponse("/dead-letters", 303)


@router.get("/failing-models", response_class=HTMLResponse)
async def failing_models(request: Request) -> Response:
    _session(request)
    models = await _client(request).failing_models()
    return _page(request, "failing.html", models=models)


@router.post("/failing-models/forget")
async def forget_failing(request: Request) -> Response:
    form = await _form(request, _session(request))
    identity = form.get("identity", "")
    if not form.get("all") and not re.fullmatch(IDENTITY_PATTERN, identity):
        raise Problem(404, "no such model identity", kind="not-found")
    await _client(request).clear_failing(None if form.get("all") else [identity])
    return RedirectResponse("/failing-models", 303)


@router.get("/enqueue", response_class=HTMLResponse)
async def enqueue_form(request: Request) -> Response:
    _session(request)
    return _page(request, "enqueue.html", form={}, errors=[])


def _request_from(form: dict[str, str]) -> LoadRequest:
    labels = {}
    for line in form.get("labels", "").splitlines():
        key, _, value = line.partition("=")
        if key.strip():
            labels[key.strip()] = value.strip()
    limits = {
        name: form[name]
        for name in ("memory_bytes", "timeout_seconds")
        if form.get(name, "").strip()
    }
    fields: dict[str, Any] = {"source": form.get("source", "").strip(), "labels": labels}
    if limits:
        fields["limits"] = limits
    for name in ("sha256", "format"):
        if form.get(name, "").strip():
            fields[name] = form[name].strip()
    return LoadRequest.model_validate(fields)


@router.post("/enqueue")
async def enqueue(request: Request) -> Response:
    form = await _form(request, _session(request))
    try:
        load = _request_from(form)
    except ValidationError as exc:
        errors = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        return _page(request, "enqueue.html", 422, form=form, errors=errors)
    handle = await _client(request).enqueue(load)
    return RedirectResponse(f"/loads/{quote(handle.job_id)}", 303)


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request) -> Response:
    return _page(request, "login.html", failed=False)


@router.post("/login")
async def login(request: Request) -> Response:
    fields = parse_qs((await request.body()).decode(errors="replace"), max_num_fields=8)
    auth = _auth(request)
    if not auth.required:
        return RedirectResponse("/", 303)
    if not auth.token_matches(fields.get("token", [""])[0].strip()):
        return _page(request, "login.html", 401, failed=True)
    response = RedirectResponse("/", 303)
    response.set_cookie(
        SESSION_COOKIE,
        auth.new_session(),
        max_age=auth.session_s,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    await _form(request, _session(request))
    response = RedirectResponse("/login", 303)
    response.delete_cookie(SESSION_COOKIE)
    return response
