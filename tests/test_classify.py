"""SMTP reply classification: the shipped rules against responses.csv and their own examples,
normalisation (continuation prefixes, Postfix wrapping, idempotence, a reference model),
internal replies, rule files (overrides, disable, located errors), the `classify` op through
`Engine.serve`, docs/protocol.md's classify examples, and `kiln classify`.
"""

from __future__ import annotations

import csv
import io
import json
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kiln import _core
from kiln.cli import main
from kiln.errors import ScheduleError
from kiln.rules import (
    DEFAULT_RULES,
    PROVIDER_GROUPS,
    RuleFiles,
    RuleSet,
    Threshold,
    classify,
    known_providers,
    load_rules,
    parse_threshold,
)

REPO = Path(__file__).resolve().parent.parent
RESPONSES = REPO / "tests" / "fixtures" / "warmup" / "responses.csv"
DOC = REPO / "docs" / "protocol.md"
NOW_MS = 1_800_000_000_000
IPV4 = "192.0.2.10"
IPV6 = "2001:db8::25"


def _responses() -> list[dict[str, str]]:
    """responses.csv rows (tests/fixtures/warmup/)."""
    with RESPONSES.open(newline="") as f:
        return list(csv.DictReader(f))


ROWS = _responses()


@pytest.fixture(scope="module")
def shipped() -> RuleSet:
    """The shipped rules."""
    return load_rules()


@pytest.fixture(scope="module")
def engine(shipped: RuleSet) -> _core.Engine:
    """An engine holding the shipped rules."""
    return shipped.engine()


def _providers(name: str) -> list[str | None]:
    """The provider keys a responses.csv provider stands for (`any`: no provider)."""
    if name == "any":
        return [None]
    return list(PROVIDER_GROUPS.get(name, (name,)))


# ----- the shipped rules -----


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r['provider']}-{r['code']}-{r['text'][:24]}")
def test_every_example_reply_gets_its_class_and_scope(
    engine: _core.Engine, row: dict[str, str]
) -> None:
    """Each row of responses.csv classifies to its expected class and scope, for each of its
    provider keys and with no provider at all, and again with an IPv6 sending address."""
    code = int(row["code"])
    enhanced = row["enhanced"] or None
    want = (row["expected_class"], row["expected_scope"])
    for provider in [*_providers(row["provider"]), None]:
        got = engine.classify(provider, code, enhanced, row["text"])
        assert got is not None and got[:2] == want, (provider, got)
        v6 = row["text"].replace(IPV4, IPV6).replace("192.0.2.0/24", "2001:db8::/48")
        assert engine.classify(provider, code, enhanced, v6) == got, provider
        raw = f"{code}-{enhanced} " if enhanced else f"{code} "
        assert engine.classify(provider, None, None, raw + row["text"]) == got


def test_the_fixture_has_every_row() -> None:
    """responses.csv has its 24 replies (the header is the 25th line)."""
    assert len(ROWS) == 24


@pytest.mark.parametrize("rule_id", [r.id for r in load_rules().rules])
def test_every_shipped_rule_has_an_example_that_it_matches(
    shipped: RuleSet, engine: _core.Engine, rule_id: str
) -> None:
    """Every shipped rule carries an example; the set classifies it to the rule's class, and
    the rule is among the matches (pitfall 4: patterns are tested as loaded)."""
    rule = shipped.by_id[rule_id]
    assert rule.example, f"{rule_id} has no example"
    keys = rule.provider_keys
    got = engine.classify(keys[0] if keys else None, None, None, rule.example)
    assert got is not None
    assert got[0] == rule.class_
    assert rule_id in got[3]


def test_provider_rules_apply_to_their_provider_only(engine: _core.Engine) -> None:
    """A `microsoft` rule covers both Microsoft keys, not Google's; no provider: every rule."""
    text = "451 4.7.650 The mail server [192.0.2.10] has been temporarily rate limited due to IP"
    for p in ("microsoft-consumer", "microsoft-365", None):
        got = engine.classify(p, None, None, text)
        assert got is not None and got[2] == "microsoft-4.7.650", p
    got = engine.classify("google", None, None, text)
    assert got is not None and got[2] == "fallback-temporarily-deferred"


def test_both_gmail_wordings_and_old_codes_land_together(engine: _core.Engine) -> None:
    """ "Our system has detected" and "Gmail has detected", under 4.7.28 and the old 4.7.0,
    all classify as an IP rate limit (pitfall 6)."""
    for enhanced in ("4.7.28", "4.7.0"):
        for who in ("Our system has", "Gmail has"):
            text = (
                f"{who} detected an unusual rate of unsolicited mail originating from your IP "
                "address. To protect our users from spam, mail sent from your IP address has been "
                "temporarily rate limited."
            )
            got = engine.classify("google", 421, enhanced, text)
            assert got is not None and got[:2] == ("rate_limit_rep", "ip"), (enhanced, who)


def test_case_does_not_matter(engine: _core.Engine) -> None:
    """Patterns match case-insensitively."""
    for row in ROWS[:10]:
        code, enh = int(row["code"]), row["enhanced"] or None
        p = _providers(row["provider"])[0]
        want = engine.classify(p, code, enh, row["text"])
        assert engine.classify(p, code, enh, row["text"].upper()) == want
        assert engine.classify(p, code, enh, row["text"].lower()) == want


def test_generic_and_provider_rules_both_fire(engine: _core.Engine) -> None:
    """Overlaps are recorded: the provider rule wins, the generic fallback is named too."""
    got = engine.classify(
        "yahoo",
        None,
        None,
        "421 4.7.1 [TS03] All messages from 192.0.2.10 "
        "will be permanently deferred; Retrying will NOT succeed.",
    )
    assert got == (
        "block_rep",
        "ip",
        "yahoo-permanently-deferred",
        ("yahoo-permanently-deferred", "fallback-permanently-deferred"),
    )


def test_unclassified(engine: _core.Engine) -> None:
    """A reply no rule knows is None."""
    assert engine.classify("google", 250, "2.0.0", "OK 1234 - gsmtp") is None


# ----- internal replies -----

INTERNAL = [
    (None, "Connection refused"),
    (None, "mail for example.com loops back to myself"),
    (421, "KumoMTA internal: failed to connect to any candidate hosts: spamhaus"),
    (451, "kiln: throttled (rate) for 192.0.2.10 too many connections"),
    (421, "delivery temporarily suspended: connect to mx.example[192.0.2.1]:25: timed out"),
    (421, "connect to mx.example[192.0.2.1]:25: Connection timed out"),
    (421, "lost connection with mx.example[192.0.2.1] while receiving the initial greeting"),
    (421, "conversation with mx.example[192.0.2.1] timed out while receiving the greeting"),
    (450, "Host or domain name not found. Name service error for name=x type=MX: try again"),
]


@pytest.mark.parametrize(("code", "text"), INTERNAL)
def test_internal_replies_never_fire(code: int | None, text: str) -> None:
    """The MTA's own replies are "internal" even against a rule that matches everything."""
    e = _core.Engine()
    e.set_rules([("all", None, None, None, ".", "blocklist", "ip", False)])
    assert e.classify(None, code, None, text) == ("internal", None, None, ())


# ----- normalisation -----


@pytest.mark.parametrize(
    ("code", "enhanced", "text", "want"),
    [
        (
            None,
            None,
            "421-4.7.28 an unusual rate of 421-4.7.28 unsolicited mail. To protect our\n"
            "421-4.7.28  users 421 4.7.28 from spam - gsmtp",
            "421 4.7.28 an unusual rate of unsolicited mail. To protect our users from spam"
            " - gsmtp",
        ),
        (451, None, "451- 4.7.652 The mail 451- 4.7.652 server", "451 4.7.652 The mail server"),
        (554, None, "554- rejected 554- see /421-ts03.html", "554 rejected see /421-ts03.html"),
        (550, None, "for 200 recipients 550 4.4.4", "550 for 200 recipients 4.4.4"),
        (421, "4.7.0", "[TSS04] deferred", "421 4.7.0 [TSS04] deferred"),
        (421, "4.7.0", "4.7.0 [TSS04] deferred", "421 4.7.0 [TSS04] deferred"),
        (None, None, "421 Max message per connection", "421 Max message per connection"),
        (
            None,
            None,
            "host mx.x[192.0.2.1] said: 550-5.7.1 [2001:db8::25] no 550 5.7.1"
            " (in reply to RCPT TO command)",
            "550 5.7.1 [2001:db8::25] no",
        ),
        (None, None, "  no code  here ", "no code here"),
    ],
)
def test_normalise_reply(code: int | None, enhanced: str | None, text: str, want: str) -> None:
    """Continuation prefixes go wherever they repeat the reply's own code; other numbers
    (200 recipients, /421-ts03.html) stay; Postfix's said:/in reply to wrapping goes."""
    assert _core.normalise_reply(code, enhanced, text) == want
    assert reference_normalise(code, enhanced, text) == want


def test_normalise_rejects_bad_codes() -> None:
    """Codes outside 200-599 and malformed enhanced codes are errors that name the argument."""
    with pytest.raises(_core.CoreError, match="code: must be an SMTP reply code"):
        _core.normalise_reply(99, None, "x")
    with pytest.raises(_core.CoreError, match="enhanced: must be an enhanced status code"):
        _core.normalise_reply(421, "4.7", "x")
    e = _core.Engine()
    with pytest.raises(_core.CoreError, match="code:"):
        e.classify(None, 600, None, "x")


_TOKENS = st.sampled_from(
    [
        "421",
        "421-",
        "421-4.7.28",
        "4.7.28",
        "4.7.0",
        "550",
        "550-5.7.1",
        "5.7.1",
        "host",
        "said:",
        "(in",
        "reply",
        "to",
        "command)",
        "x",
        "[TS03]",
        "\n",
        "\t",
        " ",
        "200",
        "/421-x",
    ]
)
_TEXT = st.one_of(st.text(max_size=60), st.lists(_TOKENS, max_size=16).map(" ".join))
_CODES = st.one_of(st.none(), st.sampled_from([421, 450, 550]), st.integers(200, 599))
_ENHANCED = st.one_of(st.none(), st.sampled_from(["4.7.28", "4.7.0", "5.7.1", "2.0.0"]))


@given(_CODES, _ENHANCED, _TEXT)
def test_normalise_is_idempotent_and_matches_the_reference(
    code: int | None, enhanced: str | None, text: str
) -> None:
    """Normalising twice changes nothing, and the Rust normaliser agrees with the reference."""
    once = _core.normalise_reply(code, enhanced, text)
    assert _core.normalise_reply(code, enhanced, once) == once
    assert reference_normalise(code, enhanced, text) == once


@given(
    st.one_of(st.none(), st.integers(-(2**70), 2**70)),
    st.one_of(st.none(), st.text(max_size=8)),
    st.text(),
)
def test_classify_never_panics(code: int | None, enhanced: str | None, text: str) -> None:
    """Arbitrary input gives a result or a CoreError, never a panic."""
    e = _core.Engine()
    e.set_rules([("r", None, None, None, "x", "busy", "ip", False)])
    try:
        got = e.classify(None, code, enhanced, text)
    except _core.CoreError:
        return
    assert got is None or got[0] in {"internal", "busy"}


_WS = re.compile(r"[ \t\n\x0c\r]+")
_ENH = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")


def reference_normalise(code: int | None, enhanced: str | None, text: str) -> str:
    """A plain Python model of `classify::normalise` (docs/rules.md, "What a rule sees")."""
    toks = [t for t in _WS.split(text) if t]
    while True:
        n = len(toks)
        if len(toks) >= 3 and toks[0].lower() == "host" and toks[2].lower() == "said:":
            toks = toks[3:]
        if toks and toks[-1].lower() == "command)":
            opens = [
                j
                for j in range(len(toks) - 2)
                if [t.lower() for t in toks[j : j + 3]] == ["(in", "reply", "to"]
            ]
            if opens and opens[-1] + 3 < len(toks) - 1:
                toks = toks[: opens[-1]]
        if len(toks) == n:
            break
    first_text = candidate = None
    code_str = None if code is None else str(code)
    if toks:
        t = toks[0]
        m = re.fullmatch(r"([2-5][0-9]{2})(-.*)?", t, flags=re.DOTALL)
        leading = False
        if m and code_str is not None:
            leading = m.group(1) == code_str
        elif m:
            code_str = m.group(1)
            leading = True
        if leading:
            toks = toks[1:]
            rest = t[4:] if len(t) > 3 else ""
            if _ENH.fullmatch(rest):
                candidate = rest
            elif rest:
                first_text = rest
    if enhanced is not None:
        if candidate is None and first_text is None and toks[:1] == [enhanced]:
            toks = toks[1:]
    elif candidate is not None:
        enhanced = candidate
    elif first_text is None and toks and _ENH.fullmatch(toks[0]):
        enhanced, toks = toks[0], toks[1:]
    out = [p for p in (code_str, enhanced, first_text) if p is not None]
    i = 0
    while i < len(toks):
        t = toks[i]
        i += 1
        if code_str is not None and t.startswith(code_str):
            rest = t[len(code_str) :]
            if rest in {"", "-"}:
                if enhanced is not None and i < len(toks) and toks[i] == enhanced:
                    i += 1
                continue
            if rest.startswith("-") and _ENH.fullmatch(rest[1:]):
                continue
        out.append(t)
    return " ".join(out)


# ----- rule files -----


def _write(tmp_path: Path, text: str, name: str = "mine.yaml") -> Path:
    """A rule file in tmp_path."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_override_and_disable(tmp_path: Path) -> None:
    """An operator rule with a shipped id replaces it; disable drops shipped rules; new rules
    are added after the shipped ones."""
    path = _write(
        tmp_path,
        """\
        disable: [apple-hcm1]
        rules:
          - id: qq-ip-frequency
            providers: [qq]
            text: 'Ip frequency limited'
            class: block_rep
            scope: ip
            threshold: 3/1h
            action: {slow: 0.25, for: 30m}
            example: '550 Ip frequency limited'
          - id: mine-greylist
            code: [450, 451]
            text: 'greylist'
            class: busy
            scope: ip
            action: none
            example: '451 4.7.1 Greylisted, come back in 5 minutes'
        """,
    )
    shipped = load_rules()
    rules = load_rules([path])
    assert "apple-hcm1" not in rules.by_id
    assert len(rules.rules) == len(shipped.rules) + 1 - 1
    qq = rules.by_id["qq-ip-frequency"]
    assert qq.class_ == "block_rep"
    assert qq.threshold == Threshold(count=3, period_ms=3_600_000)
    assert qq.action is not None and qq.action != "none"
    assert (qq.action.slow, qq.action.duration_ms) == (0.25, 1_800_000)
    assert rules.by_id["mine-greylist"].action == "none"
    assert rules.rules[-1].id == "mine-greylist"
    e = rules.engine()
    assert e.classify("qq", 550, None, "Ip frequency limited")[:3] == (  # type: ignore[index]
        "block_rep",
        "ip",
        "qq-ip-frequency",
    )
    assert e.classify("apple", None, None, "421 [HCM1] Your mail was deferred.") is None


def test_unchanged_rule_files_are_not_read_again(tmp_path: Path) -> None:
    """RuleFiles (what a reload reads rules through) returns the rules it read and compiled
    before while the files and provider names are the same; an edited file, or a new
    provider name, is read again, and a broken edit raises without touching the cache."""
    path = _write(tmp_path, _GREYLIST)
    files = RuleFiles()
    known = known_providers()
    first = files.load([path], known)
    assert files.load([path], known) is first
    assert "mine-greylist" in first.by_id
    path.write_text(textwrap.dedent(_GREYLIST).replace("mine-greylist", "mine-grey"))
    second = files.load([path], known)
    assert second is not first and "mine-grey" in second.by_id
    assert files.load([path], known | {"acme"}) is not second
    path.write_text("rules: [{id: x, text: '(', class: busy, scope: ip}]\n")
    with pytest.raises(ScheduleError, match="not a valid regex"):
        files.load([path], known)


def test_compiled_rules_are_made_off_the_engine_thread_and_swapped_in() -> None:
    """CompiledRules compiles on any thread (a reload's worker) while the engine is pinned
    to another; use_rules then puts them in force, and a bad rule names its id."""
    import threading

    shipped = load_rules()
    engine = _core.Engine()
    engine.pin_thread()
    made: list[_core.CompiledRules] = []
    worker = threading.Thread(target=lambda: made.append(_core.CompiledRules(shipped.tuples())))
    worker.start()
    worker.join()
    assert len(made[0]) == len(shipped.rules)
    engine.use_rules(made[0])
    assert engine.rule_count() == len(shipped.rules)
    got = engine.classify("google", None, None, _GMAIL_RATE_REPLY)
    assert got is not None and got[0] == "rate_limit_rep"
    bad = [*shipped.tuples()[:3], ("broken", None, None, None, "(x", "busy", "ip", False)]
    with pytest.raises(_core.CoreError, match='rule "broken": text'):
        _core.CompiledRules(bad)


_GREYLIST = """\
    rules:
      - id: mine-greylist
        code: [450, 451]
        text: 'greylist'
        class: busy
        scope: ip
        action: none
        example: '451 4.7.1 Greylisted, come back in 5 minutes'
    """

_GMAIL_RATE_REPLY = (
    "421-4.7.28 Gmail has detected an unusual rate of email originating from your IP address. "
    "To protect our users from spam, mail sent from your IP address has been temporarily "
    "rate limited."
)


def test_thresholds() -> None:
    """`N/period` counts N matches within the period; 1 (the default) is every match."""
    assert parse_threshold("3/1h") == Threshold(count=3, period_ms=3_600_000)
    assert parse_threshold("5/h") == Threshold(count=5, period_ms=3_600_000)
    assert parse_threshold("2/30m") == Threshold(count=2, period_ms=1_800_000)
    assert parse_threshold(1) == Threshold()
    assert str(parse_threshold("3/1h")) == "3/1h"
    for bad in ("3", "x/1h", "3/1y", "0/1h", True):
        with pytest.raises(ValueError, match="threshold"):
            parse_threshold(bad)


def _problems(paths: list[Path], known: set[str] | None = None) -> list[str]:
    """Every problem (as text) loading `paths` after the shipped rules."""
    with pytest.raises(ScheduleError) as e:
        load_rules(paths, known)
    return [str(p) for p in e.value.problems]


@pytest.mark.parametrize(
    ("body", "where", "message"),
    [
        (["text: 'unclosed ('"], ":5:5: rules[0].text: ", "not a valid regex: unclosed group"),
        (
            ["text: x", "providers: [gmail]"],
            ":6:17: rules[0].providers[0]: ",
            "unknown provider 'gmail'; did you mean 'google'? (known: apple, ",
        ),
        (
            ["text: x", "clas: busy"],
            ":6:5: rules[0].clas: ",
            "unknown key 'clas'; did you mean 'class'?",
        ),
        (["text: x", "code: 42"], ":6:5: rules[0].code: ", "expected a reply code 200-599"),
        (["text: x", "enhanced: [4.7]"], ":6:16: rules[0].enhanced[0]: ", "enhanced code such as"),
        (["text: x", "threshold: 3/fortnight"], ":6:5: rules[0].threshold: ", "threshold period"),
        (["text: x", "action: {suspend: 30m, slow: 0.5}"], ":6:", "not both"),
        (
            ["text: zzz", "example: '421 nothing like it'"],
            ":6:5: rules[0].example: ",
            "no rule classifies this example",
        ),
        (
            ["text: xq", "example: '550 no such user'"],
            ":6:5: rules[0].example: ",
            "does not match its own example",
        ),
    ],
)
def test_mistakes_name_file_line_and_key(
    tmp_path: Path, body: list[str], where: str, message: str
) -> None:
    """A bad regex, an unknown provider (pitfall 1), an unknown key, a bad code, enhanced code,
    threshold or action, and an example the rule does not match: each names the file, the
    line and column, and the key."""
    lines = ["# my rules", "rules:", "  - id: mine", "    class: busy"]
    lines += [f"    {b}" for b in body] + ["    scope: ip"]
    path = tmp_path / "mine.yaml"
    path.write_text("\n".join(lines) + "\n")
    found = _problems([path])
    assert len(found) == 1, found
    assert found[0].startswith(str(path) + where), found
    assert message in found[0], found


def test_bad_class_scope_duplicates_and_disable(tmp_path: Path) -> None:
    """A class or scope that does not exist, an id used twice in a file, and a disable of an
    unknown id are each located."""
    path = _write(
        tmp_path,
        """\
        disable: [no-such-rule]
        rules:
          - {id: a, text: x, class: spam, scope: ip}
          - {id: b, text: x, class: busy, scope: planet}
        """,
    )
    found = _problems([path])
    assert any(":3:" in p and "rules[0].class: unknown class 'spam'" in p for p in found), found
    assert any(":4:" in p and "rules[1].scope: unknown scope 'planet'" in p for p in found), found
    path = _write(
        tmp_path,
        """\
        rules:
          - {id: a, text: zz, class: busy, scope: ip}
          - {id: a, text: zy, class: busy, scope: ip}
        """,
        "dup.yaml",
    )
    found = _problems([path])
    assert any(":3:" in p and "rules[1].id: id 'a' already used at line 2" in p for p in found)
    path = _write(tmp_path, "disable: [zzz-nothing]\n", "disable.yaml")
    found = _problems([path])
    assert found == [f"{path}:1:11: disable[0]: no earlier rule has id 'zzz-nothing'"]


def test_plan_providers_count_as_known(tmp_path: Path) -> None:
    """Names a caller passes (a plan's own providers) may be used; groups are always known."""
    path = _write(
        tmp_path,
        "rules: [{id: a, providers: [acme, microsoft], text: zzq, class: busy, scope: ip}]\n",
    )
    assert _problems([path]) != []
    rules = load_rules([path], known_providers() | {"acme"})
    assert rules.by_id["a"].provider_keys == ("acme", "microsoft-consumer", "microsoft-365")


def test_set_rules_refuses_bad_tuples() -> None:
    """The engine names the rule and field of a bad tuple, and keeps the rules in force."""
    e = _core.Engine()
    e.set_rules([("ok", None, None, None, "x", "busy", "ip", False)])
    cases: list[tuple[Any, str]] = [
        (("bad", None, None, None, "(", "busy", "ip", False), 'rule "bad": text: regex parse'),
        (("bad", "google", None, None, "x", "busy", "ip", False), 'rule "bad": providers'),
        (("bad", None, [42], None, "x", "busy", "ip", False), 'rule "bad": code'),
        (("bad", None, ["6xx"], None, "x", "busy", "ip", False), 'rule "bad": code'),
        (("bad", None, None, ["4.7"], "x", "busy", "ip", False), 'rule "bad": enhanced'),
        (("bad", None, None, None, "x", "spam", "ip", False), 'rule "bad": class'),
        (("bad", None, None, None, "x", "busy", "moon", False), 'rule "bad": scope'),
        (("bad", None, None, None, "x"), "rules[0]: must have 8 fields"),
    ]
    for rule, message in cases:
        with pytest.raises(_core.CoreError, match=re.escape(message)):
            e.set_rules([rule])
    assert e.rule_count() == 1


# ----- the protocol op -----


def _wire(shipped: RuleSet) -> _core.Engine:
    """An engine as the daemon sets it up, with the shipped rules."""
    e = _core.Engine()
    e.set_default_provider("default")
    e.set_route("gmail.com", "google", _core.MAX_NOW_MS)
    e.set_route("outlook.com", "microsoft-consumer", _core.MAX_NOW_MS)
    e.set_route("nomail.example", None, _core.MAX_NOW_MS)
    shipped.compile_into(e)
    return e


def _serve(e: _core.Engine, *requests: dict[str, Any] | str) -> list[dict[str, Any]]:
    """Replies to `requests`, sent as one buffer."""
    data = b"".join((r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in requests)
    served = e.serve(data, NOW_MS)
    assert served.consumed == len(data) and served.upcall is None
    return [json.loads(line) for line in served.reply.splitlines()]


def test_classify_op_gives_the_default_provider_every_rule(shipped: RuleSet) -> None:
    """A domain without a plan row (yahoo.com counts as `default`) meets every rule, as the
    reports the daemon acts on do: the Yahoo rule decides, as with no provider at all, and
    `provider` says `default` (before: only provider-free rules, so `classify` and policy
    disagreed)."""
    e = _wire(shipped)
    text = "[TS03] All messages from 192.0.2.10 will be permanently deferred; Retrying will NOT"
    ask = {"op": "classify", "text": text, "code": 421, "enhanced": "4.7.1"}
    by_domain, by_name, anyone = _serve(
        e, {**ask, "domain": "yahoo.com"}, {**ask, "provider": "default"}, ask
    )
    assert by_domain["rule"] == by_name["rule"] == anyone["rule"] == "yahoo-permanently-deferred"
    assert by_domain["provider"] == by_name["provider"] == "default"
    assert anyone["provider"] is None


def test_classify_op(shipped: RuleSet) -> None:
    """`classify` answers class, scope, rule, every match and the normalised line, by domain,
    by provider or with neither; a raw reply carries its own codes."""
    e = _wire(shipped)
    gmail = ROWS[0]
    replies = _serve(
        e,
        {
            "op": "classify",
            "id": 1,
            "text": gmail["text"],
            "code": 421,
            "enhanced": "4.7.28",
            "domain": "gmail.com",
        },
        {"op": "classify", "text": "421-4.7.28 " + gmail["text"]},
        {
            "op": "classify",
            "text": ROWS[8]["text"],
            "code": 451,
            "enhanced": "4.7.650",
            "domain": "Outlook.COM",
        },
        {
            "op": "classify",
            "text": "421 [HCM1] Your mail from 192.0.2.10 was deferred.",
            "provider": "apple",
        },
        {"op": "classify", "text": "250 ok", "provider": "google"},
        {
            "op": "classify",
            "text": "connect to mx[192.0.2.1]:25: Connection timed out",
            "code": 421,
        },
        {
            "op": "classify",
            "text": "554 5.7.1 blocked using zen.spamhaus.org",
            "domain": "nomail.example",
        },
    )
    want_line = f"421 4.7.28 {gmail['text']}"
    assert replies[0] == {
        "id": 1,
        "ok": True,
        "class": "rate_limit_rep",
        "scope": "ip",
        "rule": "google-4.7.28-ip",
        "matched": ["google-4.7.28-ip", "fallback-temporarily-deferred"],
        "normalised": want_line,
        "provider": "google",
    }
    assert replies[1]["rule"] == "google-4.7.28-ip" and replies[1]["provider"] is None
    assert replies[1]["normalised"] == want_line
    assert (replies[2]["rule"], replies[2]["provider"]) == (
        "microsoft-4.7.650",
        "microsoft-consumer",
    )
    assert replies[3]["rule"] == "apple-hcm1"  # a provider of the rules, not of the engine
    assert replies[4]["class"] == "unclassified" and replies[4]["matched"] == []
    assert replies[5]["class"] == "internal" and replies[5]["rule"] is None
    assert (replies[6]["class"], replies[6]["provider"]) == ("blocklist", None)


def test_classify_op_refuses_malformed_requests(shipped: RuleSet) -> None:
    """Malformed requests get error replies naming the field; nothing raises."""
    e = _wire(shipped)
    replies = _serve(
        e,
        {"op": "classify", "id": 7},
        {"op": "classify", "text": 421},
        {"op": "classify", "text": "x", "code": "421"},
        {"op": "classify", "text": "x", "code": 700},
        {"op": "classify", "text": "x", "enhanced": 4.7},
        {"op": "classify", "text": "x", "enhanced": "47.28"},
        {"op": "classify", "text": "x", "provider": "gmail"},
        {"op": "classify", "text": "x", "domain": "gmail.com", "provider": "google"},
        {"op": "classify", "text": "x", "domain": "not a domain"},
        {"op": "classify", "text": "x", "ip": IPV4},
        '{"op":"classify","text":"x","text":"y"}',
    )
    assert all(r["ok"] is False for r in replies)
    assert replies[0] == {"id": 7, "ok": False, "error": "text: missing (the SMTP reply)"}
    errors = [r["error"] for r in replies[1:]]
    for error, start in zip(
        errors,
        [
            "text: must be a string",
            "code: must be a whole number",
            "code: must be an SMTP reply",
            "enhanced: must be a string",
            "enhanced: must be an enhanced status code",
            "provider: unknown provider",
            "give domain or provider",
            "domain: not a domain",
            "ip: not a field of classify",
            "text: given twice",
        ],
        strict=True,
    ):
        assert error.startswith(start), error


def _doc_classify_exchanges() -> Iterator[tuple[str, Any]]:
    """(request, reply) of docs/protocol.md's `text classify` blocks."""
    text = DOC.read_text()
    blocks = re.findall(r"^```text classify\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    assert blocks, "docs/protocol.md has classify examples"
    for block in blocks:
        lines = block.splitlines()
        requests = [line[2:] for line in lines if line.startswith("> ")]
        replies: list[Any] = []
        pending = ""
        for line in lines:
            if line.startswith("< "):
                pending += line[2:]
                try:
                    replies.append(json.loads(pending))
                except ValueError:
                    continue
                pending = ""
        assert len(requests) == len(replies)
        yield from zip(requests, replies, strict=True)


def test_protocol_doc_classify_examples(shipped: RuleSet) -> None:
    """Every classify example in docs/protocol.md gets its documented reply from an engine
    holding the shipped rules (the daemon's replay test skips these blocks)."""
    e = _wire(shipped)
    for request, want in _doc_classify_exchanges():
        assert _serve(e, request) == [want], request


# ----- kiln classify -----


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run `kiln classify ...`; (exit code, stdout, stderr)."""
    code = main(["classify", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_classifies_raw_and_postfix_replies(capsys: pytest.CaptureFixture[str]) -> None:
    """`kiln classify` reads a raw reply or a Postfix said: text; 0 when classified."""
    code, out, _ = _cli(
        capsys,
        "--json",
        "host gmail-smtp-in.l.google.com[142.250.1.26] said: 421-4.7.28 Gmail has detected an "
        "unusual rate of 421-4.7.28 email originating from your IP Netblock 192.0.2.0/24. "
        "(in reply to end of DATA command)",
    )
    assert code == 0
    doc = json.loads(out)
    assert doc["class"] == "rate_limit_rep" and doc["scope"] == "netblock"
    assert doc["normalised"].startswith("421 4.7.28 Gmail has detected an unusual rate of email")
    code, out, _ = _cli(
        capsys, "--provider", "microsoft", ROWS[12]["code"] + " " + ROWS[12]["text"]
    )
    assert code == 0 and "conn_limit" in out and "microsoft-4.7.652-connections" in out
    code, out, _ = _cli(capsys, "421 4.3.2 nothing we know")
    assert code == 1 and "unclassified" in out
    code, out, _ = _cli(capsys, "connect to mx[192.0.2.1]:25: Connection refused")
    assert code == 1 and "internal" in out


def test_cli_reads_rule_files_and_reports_their_mistakes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--rules adds operator files; a broken one prints located problems and exits 2."""
    good = _write(tmp_path, "rules: [{id: g, text: greylist, class: busy, scope: ip}]\n")
    code, out, _ = _cli(capsys, "--rules", str(good), "451 Greylisted")
    assert code == 0 and "rule       g" in out
    bad = _write(tmp_path, "rules: [{id: g, text: '(', class: busy, scope: ip}]\n", "bad.yaml")
    code, _, err = _cli(capsys, "--rules", str(bad), "451 Greylisted")
    assert code == 2 and f"{bad}:1:" in err and "not a valid regex" in err
    code, _, err = _cli(capsys, "--provider", "gmail", "421 x")
    assert code == 2 and "unknown provider 'gmail'; did you mean 'google'?" in err


def test_cli_takes_code_and_enhanced_like_the_socket_op(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`kiln classify --code --enhanced` give the codes apart from the text, as the native
    `classify` op's fields do, with the same answer; '' is none, as on the socket."""
    text = "Gmail has detected an unusual rate of email originating from your IP address 192.0.2.1."
    code, out, _ = _cli(capsys, "--json", "--code", "421", "--enhanced", "4.7.28", text)
    split = json.loads(out)
    code_raw, out, _ = _cli(capsys, "--json", f"421-4.7.28 {text}")
    assert code == code_raw == 0 and split == json.loads(out)
    assert split["rule"] == "google-4.7.28-ip" and split["normalised"] == f"421 4.7.28 {text}"
    shipped = load_rules()
    assert split == classify(shipped, text, None, 421, "4.7.28").as_json()
    code, out, _ = _cli(
        capsys,
        "--json",
        "--provider",
        "default",
        "--code",
        "421",
        "--enhanced",
        "",
        "Too many connections from your IP",
    )
    got = json.loads(out)
    assert code == 0 and got["class"] == "conn_limit" and got["normalised"].startswith("421 Too")
    assert classify(shipped, "busy", None, 451, "").normalised == "451 busy"


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--code", "42", "an SMTP reply code is 200-599, got '42'"),
        ("--code", "soon", "not an SMTP reply code: 'soon'"),
        ("--enhanced", "4.7", "an enhanced status code is CLASS.SUBJECT.DETAIL such as 4.7.28"),
    ],
)
def test_cli_refuses_bad_codes(
    capsys: pytest.CaptureFixture[str], flag: str, value: str, message: str
) -> None:
    """A bad --code or --enhanced is a usage error (exit 2) that says what is expected."""
    with pytest.raises(SystemExit) as info:
        main(["classify", flag, value, "421 x"])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_shipped_file_opens_with_usage_notes() -> None:
    """The shipped file says how to use it and not to edit it in place."""
    head = DEFAULT_RULES.read_text().splitlines()[0]
    assert "Do not edit" in io.StringIO(DEFAULT_RULES.read_text()).read(600)
    assert head.startswith("# kiln's shipped SMTP reply rules")
