"""The HTTP API, metrics and token (kiln.web) against a running daemon: reads match the
operator socket, writes need the token and refuse cross-site requests, the OpenAPI
description is valid and complete, bad input gets clear errors (docs/http.md)."""

from __future__ import annotations

import json
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

from daemonproc import DaemonProc, running_daemon
from kiln.cli import main
from kiln.web.api import ENDPOINTS, MAX_BODY_BYTES
from kiln.web.metrics import METRIC_NAMES
from kiln.web.token import TOKEN_FILE
from test_protocol import anytime_plan

IP = "192.0.2.10"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    """One daemon on the example plan (active all day), HTTP on a free loopback port."""
    with running_daemon(anytime_plan(tmp_path_factory.mktemp("plan"))) as d:
        yield d


@pytest.fixture(scope="module")
def api(daemon: DaemonProc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=daemon.http_url(), timeout=10) as c:
        yield c


def token(d: DaemonProc) -> str:
    return (d.state_dir / TOKEN_FILE).read_text().strip()


def auth(d: DaemonProc) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(d)}"}


def test_reads_answer_as_the_operator_socket(daemon: DaemonProc, api: httpx.Client) -> None:
    with daemon.client() as c:
        by_socket = c.request("limits", ip=IP, provider="google")
        status = c.request("status")
    r = api.get("/api/limits", params={"ip": IP, "provider": "google"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json() == by_socket
    got = api.get("/api/status").json()
    assert got["ramps"] == status["ramps"]
    for path in (
        "/api/automations",
        "/api/caps",
        "/api/queue",
        "/api/stats",
        "/api/signals",
        "/api/plan",
        "/api/routes",
        "/api/decisions",
        "/healthz",
    ):
        r = api.get(path)
        assert r.status_code == 200 and r.json()["ok"] is True, (path, r.text)
    assert api.get("/api/plan").json()["plan"]["name"] == "example"
    explained = api.get("/api/explain", params={"ip": IP, "provider": "google"}).json()
    assert explained["ip"] == IP and explained["why"]
    gmail = api.get("/api/routes", params={"domain": "GMail.com"}).json()["entries"]
    assert gmail == [
        {"domain": "gmail.com", "provider": "google", "null_mx": False, "expires_ms": None}
    ]
    assert r.headers["x-content-type-options"] == "nosniff"


def test_writes_need_the_token_and_refuse_cross_site_requests(
    daemon: DaemonProc, api: httpx.Client
) -> None:
    body = {"ip": IP, "provider": "google", "reason": "checking"}
    no_token = api.post("/api/pause", json=body)
    assert no_token.status_code == 401 and no_token.headers["www-authenticate"].startswith("Bearer")
    wrong = api.post("/api/pause", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403
    # A browser form from another site can neither set the header nor send JSON.
    form = api.post(
        "/api/pause",
        content="ip=192.0.2.10&reason=x",
        headers={**auth(daemon), "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert form.status_code == 415
    foreign = api.post(
        "/api/pause", json=body, headers={**auth(daemon), "Origin": "https://evil.example"}
    )
    assert foreign.status_code == 403 and "cross-site" in foreign.json()["error"]
    rebound = api.get("/api/status", headers={"Host": "evil.example:80"})
    assert rebound.status_code == 403
    with daemon.mta_client() as m:
        assert m.request("acquire", ip=IP, domain="gmail.com")["granted"] == 1


def test_pause_from_http_is_an_automation_that_cancel_ends(
    daemon: DaemonProc, api: httpx.Client
) -> None:
    r = api.post(
        "/api/pause",
        json={"ip": IP, "provider": "google", "for": "1h", "reason": "complaint spike"},
        headers={**auth(daemon), "Origin": str(api.base_url).rstrip("/")},
    )
    assert r.status_code == 200, r.text
    a = r.json()["automation"]
    assert a["evidence"]["by"].startswith("http (")
    with daemon.mta_client() as m:
        assert m.request("acquire", ip=IP, domain="gmail.com")["reason"] == "paused"
    live = api.get("/api/automations").json()["automations"]
    assert [x["id"] for x in live] == [a["id"]]
    metrics = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(api.get("/metrics").text)
        for s in f.samples
    }
    held = ("kiln_key_held", (("ip", IP), ("provider", "google"), ("reason", "paused")))
    assert metrics[held] == 1
    assert metrics[("kiln_automations", (("kind", "pause"),))] == 1
    denied = ("kiln_denials_total", (("ip", IP), ("provider", "google"), ("reason", "paused")))
    assert metrics[denied] >= 1
    assert metrics[("kiln_answer_seconds_count", (("listener", "native"),))] >= 1
    missing = api.post("/api/automations/A999/cancel", headers=auth(daemon))
    assert missing.status_code == 404
    done = api.post(f"/api/automations/{a['id']}/cancel", headers=auth(daemon))
    assert done.status_code == 200 and done.json()["automation"]["state"] == "cancelled"
    with daemon.mta_client() as m:
        assert m.request("acquire", ip=IP, domain="gmail.com")["granted"] == 1
    log = api.get("/api/decisions", params={"kind": "automation", "ip": IP}).json()
    assert [e["action"] for e in log["decisions"]][-2:] == ["pause:start", "pause:cancelled"]
    page = api.get("/api/decisions", params={"kind": "automation", "limit": 1}).json()
    assert len(page["decisions"]) == 1 and page["next_since_ms"] is not None
    assert api.post("/api/reload", headers=auth(daemon)).json()["ok"] is True


def test_bad_requests_get_clear_errors(daemon: DaemonProc, api: httpx.Client) -> None:
    cases: list[tuple[httpx.Response, int, str]] = [
        (api.get("/api/limits", params={"ip": IP, "provider": "gmail"}), 400, "unknown provider"),
        (api.get("/api/limits", params={"provider": "google"}), 400, "ip: missing"),
        (api.get("/api/status", params={"verbose": "1"}), 400, "unknown parameter 'verbose'"),
        (api.get("/api/automations", params={"all": "maybe"}), 400, "true or false"),
        (api.get("/api/decisions", params={"limit": "x"}), 400, "integer"),
        (api.get("/api/decisions", params={"limit": "5000"}), 400, "limit"),
        (api.get("/nope"), 404, "no such endpoint"),
        (api.get("/api/../../etc/passwd"), 404, "no such endpoint"),
        (api.get("/api/%2e%2e/%2e%2e/etc/passwd"), 404, "no such endpoint"),
        (api.delete("/api/status", headers=auth(daemon)), 405, "not allowed"),
    ]
    h = {**auth(daemon), "Content-Type": "application/json"}
    cases += [
        (api.post("/api/pause", content=b"{not json", headers=h), 400, "not JSON"),
        (api.post("/api/pause", content=b"[1]", headers=h), 400, "JSON object"),
        (api.post("/api/pause", json={"ip": IP, "reason": "r", "x": 1}, headers=h), 400, "'x'"),
        (api.post("/api/pause", json={"ip": 7, "reason": "r"}, headers=h), 400, "string"),
        (api.post("/api/pause", json={"ip": IP}, headers=h), 400, "reason: missing"),
        (
            api.post("/api/pause", content=b" " * (MAX_BODY_BYTES + 1), headers=h),
            413,
            "larger than",
        ),
    ]
    for r, code, text in cases:
        assert r.status_code == code and text in r.json()["error"], (r.request.url, r.text)
    assert api.get("/healthz").status_code == 200  # nothing above hurt the server


def test_openapi_is_valid_and_names_every_endpoint(api: httpx.Client) -> None:
    spec = api.get("/openapi.json").json()
    validate(spec)
    served = {(e.method.lower(), e.path) for e in ENDPOINTS}
    described = {(m, p) for p, ops in spec["paths"].items() for m in ops if p != "/metrics"}
    assert described == served
    for e in ENDPOINTS:
        op = spec["paths"][e.path][e.method.lower()]
        assert ("security" in op) == e.write, e.path


def test_metrics_follow_the_naming_rules(daemon: DaemonProc, api: httpx.Client) -> None:
    with daemon.mta_client() as m:
        m.request("acquire", ip=IP, domain="gmail.com")
        m.request(
            "report",
            ip=IP,
            domain="gmail.com",
            result="bounced",
            code=550,
            enhanced="5.1.1",
            text="The email account that you tried to reach does not exist",
        )
    bounced = ("kiln_replies_total", {"provider": "google", "class": "hard_bounce"})
    granted = ("kiln_messages_total", {"ip": IP, "provider": "google", "result": "granted"})
    deadline = time.monotonic() + 10  # reports and tallies are taken by the 1 s flush
    while True:
        samples = [
            (s.name, s.labels, s.value)
            for f in text_string_to_metric_families(api.get("/metrics").text)
            for s in f.samples
        ]
        seen = {(n, tuple(sorted(la.items()))) for n, la, _ in samples}
        if all((n, tuple(sorted(la.items()))) in seen for n, la in (bounced, granted)):
            break
        assert time.monotonic() < deadline, samples
        time.sleep(0.2)
    families = list(text_string_to_metric_families(api.get("/metrics").text))
    # Families without samples (no signal source configured) are still described.
    names = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    assert set(METRIC_NAMES) == names
    for f in families:
        assert f.name.startswith("kiln_"), f.name
        if f.type == "counter":
            assert all(s.name.endswith("_total") for s in f.samples), f.name


def test_token_file_and_public_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = anytime_plan(tmp_path)
    with running_daemon(plan, args=["--http", "127.0.0.1:0", "--http-public"]) as d:
        path = d.state_dir / TOKEN_FILE
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert main(["token", "--state-dir", str(d.state_dir)]) == 0
        assert capsys.readouterr().out.strip() == token(d)
        with httpx.Client(base_url=d.http_url(), timeout=10) as c:
            assert c.get("/api/status").status_code == 401  # reads need it beyond loopback
            assert c.get("/api/status", headers=auth(d)).status_code == 200
            assert c.get("/openapi.json").status_code == 200
    # Beyond loopback only when told; a token others can read is not used.
    assert main(["run", "--config", str(plan), "--http", "192.0.2.1:8470"]) == 2
    assert "not loopback" in capsys.readouterr().err
    state = tmp_path / "loose"
    state.mkdir()
    (state / TOKEN_FILE).write_text("x" * 40 + "\n")
    os.chmod(state / TOKEN_FILE, 0o644)
    d = DaemonProc(plan, state_dir=state).start()
    try:
        assert '"http_not_started"' in d.log() and "chmod 600" in d.log()
        with d.mta_client() as m:  # mail does not wait for a dashboard's port
            assert m.request("ping")["ok"] is True
    finally:
        d.cleanup()


def test_http_off(tmp_path: Path) -> None:
    with running_daemon(anytime_plan(tmp_path), args=["--http", "off"]) as d:
        assert "http_listening" not in d.log()
        with d.client() as c:
            assert c.request("status")["ok"] is True


def test_grafana_dashboard_and_alerts_name_only_metrics_kiln_serves() -> None:
    repo = Path(__file__).resolve().parent.parent
    dashboard = json.loads((repo / "contrib" / "grafana" / "kiln.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    rules = yaml.safe_load((repo / "contrib" / "prometheus" / "alerts.yaml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert {a["alert"] for a in alerts} >= {
        "KilnRampHeld",
        "KilnSignalSourceStale",
        "KilnKeySuspended",
        "KilnPoolOutOfRoom",
        "KilnCapsNearlyExhausted",
    }
    for a in alerts:
        assert {"expr", "for", "labels", "annotations"} <= a.keys(), a
    exprs += [str(a["expr"]) for a in alerts]
    named = {m for e in exprs for m in re.findall(r"\bkiln_[a-z_]+", e)}
    assert named and named <= set(METRIC_NAMES), named - set(METRIC_NAMES)
    assert len(dashboard["panels"]) >= 10 and all(p["targets"] for p in dashboard["panels"])
