"""The HTTP API (aiohttp, in the daemon's event loop): JSON reads and token-guarded writes,
its OpenAPI description, and `/metrics` (docs/http.md).

Every endpoint is a row of `ENDPOINTS`; most run an operator operation (`kiln.daemon.ops`)
with the query string or JSON body as its fields, so the HTTP answer is the operator socket's.
The rows also make the OpenAPI description, so it cannot drift from what is served.

Safety: writes need `Authorization: Bearer TOKEN` (401 without, 403 wrong), a JSON body
(415 otherwise: a browser form cannot send one), and no foreign `Origin` (403): a page on
another site cannot steer kiln. On loopback the `Host` must be a loopback name (a DNS
rebinding page cannot read the API either). Beyond loopback reads need the token as well.
Bodies are bounded (`MAX_BODY_BYTES`); unknown fields and parameters are refused.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web

from kiln import __version__
from kiln.daemon import ops
from kiln.daemon.runner import OFF_LOOP
from kiln.ramp import caps_at, plan_providers
from kiln.web.token import matches

if TYPE_CHECKING:
    from kiln.daemon.core import Daemon

__all__ = ["ENDPOINTS", "MAX_BODY_BYTES", "HttpSettings", "make_app", "openapi"]

#: The dashboard's files: what a browser loads before it has the token (they hold no data).
STATIC = {
    "/": ("dashboard.html", "text/html"),
    "/static/dashboard.js": ("dashboard.js", "application/javascript"),
    "/static/dashboard.css": ("dashboard.css", "text/css"),
    "/static/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
#: Paths that never need the token (no data in them).
OPEN_PATHS = frozenset({"/openapi.json", "/healthz", *STATIC})
#: Largest request body read (JSON requests are small).
MAX_BODY_BYTES = 64 * 1024
#: Most decision-log entries one page returns.
MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """Where the API listens and who may read it."""

    host: str
    port: int
    token: str
    #: Listening beyond loopback (`--http-public`): reads need the token too.
    public: bool = False

    @property
    def loopback(self) -> bool:
        """Whether `host` is a loopback address."""
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


@dataclass(frozen=True, slots=True)
class Field:
    """A query parameter or body field."""

    name: str
    kind: str  # "string", "integer" or "boolean"
    help: str
    required: bool = False


Handler = Callable[["Daemon", dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One route: an operator operation (`op`) or a handler of its own."""

    method: str
    path: str
    summary: str
    op: str | None = None
    handler: Handler | None = None
    fields: tuple[Field, ...] = ()
    #: Changes kiln's state: needs the token.
    write: bool = False
    tags: tuple[str, ...] = field(default=("api",))


def _f(name: str, help_: str, kind: str = "string", required: bool = False) -> Field:
    return Field(name, kind, help_, required)


_IP = _f("ip", "a sending IP of the plan")
_PROVIDER = _f("provider", "a provider of the plan, e.g. google")


async def _decisions(d: Daemon, q: dict[str, Any]) -> dict[str, Any]:
    """A page of the decision log, oldest first, from `since_ms`."""
    limit = q.get("limit", 100)
    if not 1 <= limit <= MAX_PAGE:
        raise ops.RequestError(f"limit: must be from 1 to {MAX_PAGE}")
    fetch = functools.partial(
        d.store.decisions,
        since_ms=q.get("since_ms"),
        kind=q.get("kind"),
        subject=q.get("subject"),
        limit=MAX_PAGE * 5 if ("ip" in q or "provider" in q or "until_ms" in q) else limit,
    )
    entries = await OFF_LOOP.store(d.persist, fetch)
    out = []
    for e in entries:
        if "until_ms" in q and e.at_ms >= q["until_ms"]:
            break
        about = f"{e.subject} {json.dumps(e.evidence, sort_keys=True)}"
        if "ip" in q and q["ip"] not in about:
            continue
        if "provider" in q and q["provider"] not in about:
            continue
        out.append(
            {
                "id": e.id,
                "at_ms": e.at_ms,
                "kind": e.kind,
                "subject": e.subject,
                "action": e.action,
                "reason": e.reason,
                "evidence": e.evidence,
            }
        )
        if len(out) == limit:
            break
    return {
        "ok": True,
        "decisions": out,
        "next_since_ms": out[-1]["at_ms"] if len(out) == limit else None,
    }


async def _signals(d: Daemon, q: dict[str, Any]) -> dict[str, Any]:
    """Each configured signal source: its health, whether it is stale, and what it said."""
    del q
    now_ms = d.clock.now_ms()
    book = d.guard.signals
    stale = d.guard.policy.stale_sources(book, now_ms)
    configured = {
        name: spec
        for name, spec in (
            ("postmaster", d.plan.signals.postmaster),
            ("snds", d.plan.signals.snds),
            ("dnsbl", d.plan.signals.dnsbl),
        )
        if spec is not None
    }
    sources = []
    for name in sorted(configured.keys() | book.health.keys()):
        h = book.health.get(name)
        last_good = h.last_good_ms if h is not None else None
        sources.append(
            {
                "source": name,
                "configured": name in configured,
                "stale": name in stale,
                "last_good_ms": last_good,
                "age_s": None if last_good is None else (now_ms - last_good) / 1000,
                "last_attempt_ms": h.last_attempt_ms if h is not None else None,
                "failures": h.failures if h is not None else 0,
                "last_error": h.last_error if h is not None else None,
            }
        )
    return {
        "ok": True,
        "now_ms": now_ms,
        "sources": sources,
        "readings": {
            "spam_rate": book.spam_rate,
            "domain_reputation": book.domain_reputation,
            "ip_reputation": book.ip_reputation,
            "snds": book.snds,
            "snds_blocked": book.snds_blocked,
            "dnsbl": book.dnsbl,
        },
    }


async def _plan(d: Daemon, q: dict[str, Any]) -> dict[str, Any]:
    """The plan as loaded (after defaults), and where it came from."""
    del q
    return {"ok": True, "source": d.plan.source, "plan": d.plan.model_dump(mode="json")}


async def _routes(d: Daemon, q: dict[str, Any]) -> dict[str, Any]:
    """The MX route cache: its size, and one domain's route or a sample of them."""
    limit = q.get("limit", 100)
    if not 1 <= limit <= 10_000:
        raise ops.RequestError("limit: must be from 1 to 10000")
    (held, pinned, bound), entries = d.engine.route_table(q.get("domain"), limit)
    return {
        "ok": True,
        "routes": held,
        "plan_routes": pinned,
        "learned_routes": held - pinned,
        "max_learned_routes": bound,
        "entries": [
            {"domain": dom, "provider": p, "null_mx": p is None, "expires_ms": exp}
            for dom, p, exp in entries
        ],
    }


#: Most days one ramp history returns.
MAX_HISTORY_DAYS = 400


def _ramp_history(d: Daemon, batch: str, provider: str, days: int, today: date) -> list[Any]:
    """Per day (store thread): planned and actual cap of the ramp, what was granted and
    delivered, and the ramp's move that day (hold, step_down, advance, ...)."""
    b = d.plan.batches[batch]
    first = max(b.start_date, today - timedelta(days=days - 1))
    moves = {
        e.evidence.get("day"): e
        for e in d.store.decisions(kind="ramp", subject=f"{batch}/{provider}", limit=100_000)
    }
    step = 1
    out = []
    day = b.start_date
    while day <= today:
        move = moves.get(day.isoformat())
        if day >= first:
            planned, _ = caps_at(d.plan, batch, provider, (day - b.start_date).days + 1)
            actual, _ = caps_at(d.plan, batch, provider, step)
            counts = d.store.counts(day)
            mine = [c for (ip, p), c in counts.items() if p == provider and ip in b.ips]
            n = len(b.ips)
            out.append(
                {
                    "date": day.isoformat(),
                    "step": step,
                    "planned_cap": None if planned.daily_cap is None else planned.daily_cap * n,
                    "actual_cap": None if actual.daily_cap is None else actual.daily_cap * n,
                    "granted": sum(c.granted for c in mine),
                    "delivered": sum(c.delivered for c in mine),
                    "move": None if move is None else move.action,
                    "reason": None if move is None else move.reason,
                }
            )
        if move is not None:
            step = int(move.evidence.get("to_step", step))
        day += timedelta(days=1)
    return out


async def _ramp(d: Daemon, q: dict[str, Any]) -> dict[str, Any]:
    """One ramp against its plan, day by day (the dashboard's chart)."""
    batch, provider = q["batch"], q["provider"]
    if batch not in d.plan.batches:
        raise ops.RequestError(f"batch: unknown batch {batch!r}")
    if provider not in plan_providers(d.plan):
        raise ops.RequestError(f"provider: unknown provider {provider!r}")
    days = q.get("days", 60)
    if not 1 <= days <= MAX_HISTORY_DAYS:
        raise ops.RequestError(f"days: must be from 1 to {MAX_HISTORY_DAYS}")
    today = d.plan_day(d.clock.now_ms())
    fetch = functools.partial(_ramp_history, d, batch, provider, days, today)
    return {
        "ok": True,
        "batch": batch,
        "provider": provider,
        "days": await OFF_LOOP.store(d.persist, fetch),
    }


async def _today(d: Daemon, q: dict[str, Any]) -> dict[str, Any]:
    """Today's counts per (IP, provider), warm IPs included: where traffic went, overflow
    to warm IPs shown beside the warming ones."""
    del q
    today = d.plan_day(d.clock.now_ms())
    counts = await OFF_LOOP.store(d.persist, d.store.counts, today)
    warming = {ip for b in d.plan.batches.values() for ip in b.ips}
    rows = [
        {
            "ip": ip,
            "provider": provider,
            "warming": ip in warming,
            "granted": c.granted,
            "delivered": c.delivered,
            "deferred": c.deferred,
            "bounced": c.bounced,
            "complaints": c.complaints,
        }
        for (ip, provider), c in sorted(counts.items())
    ]
    return {"ok": True, "date": today.isoformat(), "keys": rows}


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("GET", "/api/status", "every batch x provider: step, state, caps, use", "status"),
    Endpoint(
        "GET",
        "/api/limits",
        "the caps in force for one (IP, provider or domain), use and ramp",
        "limits",
        fields=(
            _f("ip", "a sending IP of the plan", required=True),
            _PROVIDER,
            _f("domain", "a recipient domain (instead of provider)"),
        ),
    ),
    Endpoint(
        "GET",
        "/api/explain",
        "why one key has the limit it has right now",
        "explain",
        fields=(
            _f("ip", "a sending IP of the plan", required=True),
            _f("provider", "a provider of the plan", required=True),
        ),
    ),
    Endpoint(
        "GET",
        "/api/automations",
        "live automations (all=true: also those ended in the last three days)",
        "automations",
        fields=(_f("all", "include ended ones", "boolean"),),
    ),
    Endpoint(
        "GET",
        "/api/decisions",
        "the decision log, a page at a time, oldest first",
        handler=_decisions,
        fields=(
            _f("since_ms", "entries at or after this instant (Unix ms)", "integer"),
            _f("until_ms", "entries before this instant (Unix ms)", "integer"),
            _f("kind", "ramp, automation, reload, start, stop, ..."),
            _f("subject", "exactly this subject, e.g. tx-2026-12/google"),
            _IP,
            _PROVIDER,
            _f("limit", f"entries per page (1-{MAX_PAGE}, default 100)", "integer"),
        ),
    ),
    Endpoint(
        "GET", "/api/signals", "signal sources: health, staleness, readings", handler=_signals
    ),
    Endpoint("GET", "/api/plan", "the plan as loaded", handler=_plan),
    Endpoint(
        "GET",
        "/api/routes",
        "the MX route cache: size, and one domain's route or a sample",
        handler=_routes,
        fields=(
            _f("domain", "one recipient domain"),
            _f("limit", "entries in a sample (1-10000, default 100)", "integer"),
        ),
    ),
    Endpoint(
        "GET",
        "/api/ramp",
        "one ramp against its plan, day by day: planned and actual cap, volume, moves",
        handler=_ramp,
        fields=(
            _f("batch", "a batch of the plan", required=True),
            _f("provider", "a provider of the plan", required=True),
            _f("days", f"how many days back (1-{MAX_HISTORY_DAYS}, default 60)", "integer"),
        ),
    ),
    Endpoint(
        "GET",
        "/api/today",
        "today's counts per (IP, provider) as saved, warm IPs included",
        handler=_today,
    ),
    Endpoint("GET", "/api/caps", "each warming key's room per hour now (kiln render)", "caps"),
    Endpoint("GET", "/api/queue", "what waits in the release queue", "queue"),
    Endpoint("GET", "/api/stats", "protocol counters and process facts", "stats"),
    Endpoint(
        "POST",
        "/api/pause",
        "pause an IP or a batch, at one provider or all, for a while or until resumed",
        "pause",
        fields=(
            _IP,
            _f("batch", "a batch of the plan (instead of ip)"),
            _f("provider", "one provider (default: every provider)"),
            _f("for", "a duration such as 90m, 2h, 1d (default: until resumed)"),
            _f("reason", "why, for the decision log", required=True),
        ),
        write=True,
    ),
    Endpoint(
        "POST",
        "/api/resume",
        "end the live pauses of one scope",
        "resume",
        fields=(
            _IP,
            _f("batch", "a batch of the plan (instead of ip)"),
            _f("provider", "one provider (default: every provider)"),
        ),
        write=True,
    ),
    Endpoint(
        "POST",
        "/api/automations/{automation}/cancel",
        "end an automation early",
        "cancel",
        write=True,
    ),
    Endpoint("POST", "/api/reload", "re-read the plan file", "reload", write=True),
)


def _typed(f: Field, value: Any, *, from_query: bool) -> Any:
    """A parameter or field as its kind, or RequestError."""
    if f.kind == "integer":
        if from_query:
            try:
                return int(value)
            except ValueError:
                raise ops.RequestError(f"{f.name}: must be an integer") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ops.RequestError(f"{f.name}: must be an integer")
        return value
    if f.kind == "boolean":
        if from_query:
            if value in ("true", "1"):
                return True
            if value in ("false", "0"):
                return False
            raise ops.RequestError(f"{f.name}: must be true or false")
        if not isinstance(value, bool):
            raise ops.RequestError(f"{f.name}: must be true or false")
        return value
    if not isinstance(value, str):
        raise ops.RequestError(f"{f.name}: must be a string")
    return value


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, default=str))


def _error(status: int, text: str) -> web.Response:
    return _json(status, {"ok": False, "error": text})


def _route(d: Daemon, e: Endpoint) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The aiohttp handler of one endpoint."""
    known = {f.name: f for f in e.fields}

    async def handle(request: web.Request) -> web.Response:
        req: dict[str, Any] = {}
        if e.method == "GET":
            for name in request.query:
                if name not in known:
                    return _error(400, f"unknown parameter {name!r}; see /openapi.json")
                if len(request.query.getall(name)) > 1:
                    return _error(400, f"{name}: given more than once")
            try:
                req = {n: _typed(known[n], v, from_query=True) for n, v in request.query.items()}
            except ops.RequestError as err:
                return _error(400, str(err))
        else:
            body = await request.read()
            if body:
                try:
                    parsed = json.loads(body)
                except ValueError:
                    return _error(400, "the body is not JSON")
                if not isinstance(parsed, dict):
                    return _error(400, "the body must be a JSON object")
                for name in parsed:
                    if name not in known and name != "by":
                        return _error(400, f"unknown field {name!r}; see /openapi.json")
                try:
                    req = {
                        n: (_typed(known[n], v, from_query=False) if n in known else v)
                        for n, v in parsed.items()
                    }
                except ops.RequestError as err:
                    return _error(400, str(err))
            req.setdefault("by", f"http ({request.remote or 'unknown'})")
        req.update(request.match_info)
        for f in e.fields:
            if f.required and f.name not in req:
                return _error(400, f"{f.name}: missing")
        try:
            if e.handler is not None:
                reply = await e.handler(d, req)
            else:
                assert e.op is not None
                reply = await ops.OPS[e.op].answer(d, req, OFF_LOOP, d.clock.now_ms)
        except ops.RequestError as err:
            return _error(404 if str(err).startswith("no automation") else 400, str(err))
        if not reply.get("ok", False):
            error = str(reply.get("error", "refused"))
            return _error(404 if error.startswith("no automation") else 400, error)
        return _json(200, reply)

    return handle


def _allowed_hosts(s: HttpSettings, port: int) -> set[str]:
    """Host headers a loopback listener answers (anything else: a DNS rebinding page)."""
    names = {"localhost", "127.0.0.1", "[::1]", s.host if ":" not in s.host else f"[{s.host}]"}
    return names | {f"{n}:{port}" for n in names}


def _guard(s: HttpSettings, port: Callable[[], int]) -> Any:
    """The middleware that checks Host, token, Origin and content type (module docstring)."""

    @web.middleware
    async def guard(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if s.loopback and not s.public and request.host not in _allowed_hosts(s, port()):
            return _error(403, f"Host {request.host!r} is not this loopback listener")
        writing = request.method not in ("GET", "HEAD", "OPTIONS")
        open_path = request.path in OPEN_PATHS
        if writing or (s.public and not open_path):
            auth = request.headers.get("Authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else None
            if given is None:
                denied = _error(401, "this needs the token: Authorization: Bearer TOKEN")
                denied.headers["WWW-Authenticate"] = 'Bearer realm="kiln"'
                return denied
            if not matches(given, s.token):
                return _error(403, "wrong token (kiln token prints it)")
        if writing:
            origin = request.headers.get("Origin")
            if origin is not None and origin not in (
                f"http://{request.host}",
                f"https://{request.host}",
            ):
                return _error(403, f"cross-site request from {origin!r} refused")
            if request.content_type != "application/json" and request.content_length:
                return _error(415, "send the body as application/json")
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        except web.HTTPException as e:
            if e.status == 404:
                return _error(404, f"no such endpoint: {request.path}; see /openapi.json")
            if e.status == 405:
                return _error(405, f"{request.method} is not allowed on {request.path}")
            return _error(e.status, e.reason)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers.setdefault(
            "Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'"
        )
        return response

    return guard


def openapi(s: HttpSettings | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 description of `ENDPOINTS` (and /metrics)."""
    paths: dict[str, Any] = {}
    for e in ENDPOINTS:
        op: dict[str, Any] = {
            "summary": e.summary,
            "operationId": (e.op or e.path.rsplit("/", 1)[-1]) + ("" if e.method == "GET" else "_"),
            "responses": {
                "200": {"description": "done", "content": {"application/json": {}}},
                "400": {"description": "a mistake in the request (error says which)"},
            },
        }
        params = (
            [
                {
                    "name": "automation",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                    "description": "an automation id such as A12",
                }
            ]
            if "{automation}" in e.path
            else []
        )
        if e.method == "GET":
            params += [
                {
                    "name": f.name,
                    "in": "query",
                    "required": f.required,
                    "schema": {"type": f.kind},
                    "description": f.help,
                }
                for f in e.fields
            ]
        else:
            properties = {f.name: {"type": f.kind, "description": f.help} for f in e.fields}
            properties["by"] = {"type": "string", "description": "who asks (decision log)"}
            op["requestBody"] = {
                "required": bool(any(f.required for f in e.fields)),
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": properties,
                            "required": [f.name for f in e.fields if f.required],
                        }
                    }
                },
            }
            op["security"] = [{"token": []}]
            op["responses"] |= {
                "401": {"description": "no token"},
                "403": {"description": "wrong token, or a cross-site request"},
                "415": {"description": "the body is not application/json"},
            }
        if params:
            op["parameters"] = params
        if s is not None and s.public and e.method == "GET":
            op["security"] = [{"token": []}]
        paths.setdefault(e.path, {})[e.method.lower()] = op
    paths["/metrics"] = {
        "get": {
            "summary": "Prometheus metrics (text exposition format)",
            "operationId": "metrics",
            "responses": {"200": {"description": "metrics", "content": {"text/plain": {}}}},
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "kiln", "version": __version__, "description": "docs/http.md"},
        "paths": paths,
        "components": {
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
        },
    }


def make_app(d: Daemon, s: HttpSettings, port: Callable[[], int]) -> web.Application:
    """The application: every endpoint, /openapi.json, /healthz and /metrics."""
    from kiln.web.metrics import metrics_handler  # prometheus-client loads only here

    app = web.Application(middlewares=[_guard(s, port)], client_max_size=MAX_BODY_BYTES)
    for e in ENDPOINTS:
        app.router.add_route(e.method, e.path, _route(d, e))
    started = time.monotonic()

    async def described(_: web.Request) -> web.Response:
        return _json(200, openapi(s))

    async def healthz(_: web.Request) -> web.Response:
        return _json(200, {"ok": True, "uptime_s": round(time.monotonic() - started, 3)})

    files = resources.files("kiln.web") / "static"
    for path, (name, kind) in STATIC.items():
        body = (files / name).read_bytes()

        async def static(_: web.Request, body: bytes = body, kind: str = kind) -> web.Response:
            return web.Response(body=body, content_type=kind, charset="utf-8")

        app.router.add_get(path, static)
    app.router.add_get("/openapi.json", described)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_handler(d))
    return app
