"""kiln's Rust engine (hand-written stub of rust/src/bindings/; checked by stubtest).

Time is always an argument: integer milliseconds since the epoch (`now_ms`). Being
throttled is a `Decision`, never an exception; `CoreError` is for bad input only.
"""

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final, Literal, final

from typing_extensions import Buffer

__all__ = [
    "MAX_LINE_BYTES",
    "MAX_NOW_MS",
    "BatchDecisions",
    "CompiledRules",
    "CoreError",
    "Decision",
    "Engine",
    "LatestRows",
    "MtaServer",
    "Served",
    "__version__",
    "all_normal_addresses",
    "check_pattern",
    "evidence_json",
    "normalise_reply",
    "split_csv_lines",
    "unix_times_ms",
]

__version__: Final[str]
MAX_NOW_MS: Final[int]
"""Largest `now_ms` the engine accepts (year 2255)."""
MAX_LINE_BYTES: Final[int]
"""Longest request line of the native protocol (64 KiB); a longer one closes the connection."""

Reason = Literal[
    "granted",
    "paused",
    "suspended",
    "daily_cap",
    "hourly_cap",
    "ip_daily_cap",
    "ip_hourly_cap",
    "rate",
    "reservation",
    "retired",
    "outside_active_hours",
]
Tier = Literal["direct", "warming", "warm", "overflow"]
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
"""Push-back classes, most severe first (docs/rules.md, "Classes, scopes and who wins")."""
ReplyScope = Literal["ip", "netblock", "domain", "url", "recipient", "message"]
RuleTuple = tuple[
    str,
    Sequence[str] | None,
    Sequence[int | str] | None,
    Sequence[str] | None,
    str,
    PushbackClass,
    ReplyScope,
    bool,
]
"""(id, providers, codes, enhanced, text, class, scope, fallback) of one reply rule for
`set_rules`."""
Classified = (
    tuple[PushbackClass, ReplyScope, str, tuple[str, ...]]
    | tuple[Literal["internal"], None, None, tuple[()]]
)
"""(class, scope, rule_id, matched_ids), or ("internal", None, None, ()) for a reply the
MTA made up itself."""

class CoreError(ValueError):
    """Bad input to the kiln engine: an argument out of range, an unknown handle or name,
    or a corrupt snapshot. Being throttled is never an error."""

@final
class Decision:
    """A decision: granted (how many, on which IP) or denied (why, and when to ask again)."""

    @property
    def granted(self) -> int:
        """Messages granted: the full `n` asked for, or 0 when denied."""
    @property
    def reason(self) -> Reason:
        """Why: "granted", or the first holding limit (paused, retired, outside_active_hours,
        suspended, daily_cap, hourly_cap, ip_daily_cap, ip_hourly_cap, rate, reservation)."""
    @property
    def retry_after_ms(self) -> int | None:
        """0 when granted; when denied, the earliest ms after which the same request is
        granted if nothing else is granted meanwhile and no limit changes (the start of the
        next active hour if the other limits would free it outside the key's active hours),
        or None when no scheduled event frees it (paused, retired, too large, no calendar
        boundary or active hour supplied that far)."""
    @property
    def key(self) -> int:
        """The key handle charged (or, for a denial, the one that held it back)."""
    @property
    def ip(self) -> str:
        """The sending IP of that key."""
    @property
    def tier(self) -> Tier:
        """For `pick`: "warming", "warm" or "overflow"; "direct" for `acquire` and denials."""
    def __bool__(self) -> bool:
        """True when granted."""
    def __eq__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class BatchDecisions:
    """The decisions of one `Engine.acquire_batch` call, in request order."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: int, /) -> Decision: ...
    def __iter__(self) -> Iterator[Decision]: ...
    @property
    def granted(self) -> int:
        """Total messages granted across the batch."""
    @property
    def denied(self) -> int:
        """How many requests were denied."""
    def granted_counts(self) -> list[int]:
        """Granted count per request, in order."""

@final
class Served:
    """What one `Engine.serve` call produced."""

    @property
    def reply(self) -> bytes:
        """Reply lines for the requests answered, in order (write them before anything else)."""
    @property
    def consumed(self) -> int:
        """Input bytes used; keep the rest and call again when more data arrives."""
    @property
    def upcall(self) -> bytes | None:
        """A request line (without newline) Python must answer next, or None."""
    @property
    def too_long(self) -> bool:
        """A line longer than 64 KiB starts at `consumed`: write `reply`, then close."""

@final
class MtaServer:
    """The MTA socket served on a thread of the core's own: decisions never wait for Python
    or the GIL. Upcalls are taken with `take_upcalls` when `notify_fd` is readable and
    answered with `reply`."""

    def __new__(
        cls,
        engine: Engine,
        path: str,
        *,
        backlog: int,
        max_connections: int,
        clock: tuple[int, int, int, int, int] | None = None,
        protocol: str = "native",
        tcp: bool = False,
    ) -> MtaServer:
        """Bind `path` (which must not exist) and serve it with `engine`. `clock`: None for
        the system clock, or (start_ms, num, den, anchor_ns, monotonic_ns_now) of a
        ScaledClock. `protocol`: "native" (JSON lines), "socketmap" (Postfix's transport
        lookups), "socketmap-echo" (a benchmark's baseline: `OK echo:` to everything,
        nothing decided) or "resp" (the Redis protocol: `CL.THROTTLE`, `KILN.ACQUIRE`, ...).
        `tcp`: `path` is a TCP address to listen on instead (`127.0.0.1:6380`, `[::1]:0`)."""
    def tcp_port(self) -> int | None:
        """The TCP port served (the system's choice for port 0); None on a Unix socket."""
    def notify_fd(self) -> int:
        """A descriptor that becomes readable when upcalls wait."""
    def take_upcalls(self) -> list[tuple[int, bytes]]:
        """The upcalls waiting: [(connection, request line)], oldest first."""
    def reply(self, conn: int, data: bytes) -> None:
        """The reply (whole lines) to connection `conn`'s upcall."""
    def counters(self) -> dict[str, Any]:
        """connections, refused, accept_failures, last_error, running, and the answer-time
        histogram: answer_bucket_bounds_ns, answer_buckets (one more: longer), answer_sum_ns."""
    def stop(self) -> None:
        """Stop serving: connections closed, the thread joined."""

Report = tuple[int, str, str, str, int, int | None, str | None, str | None]
"""(at_ms, ip, provider, result, n, code, enhanced, text) of one `report` that was not a
delivery."""
Tally = tuple[str, str, int, int, int, int, int]
"""(ip, provider, granted, delivered, deferred, bounced, complaints) of one key."""

@final
class Engine:
    """The throttle engine: every limit, counter, pool and queued message of one daemon.

    Keys are (sending IP, provider) pairs interned to integer handles; hot calls take
    handles. Each key has a GCRA rate, an hourly and a daily cap (calendar windows whose
    boundaries Python supplies with `set_calendar`), a suspension deadline, a pause flag and
    a multiplier. IPs may also be capped across providers.

    Thread safety: engine work holds an internal lock and touches no Python object while it
    does; a caller that finds the lock taken waits with the GIL released. Any thread may call
    (no deadlock with the GIL), but the daemon calls only from its event loop (`pin_thread`).
    """

    def __init__(self) -> None: ...
    def pin_thread(self) -> None:
        """Refuse every later call from a thread other than the caller's (`CoreError`): the
        daemon pins its engine to the event loop's thread, so a job that strays onto a worker
        thread fails loudly instead of contending for the lock."""
    def key(self, ip: str, provider: str) -> int:
        """The handle of (ip, provider), interned on first use. IP text is normalised."""
    def key_info(self, key: int) -> tuple[str, str]:
        """(ip, provider) of a key handle."""
    def key_count(self) -> int:
        """How many keys this engine holds."""
    def provider(self, name: str) -> int:
        """The handle of a provider name, interned on first use."""
    def set_limits(
        self,
        key: int,
        *,
        rate_count: int | None = None,
        rate_period_ms: int | None = None,
        max_burst: int = 1,
        hourly_cap: int | None = None,
        daily_cap: int | None = None,
        active_hours: int | None = None,
    ) -> None:
        """Set a key's rate (`rate_count` per `rate_period_ms`, up to `max_burst` at once),
        caps and active hours (a mask of local hours, bit h for the hour from h:00; None:
        every hour): outside them the key is denied "outside_active_hours". Its multiplier,
        pause, counters and suspension stay."""
    def set_multiplier(self, key: int, multiplier: float) -> None:
        """Slow a key to a fraction (0..1) of its rate and caps; 0 pauses it, 1 restores it."""
    def pause(self, key: int) -> None:
        """Pause a key: every request is denied with reason "paused" until `resume`."""
    def resume(self, key: int) -> None:
        """Lift a pause."""
    def suspend(self, key: int, until_ms: int) -> None:
        """Deny a key until `until_ms` (replaces any earlier deadline; 0 lifts it)."""
    def set_ip_caps(
        self, ip: str, *, hourly_cap: int | None = None, daily_cap: int | None = None
    ) -> None:
        """Cap an IP's total across all providers per calendar hour and day."""
    def set_calendar(
        self,
        hour_starts_ms: Sequence[int],
        day_starts_ms: Sequence[int],
        hours_of_day: Sequence[int] | None = None,
    ) -> None:
        """The instants (ms) at which coming calendar hours and days begin, strictly
        increasing, and the local hour of day (0..23) each hour start begins, which active
        hours are read against (None: unknown, and a key with active hours is closed). Without
        a next boundary the current window goes on (never resets early)."""
    def acquire(self, key: int, n: int, now_ms: int) -> Decision:
        """May `key` send `n` more at `now_ms`? All or nothing; charged when granted."""
    def acquire_batch(
        self, keys: Buffer, now_ms: int, counts: Buffer | None = None
    ) -> BatchDecisions:
        """Decide many requests at one `now_ms`: `keys` (and `counts`, default 1 each) are
        buffers of unsigned 32-bit ints, e.g. `array('I')`. Nothing is decided if any is bad."""
    def define_pool(
        self, name: str, members: Sequence[tuple[str, int, bool]], overflow: str | None = None
    ) -> int:
        """Define (or redefine) a pool of (ip, weight, warming) members with an optional
        overflow pool; returns its handle."""
    def pool(self, name: str) -> int:
        """The handle of a defined pool."""
    def pick(self, pool: int, provider: int, n: int, now_ms: int) -> Decision:
        """Choose and charge the IP of `pool` that carries `n` messages to `provider`:
        a warming IP with room, else a warm IP by weight, else the overflow pool."""
    def usage(self, key: int) -> dict[str, Any]:
        """A key's limits and counters, as plain data."""
    def enqueue(
        self, message_id: int, pool: int, provider: int, priority: int = 0, n: int = 1
    ) -> None:
        """Hold message `message_id` for (pool, provider); higher priority goes first."""
    def due(self, now_ms: int, max: int) -> list[tuple[int, Decision]]:
        """Release up to `max` held messages that may go at `now_ms`: (message_id, Decision)."""
    def next_due_ms(self, now_ms: int) -> int | None:
        """When `due` may next release something (>= now_ms), or None."""
    def queued(self) -> int:
        """How many messages are held."""
    def queue_entries(self) -> list[tuple[int, int, int, int, int]]:
        """Every held message as (message_id, pool, provider, priority, n), oldest first."""
    def queue_summary(self, now_ms: int) -> list[tuple[str, str, int, int | None]]:
        """Every queue holding messages as (pool, provider, messages, next release ms or None:
        waiting for limits to change), by name."""
    def postfix_configure(self, transports: list[tuple[str, str]], nexthop: str) -> None:
        """Postfix's transport table (`MtaServer(protocol="socketmap")`): the `master.cf`
        transport of each sending IP as (ip, transport), and the next hop every answer names
        ("" for the recipient's domain)."""
    def postfix_prepay(self, recipient: str, ip: str, expires_ms: int) -> bool:
        """Keep a grant the release queue made on `ip` for `recipient`'s next transport
        lookup, until `expires_ms`. False when too many already wait."""
    def postfix_prepaid(self, recipient: str) -> int:
        """Grants waiting for `recipient`'s next transport lookup."""
    def postfix_expire(self, now_ms: int) -> int:
        """Drop the prepaid grants that lapsed by `now_ms`; returns how many."""
    def postfix_stats(self) -> dict[str, int]:
        """The transport table's counters, and the prepaid grants waiting (`prepaid_waiting`)."""
    def snapshot(self) -> dict[str, Any]:
        """Everything the engine holds, as plain data (dicts, lists, tuples, ints, strings)."""
    def restore(self, state: Mapping[str, Any]) -> None:
        """Replace all state with a snapshot (from `snapshot()`, or the same data read back
        from JSON; versions 1 and 2 still restore). On any error the engine is unchanged."""
    def snapshot_bytes(self) -> bytes:
        """Everything the engine holds, as compact bytes (for frequent flushes to the store).
        Reserves nothing: restoring it charges nothing extra."""
    def reservation_snapshot(
        self, now_ms: int, ahead_ms: int, *, floor: int = 10
    ) -> tuple[bytes, int]:
        """`snapshot_bytes()` that also reserves, and its token: every capped key gets a block
        (what it may be granted until a little after the next snapshot: `ahead_ms` of its
        rate and burst plus `floor`, at least twice what it was granted since the previous
        reservation snapshot, at most what its caps still allow by then), and is held to it
        from now on. Write the bytes durably, then call `commit_reservation(token, ...)`.
        Rolls the calendar to `now_ms` first."""
    def commit_reservation(self, token: int, retry_ms: int) -> bool:
        """The reservation snapshot of `token` is durable: from now on each key may be granted
        at most its block more than it had been granted when that snapshot was taken; a
        request past that is denied, reason "reservation", `retry_after_ms = retry_ms` (the
        time to the next commit, roughly). True if it took effect; false if `token` is not the
        latest reservation snapshot's (an older or unknown token is ignored, which is always
        safe)."""
    def restore_bytes(self, data: bytes, now_ms: int | None = None) -> None:
        """Replace all state with `snapshot_bytes()` or `reservation_snapshot()` output. With
        `now_ms`: roll the calendar to `now_ms` and, for a reservation snapshot, charge every
        key's block to the windows current then (what it may have been granted between the
        snapshot and a crash). After a reservation snapshot is restored, capped keys are
        granted nothing until the next `commit_reservation`. On any error the engine is
        unchanged."""
    def retain_ips(self, ips: Sequence[str]) -> list[str]:
        """Keep only `ips` as sending IPs (the plan's): every other IP is retired, so the native
        protocol answers it as an IP this daemon never had, and its keys never grant
        (reason "retired"); a listed IP that was retired comes back. Counters and limits are
        kept. Returns the IPs this call retired. A bad address changes nothing."""
    def retain_pools(self, names: Sequence[str]) -> list[str]:
        """Keep only the pools named in `names`: every other pool is retired, and `pick`
        answers it as a pool it never heard of, as a fresh engine would; defining it again
        brings it back. Returns the names this call retired."""
    def serve(self, data: bytes, now_ms: int) -> Served:
        """Answer every complete JSON line of `data` at `now_ms`, in one call."""
    def set_default_provider(self, name: str) -> None:
        """The provider every domain without a route counts as (interned on first use)."""
    def set_upcall_ops(self, ops: Sequence[str]) -> None:
        """The operations Python answers: `serve` hands their lines back as `upcall`."""
    def set_route(self, domain: str, provider: str | None, expires_ms: int) -> None:
        """Route a recipient domain to `provider` (None: null MX, accepts no mail) until
        `expires_ms`; after that the route still holds and the domain is queued for lookup."""
    def clear_routes(self) -> None:
        """Forget every route."""
    def route_count(self) -> int:
        """How many domains have a route."""
    def route(self, domain: str, now_ms: int) -> str | None:
        """The provider of `domain` at `now_ms` (None: null MX); unknown domains count as the
        default provider and are queued for lookup."""
    def take_unresolved(self) -> list[str]:
        """Domains that need an MX lookup, seen since the last call."""
    def take_tallies(self) -> list[Tally]:
        """Per-key counts since the last call."""
    def take_reports(self) -> list[Report]:
        """Reports other than deliveries since the last call, in order."""
    def resp_stats(self) -> dict[str, int]:
        """The Redis-protocol sockets' counters (commands, errors, throttled) and the
        `CL.THROTTLE` keys they hold (throttle_keys, throttle_bytes)."""
    def route_table(
        self, domain: str | None = None, limit: int = 100
    ) -> tuple[tuple[int, int, int], list[tuple[str, str | None, int | None]]]:
        """The route table for an operator: (held, pinned, bound on learned routes) and
        entries [(domain, provider or None for a null MX, expires_ms or None for a plan
        route)]: `domain`'s alone, or up to `limit` (at most 10,000) in the table's order."""
    def suppress_set_key(self, k0: int, k1: int) -> None:
        """Start an empty suppression set keyed with (k0, k1); refused while it holds
        addresses hashed with another key."""
    def suppress_fingerprint(self, address: str, scope: str = "") -> tuple[str, int]:
        """The address as the list keeps it and its fingerprint in `scope`; CoreError for a
        malformed address."""
    def suppress_fingerprints(
        self, items: Sequence[tuple[str, str]]
    ) -> list[tuple[str | None, int, str | None]]:
        """`suppress_fingerprint` for many (address, scope): (address, fingerprint, None) or
        (None, 0, the problem) each."""
    def suppress_fingerprint_column(
        self, addresses: str, scope: str = "", scopes: list[str] | None = None
    ) -> tuple[bytes, list[tuple[int, str]]]:
        """Fingerprints of addresses joined by line breaks, in `scope` or each in its own
        (`scopes`): native-endian u64s, 0 where refused, and the refusals (row, problem)."""
    def suppress_apply(self, events: Sequence[tuple[int, str, int | None]]) -> int:
        """Fold (fingerprint, event, expires_ms) into the set in order (`remove` takes an
        address off); how many changed whether they are listed."""
    def suppress_apply_column(
        self,
        fingerprints: bytes,
        codes: bytes,
        names: list[str],
        expires: list[int | None] | None = None,
    ) -> int:
        """`suppress_apply` for columns: native-endian u64 fingerprints, one code a row
        indexing `names` (events, or "remove"), each row's expiry (None: none has one)."""
    def suppress_check(
        self, addresses: list[str], now_ms: int, scope: str = ""
    ) -> list[str | None]:
        """Per address: the event that suppresses it at `now_ms`, None, or "invalid"."""
    def suppressed(self, address: str, now_ms: int, scope: str = "") -> str | None:
        """The event that suppresses one address at `now_ms` (global list, or `scope`'s), or
        None; CoreError when it is not an address. Allocates nothing for the usual address."""
    def suppress_stats(self) -> tuple[int, int]:
        """(addresses listed, bytes the set takes)."""
    def suppress_sweep(self, now_ms: int) -> int:
        """Drop soft bounces expired at `now_ms`; how many."""
    def suppress_snapshot(self) -> bytes:
        """The set as bytes."""
    def suppress_restore(self, data: bytes) -> int:
        """Replace the set with a snapshot made with the current key; how many it holds."""
    def denial_counts(self) -> list[tuple[str, str, str, int]]:
        """Denied acquire and pick decisions since the engine was made: (ip, provider,
        reason, count)."""
    def wire_stats(self) -> dict[str, int]:
        """Protocol counters since the engine was made (for metrics)."""
    def set_rules(self, rules: Sequence[RuleTuple]) -> None:
        """Replace the reply rules: a sequence of (id, providers, codes, enhanced, text, class,
        scope, fallback). `providers` (names, groups already expanded), `codes` (ints such as
        421, or "4xx"/"5xx") and `enhanced` ("4.7.28") are lists or None (any); `text` is a regex
        matched case-insensitively against the normalised reply; a `fallback` rule wins only
        when no other rule matched. On error (naming the rule id) the rules in force stay.
        The rules are compiled before the engine's lock is taken, with the GIL released."""
    def use_rules(self, rules: CompiledRules) -> None:
        """Put rules compiled by `CompiledRules(...)` in force: a pointer swap, no compiling."""
    def rule_count(self) -> int:
        """How many reply rules are in force."""
    def classify(
        self, provider: str | None, code: int | None, enhanced: str | None, text: str
    ) -> Classified | None:
        """Classify an SMTP reply: (class, scope, rule_id, matched_ids) of the most severe
        matching rule, ("internal", None, None, ()) for a reply the MTA made up itself, or
        None when no rule matches. `provider` None lets every rule apply; a name, only rules
        without providers and those listing it. `code`/`enhanced` missing are read from the
        start of `text` (a raw reply such as "421-4.7.28 ...")."""

@final
class CompiledRules:
    """Reply rules compiled away from any engine: on any thread, with the GIL released, so a
    reload compiles them on a worker and the event loop only swaps them in (`use_rules`)."""

    def __new__(cls, rules: Sequence[RuleTuple]) -> CompiledRules:
        """Compile rules given as `Engine.set_rules` takes them (CoreError naming the rule id)."""
    def __len__(self) -> int: ...

@final
class LatestRows:
    """Each fingerprint's event code in its latest row of one import file so far: which
    rows of the file change anything, a batch of rows at a time."""

    def __new__(cls) -> LatestRows: ...
    def __len__(self) -> int: ...
    def rows(
        self, fingerprints: bytes, codes: bytes, refused: list[int]
    ) -> tuple[bytes, bytes, int]:
        """(keep, first, duplicates) for the next rows in file order: a byte of 0 or 1 a
        row for "keep it" and "the file's first row of its address", and how many rows
        repeat their address's latest event."""

def normalise_reply(code: int | None, enhanced: str | None, text: str) -> str:
    """The single-line form `CODE ENH text` of an SMTP reply, as rules see it: lines joined,
    repeated continuation prefixes (`421-4.7.28`) dropped, whitespace collapsed. `code` and
    `enhanced` missing are read from the start of `text`."""

def check_pattern(pattern: str) -> str | None:
    """Why `pattern` is not a valid rule regex (as `Engine.set_rules` compiles it), or None."""

def split_csv_lines(
    data: bytes,
    start_byte: int,
    delimiter: str,
    width: int,
    max_rows: int,
    max_line_bytes: int,
) -> tuple[int, int, list[list[str | None]], list[bool]]:
    """The lines of `data` from `start_byte` as `csv.reader` splits them (default dialect,
    `delimiter`), at most `max_rows`, stopping before the first line it leaves to `csv`:
    not UTF-8, blank or all blank cells, a quoted line break, a stray carriage return, NUL,
    or over `max_line_bytes`. Returns (rows, end_byte, columns, trimmed): `width` columns of
    one cell a row (None past a short row's end), the offset after the last line taken, and
    per column whether every cell is there and unchanged by `str.strip`."""

def evidence_json(
    kind: str,
    lines: list[int],
    texts: list[tuple[str, list[str]]],
    numbers: list[tuple[str, list[int | None]]],
    max_text_chars: int,
) -> list[str] | None:
    """Each row's evidence as `json.dumps({"kind": kind, "line": line, ...}, sort_keys=True)`
    writes it: `texts` (name, one text a row) left out where empty and cut to
    `max_text_chars` characters (one fewer and an ellipsis), `numbers` (name, one int or None
    a row) left out where None. None when a value cannot be read here (not a str, a lone
    surrogate, an int past 64 bits): the caller then builds the JSON itself."""

def all_normal_addresses(texts: list[str]) -> bool:
    """Whether every text is an address `normalise` keeps as it is (`address.is_normal`);
    False when any is not (or is not a `str`), which says nothing about the others."""

def unix_times_ms(texts: list[Any]) -> list[int | None] | None:
    """A column of Unix times written as digits (seconds, or milliseconds from 10^11), trimmed
    as `str.strip` trims; '' gives None. None for a column holding anything else."""

def _panic_for_tests() -> None:
    """Panics on purpose, so tests can show a Rust panic reaches Python as an exception."""
