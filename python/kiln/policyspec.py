"""The plan's `policy` and `signals` sections: what evidence does to ramps, and where it comes from.

Both sections are optional; left out, the shipped defaults apply (kiln's own choices, based on
the figures in docs/warmup.md), and no signal source is polled. Every threshold can be overridden
in the plan. The decisions themselves are made in `kiln.policy`; this module only describes
and checks the settings. Documented key by key in `schedules/README.md` ("Policy").
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from kiln.duration import Duration, format_ms
from kiln.signals.urls import credential_url_problem

__all__ = [
    "ByteSize",
    "DayPolicy",
    "DnsblSpec",
    "FeedbackSpec",
    "KumoSpec",
    "PathSpec",
    "PolicySpec",
    "PostfixSpec",
    "PostmasterSpec",
    "PushbackClass",
    "RealtimeAction",
    "SignalPolicy",
    "Signals",
    "SndsSpec",
    "SoftBounceRule",
    "SuppressionSpec",
]

#: Push-back classes (docs/rules.md), most severe first: when several reply rules match,
#: the earliest class wins (rust/src/classify/ keeps the same order).
PushbackClass = Literal[
    "blocklist",
    "block_rep",
    "rate_limit_rep",
    "auth",
    "conn_limit",
    "busy",
    "content",
    "rcpt_rate",
    "hard_bounce",
]

Percent = Annotated[float, Field(ge=0, le=100)]
Fraction01 = Annotated[float, Field(gt=0, lt=1)]
Reputation = Literal["HIGH", "MEDIUM", "LOW", "BAD"]
Colour = Literal["GREEN", "YELLOW", "RED"]
ProviderName = Annotated[str, Field(min_length=1, max_length=64)]


class _Model(BaseModel):
    """Strict: unknown keys are errors, types are not coerced, values are frozen."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


def _percent(value: object) -> object:
    """`2` is as good as `2.0` for a percentage."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class RealtimeAction(_Model):
    """What one push-back reply does to its (IP, provider) key, at once.

    `{suspend: 1h}`: deny the key for an hour after the latest matching reply;
    `{slow: 0.25, for: 30m}`: run it at a quarter of its rate and caps for 30 minutes.
    Each new matching reply re-arms the action: it then ends at that reply's time plus the
    duration.
    """

    suspend: Duration | None = None
    slow: Fraction01 | None = None
    for_: Duration | None = Field(default=None, alias="for")

    @model_validator(mode="after")
    def _one_kind(self) -> RealtimeAction:
        """Either suspend, or slow with for."""
        if self.suspend is not None and (self.slow is not None or self.for_ is not None):
            raise ValueError("give suspend, or slow with for; not both")
        if self.suspend is None and (self.slow is None or self.for_ is None):
            raise ValueError("give suspend: DURATION, or slow: FACTOR with for: DURATION")
        return self

    @property
    def duration_ms(self) -> int:
        """How long one match keeps the action on."""
        value = self.suspend if self.suspend is not None else self.for_
        assert value is not None
        return value


def _action(spec: dict[str, object]) -> RealtimeAction:
    """A shipped default, written as in YAML."""
    return RealtimeAction.model_validate(spec)


_REALTIME_DEFAULTS: dict[str, RealtimeAction | Literal["none"]] = {
    "blocklist": _action({"suspend": "4h"}),
    "block_rep": _action({"suspend": "4h"}),
    "rate_limit_rep": _action({"suspend": "1h"}),
    "auth": "none",
    "conn_limit": _action({"slow": 0.5, "for": "1h"}),
    "busy": _action({"slow": 0.1, "for": "30m"}),
    "content": "none",
    "rcpt_rate": "none",
    "hard_bounce": "none",
}


class DayPolicy(_Model):
    """Day-roll thresholds on the previous sending day, per batch x provider (docs/warmup.md).

    Rates: bounces per attempted delivery (delivered + bounced), complaints per delivered
    message. Below `min_volume` attempts a rate can hold a ramp but never step it down or
    pause it: 1 bounce out of 3 is not evidence of a bad list.
    """

    min_volume: Annotated[int, Field(ge=1)] = 100
    hold_bounce_percent: Percent = 2.0
    step_down_bounce_percent: Percent = 5.0
    pause_bounce_percent: Percent = 10.0
    hold_complaint_percent: Percent = 0.1
    step_down_complaint_percent: Percent = 0.3
    pause_complaint_percent: Percent = 0.5
    #: `rate_limit_rep` replies in this many distinct hours of the day step the ramp down.
    rate_limit_step_down_hours: Annotated[int, Field(ge=1, le=24)] = 2
    #: After a `block_rep` or `blocklist` reply, no advance until this long without one.
    block_quiet: Duration = 24 * 3_600_000
    #: Steps taken back by one step-down.
    step_down_steps: Annotated[int, Field(ge=1)] = 1

    @model_validator(mode="after")
    def _ordered(self) -> DayPolicy:
        """hold <= step down <= pause, for bounces and for complaints."""
        for what in ("bounce", "complaint"):
            h, s, p = (getattr(self, f"{k}_{what}_percent") for k in ("hold", "step_down", "pause"))
            if not h <= s <= p:
                raise ValueError(
                    f"{what} thresholds must rise: hold_{what}_percent ({h:g}) <= "
                    f"step_down_{what}_percent ({s:g}) <= pause_{what}_percent ({p:g})"
                )
        return self


class SignalPolicy(_Model):
    """What Postmaster Tools, SNDS and blocklists do to the ramps they cover."""

    #: Gmail user-reported spam rate (the upper bound when Google gives one).
    spam_rate_hold_percent: Percent = 0.1
    spam_rate_step_down_percent: Percent = 0.3
    #: Postmaster v1 IP and domain reputation.
    reputation_hold: list[Reputation] = ["LOW"]
    reputation_step_down: list[Reputation] = ["BAD"]
    #: SNDS filter result of an IP: hold its ramps, or pause the IP for the provider at once.
    snds_hold: list[Colour] = ["YELLOW"]
    snds_pause: list[Colour] = ["RED"]
    #: A paused IP resumes after this many consecutive GREEN SNDS days.
    snds_resume_green_days: Annotated[int, Field(ge=1)] = 3
    #: SNDS ipStatus says `blocked: Yes`: pause the IP for the provider until it is not.
    snds_blocked_pauses: bool = True
    #: A DNSBL listing (not a PBL policy listing) pauses the IP for every provider until clear.
    blocklist_pauses: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> SignalPolicy:
        """The spam-rate hold comes before its step-down."""
        if self.spam_rate_hold_percent > self.spam_rate_step_down_percent:
            raise ValueError("spam_rate_hold_percent must not be above spam_rate_step_down_percent")
        return self


class PolicySpec(_Model):
    """The plan's `policy` section."""

    #: Operator reply-rule files, read after the shipped rules (paths relative to the plan).
    rules: list[str] = []
    #: What a classified push-back reply does at once, per class, unless its rule says.
    realtime: dict[PushbackClass, RealtimeAction | Literal["none"]] = {}
    day: DayPolicy = DayPolicy()
    signals: SignalPolicy = SignalPolicy()

    def realtime_action(self, cls: str) -> RealtimeAction | None:
        """The plan's action for a class, else the shipped default; None: no action."""
        action = self.realtime.get(cls, _REALTIME_DEFAULTS.get(cls, "none"))  # type: ignore[call-overload]
        return None if action == "none" else action


# ----- signals: where the evidence comes from -----

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_BYTES = re.compile(r"^\s*([0-9][0-9_]*)\s*([A-Za-z]*)\s*$")
_MIN_BODY_BYTES = 1024
_MAX_BODY_BYTES = 64 * 1024**2
_MAX_DEADLINE_MS = 600_000


def _byte_size(value: object) -> object:
    """`4MiB`, `512 KiB`, `4MB` (decimal) or a whole number of bytes -> bytes."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PydanticCustomError(
            "byte_size",
            "expected a size such as 4MiB, 512KiB or 4194304, got {got}",
            {"got": repr(value)},
        )
    if isinstance(value, int):
        return value
    match = _BYTES.match(value)
    unit = match[2].lower() if match else ""
    if match is None or unit not in _BYTE_UNITS:
        raise PydanticCustomError(
            "byte_size",
            "expected a size such as 4MiB, 512KiB or 4194304 (units B, KB, MB, GB, KiB, MiB, "
            "GiB), got {got}",
            {"got": repr(value)},
        )
    return int(match[1].replace("_", "")) * _BYTE_UNITS[unit]


def _body_bound(value: int) -> int:
    """Between 1 KiB and 64 MiB."""
    if not _MIN_BODY_BYTES <= value <= _MAX_BODY_BYTES:
        raise PydanticCustomError(
            "byte_size_range",
            "must be between 1KiB and 64MiB (1024 to 67108864 bytes), got {got}",
            {"got": value},
        )
    return value


def _deadline_bound(value: int) -> int:
    """At most 10 minutes."""
    if value > _MAX_DEADLINE_MS:
        raise PydanticCustomError(
            "deadline_range", "must be at most 10m, got {got}", {"got": format_ms(value)}
        )
    return value


#: A size in bytes, written `4MiB`, `512KiB`, `4MB` (decimal) or `4194304`.
ByteSize = Annotated[
    int,
    BeforeValidator(_byte_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1},
                {"type": "string", "pattern": r"^\s*[0-9][0-9_]*\s*([KMG]i?B|B|[kmg]i?b|b)?\s*$"},
            ],
            "examples": ["4MiB", "512KiB"],
        }
    ),
]
BodyLimit = Annotated[ByteSize, AfterValidator(_body_bound)]
Deadline = Annotated[Duration, AfterValidator(_deadline_bound)]


def _credential_url(url: str, what: str) -> str:
    """`url` if it may carry `what`: https://, or plain http:// to a loopback host only."""
    problem = credential_url_problem(url, what)
    if problem is not None:
        raise PydanticCustomError("credential_url", "{problem}", {"problem": problem})
    return url


class _Source(_Model):
    """Polling settings every source has."""

    poll_every: Duration = 3_600_000
    #: No good reading for longer than this: the ramps the source covers hold (fail safe).
    stale_after: Duration = 86_400_000


class _HttpSource(_Source):
    """Limits every HTTP source has (see kiln.signals.http)."""

    #: A larger answer is dropped unread as `oversize` (the source counts as failed).
    max_body_bytes: BodyLimit = 4 * 1024**2
    #: One attempt, connect to the last body byte; past it: `timeout` (retried).
    deadline: Deadline = 30_000


class PostmasterSpec(_HttpSource):
    """Google Postmaster Tools (v1 for reputation, v2 for spam and error rates)."""

    #: Google `authorized_user` JSON (client_id, client_secret, refresh_token); keep it 0600.
    credentials: str
    domains: list[str] = Field(min_length=1)
    #: Ramps of these providers are judged on Postmaster data.
    providers: list[ProviderName] = ["google"]
    #: Batches sending for these domains; left out: every batch.
    batches: list[str] | None = None
    api: list[Literal["v1", "v2"]] = ["v1", "v2"]
    base_url: str = "https://gmailpostmastertools.googleapis.com"
    token_url: str = "https://oauth2.googleapis.com/token"  # noqa: S105 (a URL)
    #: Ask for this many days back on each poll (Google's data lags one to two days).
    days_back: Annotated[int, Field(ge=1, le=30)] = 3

    @field_validator("base_url")
    @classmethod
    def _api_https(cls, url: str) -> str:
        """The bearer token goes to the API: https://, or http:// to loopback only."""
        return _credential_url(url, "the OAuth access token")

    @field_validator("token_url")
    @classmethod
    def _token_https(cls, url: str) -> str:
        """The client secret and refresh token go to the token endpoint."""
        return _credential_url(url, "the OAuth client secret and refresh token")


class SndsSpec(_HttpSource):
    """Microsoft SNDS automated data and IP status (legacy CSV feeds)."""

    #: File holding the automated-access key; the key is a secret and is never logged.
    key_file: str
    base_url: str = "https://sendersupport.olc.protection.outlook.com/snds"
    providers: list[ProviderName] = ["microsoft-consumer"]
    stale_after: Duration = 2 * 86_400_000
    days_back: Annotated[int, Field(ge=1, le=30)] = 2

    @field_validator("base_url")
    @classmethod
    def _https(cls, url: str) -> str:
        """The key is part of every URL: https://, or http:// to loopback only."""
        return _credential_url(url, "the SNDS key (part of every request's URL)")


class DnsblSpec(_Source):
    """DNS blocklists, queried for every IP of the plan's batches."""

    zones: list[str] = Field(default=["zen.spamhaus.org"], min_length=1)
    #: DNS servers as `host` or `host:port`; empty: /etc/resolv.conf.
    nameservers: list[str] = []
    poll_every: Duration = 15 * 60_000
    stale_after: Duration = 2 * 3_600_000


class PathSpec(_Model):
    """A log file to follow."""

    path: str


class PostfixSpec(PathSpec):
    """Postfix mail log; each warm-up IP has its own smtp transport with its own syslog_name."""

    syslog_names: dict[str, str] = Field(min_length=1)


class KumoSpec(_Model):
    """KumoMTA JSON log directory (zstd segments)."""

    log_dir: str
    #: egress_source name -> IP, for records without a source_address.
    egress_sources: dict[str, str] = {}


class FeedbackSpec(_Model):
    """Delivery results read from the MTAs' own logs and from complaint reports."""

    postfix: PostfixSpec | None = None
    powermta: PathSpec | None = None
    kumomta: KumoSpec | None = None
    #: Maildir receiving ARF complaint reports (Yahoo's feedback loop).
    arf_maildir: str | None = None


class Signals(_Model):
    """The plan's `signals` section: every source is optional."""

    postmaster: PostmasterSpec | None = None
    snds: SndsSpec | None = None
    dnsbl: DnsblSpec | None = None
    feedback: FeedbackSpec | None = None


def _status_prefix(value: str) -> str:
    """An enhanced status code or its start: `4.2.2`, `4.2.`, `5.2.2`."""
    if not re.fullmatch(r"[245](\.\d{1,3}(\.(\d{1,3})?)?)?\.?", value):
        raise PydanticCustomError(
            "status_prefix",
            "expected an enhanced status code or its start, such as 4.2.2 or 4.2., got {got}",
            {"got": repr(value)},
        )
    return value


StatusPrefix = Annotated[str, AfterValidator(_status_prefix)]


class SoftBounceRule(_Model):
    """Temporary failures that put a recipient on the suppression list for a while (the
    "cache with an expire field"): `failures` replies whose enhanced status starts with one
    of `statuses`, for the same recipient within `within`, list it as a soft bounce for
    `hold`."""

    statuses: list[StatusPrefix] = Field(min_length=1)
    failures: int = Field(ge=1, le=1000)
    within: Duration
    hold: Duration


#: Mailbox full or disabled, three times in three days: off the list after a week.
DEFAULT_SOFT_BOUNCES = [
    SoftBounceRule(
        statuses=["4.2.1", "4.2.2", "5.2.2"],
        failures=3,
        within="3d",  # type: ignore[arg-type]
        hold="7d",  # type: ignore[arg-type]
    )
]


class SuppressionSpec(_Model):
    """The plan's `suppression` section (docs/suppression.md)."""

    #: Rules tried in order; the first that an address's failures meet lists it.
    soft_bounces: list[SoftBounceRule] = DEFAULT_SOFT_BOUNCES
    #: New events of the log keep no address: only its keyed hash (docs/suppression.md,
    #: "Hashed-only mode"); evidence text has its addresses replaced by `<address>`.
    hashed_only: bool = False
    #: A file holding the hash key (32 hexadecimal characters), relative to the plan's
    #: folder: the key is then never written to the store. Read at start only.
    key_file: str | None = Field(default=None, min_length=1)
