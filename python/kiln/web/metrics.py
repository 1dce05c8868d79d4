"""Prometheus metrics, read from the daemon when scraped (nothing is counted on the decision
path; docs/http.md lists every metric).

Labels are bounded by the plan: `ip` x `provider` over the plan's warming IPs and providers,
`batch` x `provider`, `pool` x `provider`, `source` (three) and automation `kind` (five).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kiln.automation import Kind
from kiln.mtashape import shape_of
from kiln.ramp import plan_providers
from kiln.rampday import ramp_view

if TYPE_CHECKING:
    from kiln.daemon.core import Daemon

__all__ = ["METRIC_NAMES", "KilnCollector", "metrics_handler"]

KINDS: tuple[Kind, ...] = ("suspend", "slow", "pause", "hold", "step_down")
STATES = ("warming", "done", "not_started", "paused", "held")


class KilnCollector(Collector):
    """Every metric, from the daemon's state at scrape time (on the engine's thread)."""

    def __init__(self, d: Daemon) -> None:
        self.d = d

    def collect(self) -> Iterator[Metric]:
        """The metrics now."""
        d = self.d
        now_ms = d.clock.now_ms()
        yield from self._keys(now_ms)
        yield from self._ramps(now_ms)
        autos = GaugeMetricFamily("kiln_automations", "live automations by kind", labels=["kind"])
        live = d.guard.book.live(now_ms)
        for kind in KINDS:
            autos.add_metric([kind], sum(1 for a in live if a.kind == kind))
        yield autos
        yield from self._signals(now_ms)
        yield from self._wire()
        yield from self._totals()
        yield from self._answer_times()

    def _totals(self) -> Iterator[Metric]:
        """Decisions and outcomes per key since the start, and reply classes."""
        d = self.d
        outcomes = CounterMetricFamily(
            "kiln_messages",
            "messages per (IP, provider) since the start: granted, delivered, deferred, "
            "bounced, complaint",
            labels=["ip", "provider", "result"],
        )
        for (ip, provider, result), n in sorted(d.outcome_totals.items()):
            outcomes.add_metric([ip, provider, result], n)
        yield outcomes
        denials = CounterMetricFamily(
            "kiln_denials",
            "denied acquire and pick decisions per (IP, provider) by reason",
            labels=["ip", "provider", "reason"],
        )
        for ip, provider, reason, n in sorted(d.engine.denial_counts()):
            denials.add_metric([ip, provider, reason], n)
        yield denials
        classes = CounterMetricFamily(
            "kiln_replies",
            "remote replies reported, by provider and push-back class (unclassified: none)",
            labels=["provider", "class"],
        )
        for (provider, cls), n in sorted(d.reply_classes.items()):
            classes.add_metric([provider, cls], n)
        yield classes

    def _answer_times(self) -> Iterator[Metric]:
        """How long the core took to answer each read, per listener (one request, or
        several pipelined)."""
        d = self.d
        h = HistogramMetricFamily(
            "kiln_answer_seconds",
            "time the core took to answer one read buffer on each listener",
            labels=["listener"],
        )
        servers = (
            ("native", d.mta.server if d.mta is not None else None),
            ("postfix", d.postfix_server),
            ("resp", d.resp_server),
            ("resp-tcp", d.resp_tcp_server),
        )
        for name, server in servers:
            if server is None:
                continue
            c = server.counters()
            bounds = [b / 1e9 for b in c["answer_bucket_bounds_ns"]] + [float("inf")]
            running, buckets = 0, []
            for bound, n in zip(bounds, c["answer_buckets"], strict=True):
                running += n
                buckets.append((repr(bound) if bound != float("inf") else "+Inf", running))
            h.add_metric([name], buckets, c["answer_sum_ns"] / 1e9)
        yield h

    def _keys(self, now_ms: int) -> Iterator[Metric]:
        """Caps, use, room and state of each warming (IP, provider) key."""
        d = self.d
        caps = GaugeMetricFamily(
            "kiln_cap_messages",
            "cap in force per warming key and window (hour, day), slow-downs applied",
            labels=["ip", "provider", "window"],
        )
        used = GaugeMetricFamily(
            "kiln_used_messages",
            "messages granted per warming key in the current window (hour, day)",
            labels=["ip", "provider", "window"],
        )
        room = GaugeMetricFamily(
            "kiln_room_messages_per_hour",
            "what the key may send per hour from now (0: held); kiln render's rate",
            labels=["ip", "provider"],
        )
        held = GaugeMetricFamily(
            "kiln_key_held",
            "1 while the key may send nothing, by why (paused, suspended, ...)",
            labels=["ip", "provider", "reason"],
        )
        for k in shape_of(d.engine, d.plan, now_ms).keys:
            u = d.engine.usage(d.engine.key(k.ip, k.provider))
            for window, cap, use in (
                ("hour", k.hourly_cap, u["hour_used"]),
                ("day", k.daily_cap, u["day_used"]),
            ):
                if cap is not None:
                    caps.add_metric([k.ip, k.provider, window], cap)
                used.add_metric([k.ip, k.provider, window], use)
            if k.per_hour is not None:
                room.add_metric([k.ip, k.provider], k.per_hour)
            if k.per_hour == 0:
                held.add_metric([k.ip, k.provider, k.bound or "unknown"], 1)
        yield from (caps, used, room, held)

    def _ramps(self, now_ms: int) -> Iterator[Metric]:
        """Step and state of each (batch, provider) ramp."""
        d = self.d
        step = GaugeMetricFamily(
            "kiln_ramp_step", "ramp step (1-based)", labels=["batch", "provider"]
        )
        steps = GaugeMetricFamily(
            "kiln_ramp_steps", "steps in the ramp's curve", labels=["batch", "provider"]
        )
        state = GaugeMetricFamily(
            "kiln_ramp_state", "1 for the ramp's state", labels=["batch", "provider", "state"]
        )
        stuck = GaugeMetricFamily(
            "kiln_ramp_days_without_advance",
            "held days since the ramp last advanced",
            labels=["batch", "provider"],
        )
        today = d.plan_day(now_ms)
        for batch in d.plan.batches:
            for provider in plan_providers(d.plan):
                v = ramp_view(d.plan, d.states, batch, provider, today)
                step.add_metric([batch, provider], v.step)
                steps.add_metric([batch, provider], v.steps)
                state.add_metric([batch, provider, v.shown_state], 1)
                stuck.add_metric([batch, provider], v.ramp.days_without_advance)
        yield from (step, steps, state, stuck)

    def _signals(self, now_ms: int) -> Iterator[Metric]:
        """Health of each configured signal source."""
        d = self.d
        stale_now = d.guard.policy.stale_sources(d.guard.signals, now_ms)
        stale = GaugeMetricFamily(
            "kiln_signal_source_stale", "1 while the source holds its ramps", labels=["source"]
        )
        age = GaugeMetricFamily(
            "kiln_signal_last_good_age_seconds",
            "seconds since the source's last good reading",
            labels=["source"],
        )
        failures = GaugeMetricFamily(
            "kiln_signal_failures", "failed polls since the last good one", labels=["source"]
        )
        s = d.plan.signals
        for name, spec in (("postmaster", s.postmaster), ("snds", s.snds), ("dnsbl", s.dnsbl)):
            if spec is None:
                continue
            h = d.guard.signals.health.get(name)
            stale.add_metric([name], 1 if name in stale_now else 0)
            if h is not None and h.last_good_ms is not None:
                age.add_metric([name], (now_ms - h.last_good_ms) / 1000)
            failures.add_metric([name], h.failures if h is not None else 0)
        yield from (stale, age, failures)

    def _wire(self) -> Iterator[Metric]:
        """Protocol counters and connections."""
        d = self.d
        w = d.engine.wire_stats()
        decisions = CounterMetricFamily(
            "kiln_decisions", "acquire and pick decisions by result", labels=["result"]
        )
        decisions.add_metric(["granted"], w["granted"])
        decisions.add_metric(["denied"], w["denied"])
        yield decisions
        for name, key, text in (
            ("kiln_requests", "requests", "requests answered on the native protocol"),
            ("kiln_request_errors", "errors", "error replies from the core"),
            ("kiln_reports_dropped", "reports_dropped", "push-back reports not kept"),
        ):
            c = CounterMetricFamily(name, text)
            c.add_metric([], w[key])
            yield c
        r = d.engine.resp_stats()
        resp = CounterMetricFamily(
            "kiln_resp_commands", "Redis-protocol commands by outcome", labels=["outcome"]
        )
        resp.add_metric(["answered"], r["commands"] - r["errors"])
        resp.add_metric(["error"], r["errors"])
        yield resp
        keys = GaugeMetricFamily("kiln_resp_throttle_keys", "CL.THROTTLE keys held")
        keys.add_metric([], r["throttle_keys"])
        yield keys
        conns = GaugeMetricFamily("kiln_connections", "open client connections")
        conns.add_metric([], d.open_connections)
        yield conns
        routes = GaugeMetricFamily("kiln_routes", "domains with a known provider")
        routes.add_metric([], d.engine.route_count())
        yield routes
        waiting = GaugeMetricFamily(
            "kiln_queue_waiting",
            "held messages waiting per pool and provider",
            labels=["pool", "provider"],
        )
        if d.postfix is not None:
            for q in d.postfix.queue(d.clock.now_ms()):
                waiting.add_metric([str(q["pool"]), str(q["provider"])], float(str(q["waiting"])))
        yield waiting


#: Every metric name as scraped (counters with `_total`), for docs and checks.
METRIC_NAMES = (
    "kiln_automations",
    "kiln_cap_messages",
    "kiln_used_messages",
    "kiln_room_messages_per_hour",
    "kiln_key_held",
    "kiln_ramp_step",
    "kiln_ramp_steps",
    "kiln_ramp_state",
    "kiln_ramp_days_without_advance",
    "kiln_signal_source_stale",
    "kiln_signal_last_good_age_seconds",
    "kiln_signal_failures",
    "kiln_decisions_total",
    "kiln_requests_total",
    "kiln_request_errors_total",
    "kiln_reports_dropped_total",
    "kiln_resp_commands_total",
    "kiln_resp_throttle_keys",
    "kiln_connections",
    "kiln_routes",
    "kiln_queue_waiting",
    "kiln_messages_total",
    "kiln_denials_total",
    "kiln_replies_total",
    "kiln_answer_seconds",
)


def metrics_handler(d: Daemon) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The /metrics handler: a registry of its own holding kiln's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KilnCollector(d))

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    return metrics
