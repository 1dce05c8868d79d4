"""Optional reply fields that MTAs fill from log templates (`code`, `enhanced`, `text`) may be
empty: an empty value is "none given" on every path (MTA log readers, the `report` lines they
become, the core's `report` and `classify`, the guard), never an error."""

from __future__ import annotations

import json
from typing import Any

from daemonproc import EXAMPLE
from kiln import _core
from kiln.feedback import FeedbackEvent, KumoParser, PowerMtaParser
from kiln.feedback.postfix import strip_continuations
from kiln.feedback.wiring import report_line
from kiln.guard import Guard
from kiln.planfile import load_plan
from kiln.rules import classify, load_rules

NOW_MS = 1_800_000_000_000
PMTA_HEADER = "type,timeLogged,rcpt,dsnAction,dsnStatus,dsnDiag,dsnMta,dlvSourceIp"


def _pmta(*rows: str) -> list[FeedbackEvent]:
    """The events of PowerMTA accounting rows under a short header."""
    parser = PowerMtaParser()
    events = [parser.feed(line) for line in (PMTA_HEADER, *rows)]
    return [e for e in events if e is not None]


def _request(line: bytes | None) -> dict[str, Any]:
    """The JSON object of a `report` line."""
    assert line is not None
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def test_powermta_rows_without_an_enhanced_code_or_diagnostic() -> None:
    """An empty dsnStatus leaves the enhanced code out; an empty dsnDiag leaves code and text
    out; the `report` lines carry only what was given."""
    with_code, bare = _pmta(
        "t,2026-03-10 14:02:11+0000,a@gmail.com,delayed,,smtp;421 Try again later,mx.gmail.com,"
        "192.0.2.10",
        "t,2026-03-10 14:02:12+0000,b@gmail.com,delayed,,,mx.gmail.com,192.0.2.10",
    )
    assert (with_code.code, with_code.enhanced, with_code.text) == (421, None, "Try again later")
    assert (bare.code, bare.enhanced, bare.text) == (None, None, None)
    assert _request(report_line(with_code)) == {
        "op": "report",
        "ip": "192.0.2.10",
        "domain": "gmail.com",
        "result": "deferred",
        "code": 421,
        "text": "Try again later",
    }
    assert _request(report_line(bare)) == {
        "op": "report",
        "ip": "192.0.2.10",
        "domain": "gmail.com",
        "result": "deferred",
    }


def test_kumomta_records_with_null_or_empty_reply_parts() -> None:
    """A KumoMTA record whose enhanced code is null or empty and whose content is "" gives an
    event without them, and a `report` line without them."""
    parser = KumoParser()
    blanks: tuple[object, ...] = (None, {}, "")
    for enhanced in blanks:
        record = {
            "type": "TransientFailure",
            "recipient": "r@gmail.com",
            "timestamp": 1773151331,
            "response": {"code": 421, "enhanced_code": enhanced, "content": ""},
            "source_address": {"address": "192.0.2.10:25"},
        }
        event = parser.parse(json.dumps(record))
        assert event is not None
        assert (event.code, event.enhanced, event.text) == (421, None, None), enhanced
        request = _request(report_line(event))
        assert request["code"] == 421 and "enhanced" not in request and "text" not in request


def test_a_reply_without_an_enhanced_code_splits_cleanly() -> None:
    """Postfix's `said:` text without an enhanced code reads as code and text only."""
    assert strip_continuations("421 Try again later") == (421, None, "Try again later")
    assert strip_continuations("421-Try again 421 later") == (421, None, "Try again later")


def test_an_event_with_empty_strings_reports_none_of_them() -> None:
    """An event built with "" for enhanced and text (as a template would) reports neither."""
    event = FeedbackEvent(
        at_ms=NOW_MS,
        ip="192.0.2.10",
        recipient="a@gmail.com",
        recipient_domain="gmail.com",
        result="bounced",
        code=550,
        enhanced="",
        text="",
        local=False,
        command=None,
        message_id=None,
        source="powermta",
    )
    assert _request(report_line(event)) == {
        "op": "report",
        "ip": "192.0.2.10",
        "domain": "gmail.com",
        "result": "bounced",
        "code": 550,
    }


def test_the_core_and_the_guard_take_empty_fields_as_none() -> None:
    """The core's `report` keeps "" as none (so the guard never sees it), `classify` answers
    as without the field, and the guard and `kiln.rules.classify` accept "" too."""
    engine = _core.Engine()
    engine.set_default_provider("default")
    engine.key("192.0.2.10", "google")
    engine.set_route("gmail.com", "google", _core.MAX_NOW_MS)
    rules = load_rules()
    rules.compile_into(engine)
    lines = [
        {"op": "report", "ip": "192.0.2.10", "domain": "gmail.com", "result": "deferred"}
        | {"code": 421, "enhanced": "", "text": ""},
        {"op": "report", "ip": "192.0.2.10", "domain": "gmail.com", "result": "deferred"}
        | {"code": "", "enhanced": "", "text": ""},
        {"op": "classify", "text": "Try again later", "code": 421, "enhanced": ""},
        {"op": "classify", "text": "Try again later", "code": 421},
    ]
    served = engine.serve(b"".join(json.dumps(r).encode() + b"\n" for r in lines), NOW_MS)
    replies = [json.loads(r) for r in served.reply.splitlines()]
    assert replies[:2] == [{"ok": True, "provider": "google"}] * 2
    assert replies[2] == replies[3] and replies[2]["ok"]
    reports = engine.take_reports()
    assert [(r[5], r[6], r[7]) for r in reports] == [(421, None, None), (None, None, None)]
    guard = Guard(load_plan(EXAMPLE))
    seen: list[tuple[str, int | None, str | None, str]] = []

    def record(
        provider: str, code: int | None, enhanced: str | None, text: str
    ) -> tuple[str, str, str] | None:
        """The classifier the guard calls: note what it was given."""
        seen.append((provider, code, enhanced, text))
        return None

    report = (NOW_MS, "192.0.2.10", "google", "deferred", 1, 421, "", "")
    assert guard.on_reports([report], record, NOW_MS) == []
    assert seen == [("google", 421, None, "")]
    assert classify(rules, "Try again later", None, 421, "").as_json() == {
        k: v for k, v in replies[3].items() if k != "ok"
    }
