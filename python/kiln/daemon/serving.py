"""Serving: both sockets, the jobs, liveness, and a clean stop.

`serve` runs until SIGTERM/SIGINT: it listens on the MTA and operator sockets, starts the jobs,
the loop monitor and the watchdog feed, says READY to systemd, and on the way out writes exact
counters and removes the sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln import _core
from kiln.daemon.jobs import start_jobs
from kiln.daemon.listener import (
    RESOURCE_ERRNOS,
    NativeProtocol,
    listen_backlog,
    prepare_socket_path,
    set_socket_access,
)
from kiln.daemon.mta import RustMtaSocket, clock_spec
from kiln.store import StoreError

if TYPE_CHECKING:
    from kiln.daemon.core import Daemon

__all__ = ["engine_answers", "loop_exception", "serve", "shutdown"]

#: How long a thread runs Python before it must offer the GIL (CPython's default: 5 ms). The
#: store thread, the log parser and the signal parsers run Python beside the loop; with the
#: default, a decision arriving meanwhile could wait 5 ms for the GIL (docs/daemon.md).
SWITCH_INTERVAL_S = 0.0005


async def serve(d: Daemon) -> None:
    """Listen, run the jobs, and stop cleanly on SIGTERM/SIGINT; SIGHUP reloads."""
    loop = asyncio.get_running_loop()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    stopping = d.stopping = asyncio.Event()
    d.job_lock = asyncio.Lock()
    d.persist.start_thread()
    d.signal_loop.start()
    loop.set_exception_handler(lambda lp, ctx: loop_exception(d, lp, ctx))
    d.lookups = d.make_lookups()
    # Signals first, the MTA socket last: once the MTA socket answers (the Rust thread
    # answers at once) a SIGTERM must stop the daemon cleanly, and the operator socket and
    # the jobs must already be there.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, d.reload_on_signal)
    backlog = listen_backlog()
    config = d.config
    d.servers.append(await _listen(d, config.operator_socket, operator=True, backlog=backlog))
    set_socket_access(config.operator_socket, config.operator_socket_mode, None)
    start_jobs(d, loop)
    if config.http is not None:
        from kiln.web.serve import start_http  # aiohttp loads only when HTTP is on

        d.http = await start_http(d, config.http, config.http_public)
    _ = d.spawn(d.monitor.run())
    _ = d.spawn(d.notifier.feed(lambda: engine_answers(d)))
    if config.postfix is not None and d.postfix is not None:
        _serve_postfix(d, config.postfix.socket, backlog)
    if config.resp_socket is not None:
        d.resp_server = _core_server(d, config.resp_socket, backlog, "resp")
    resp_tcp = None
    if config.resp and config.resp_tcp is not None:
        d.resp_tcp_server = _core.MtaServer(
            d.engine,
            config.resp_tcp,
            backlog=backlog,
            max_connections=d.max_connections,
            clock=clock_spec(d.clock),
            protocol="resp",
            tcp=True,
        )
        resp_tcp = f"{config.resp_tcp.rpartition(':')[0]}:{d.resp_tcp_server.tcp_port()}"
    if config.mta_listener == "rust":
        d.mta = RustMtaSocket(d, config.socket, backlog)
    else:
        d.servers.append(await _listen(d, config.socket, operator=False, backlog=backlog))
    set_socket_access(config.socket, config.socket_mode, config.socket_group)
    d.log.info(
        "listening",
        socket=str(config.socket),
        operator_socket=str(config.operator_socket),
        database=d.store.target,
        plan=d.plan.name,
        backlog=backlog,
        max_connections=d.max_connections,
        mta_listener=config.mta_listener,
        postfix_socket=str(config.postfix.socket) if config.postfix else None,
        resp_socket=str(config.resp_socket) if config.resp_socket else None,
        resp_tcp=resp_tcp,
        watchdog_s=d.notifier.watchdog_s,
    )
    # What start-up built lives as long as the process: keep it out of the cyclic collector's
    # full passes, whose pause grows with every object they walk (a full pass over a started
    # daemon took ~30 ms on a 2-core VM). Done once: objects frozen and later dropped in
    # cycles would never be freed.
    gc.freeze()
    d.notifier.notify("READY=1")
    try:
        await stopping.wait()
    finally:
        await shutdown(d)


def _core_server(d: Daemon, path: Path, backlog: int, protocol: str) -> _core.MtaServer:
    """A socket served by the core on a thread of its own in `protocol`, with the MTA
    socket's access (it answers nothing Python must: no upcalls)."""
    prepare_socket_path(path)
    server = _core.MtaServer(
        d.engine,
        str(path),
        backlog=backlog,
        max_connections=d.max_connections,
        clock=clock_spec(d.clock),
        protocol=protocol,
    )
    set_socket_access(path, d.config.socket_mode, d.config.socket_group)
    return server


def _serve_postfix(d: Daemon, path: Path, backlog: int) -> None:
    """Postfix's transport table, served by the core on a thread of its own, and the loop
    that releases the recipients it held (kiln.daemon.postfix)."""
    assert d.postfix is not None
    d.postfix_server = _core_server(d, path, backlog, "socketmap")
    d.postfix.start()
    if d.feedback is None or all(s.name != "postfix" for s in d.feedback.sources):
        d.log.warning(
            "postfix_log_not_read",
            hint="the plan has no signals.feedback.postfix: recipients kiln asks Postfix to "
            "hold are retried on Postfix's own schedule instead of released as room opens",
        )


async def _listen(d: Daemon, path: Path, *, operator: bool, backlog: int) -> asyncio.AbstractServer:
    """A Unix socket server at `path` (a stale socket file is replaced)."""
    prepare_socket_path(path)
    return await asyncio.get_running_loop().create_unix_server(
        lambda: NativeProtocol(d, operator=operator), str(path), backlog=backlog
    )


def engine_answers(d: Daemon) -> bool:
    """A real engine call on the loop (a `ping` through the wire protocol), and the MTA
    socket's thread alive when the core serves it: the watchdog is fed only then."""
    if d.mta is not None and not d.mta.running:
        return False  # the MTA socket's thread is gone: let systemd restart us
    try:
        served = d.engine.serve(b'{"op":"ping"}\n', d.clock.now_ms())
    except _core.CoreError:
        return False
    return served.reply == b'{"ok":true}\n'


def loop_exception(d: Daemon, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Errors the loop reports (accept failures at the open-files limit among them) go to
    kiln's log, repeated ones at most every few seconds."""
    exc = context.get("exception")
    if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
        d.warn_repeated(
            "accept_failed",
            error=str(exc),
            hint="out of file descriptors or memory; open connections are still served",
        )
        return
    d.log.error("loop_error", message=str(context.get("message")), error=repr(exc) if exc else None)


async def shutdown(d: Daemon) -> None:
    """Stop listening, write a final snapshot, remove the sockets."""
    d.notifier.notify("STOPPING=1")
    if d.scheduler is not None:
        d.scheduler.shutdown(wait=False)
        d.scheduler = None
    for task in list(d.tasks):
        task.cancel()
    with contextlib.suppress(Exception):  # the client's connections are closed there
        await asyncio.wait_for(d.signal_loop.run(d.poller.aclose()), 5)
    d.signal_loop.stop()
    for server in d.servers:
        server.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 2)
    d.servers.clear()
    if d.http is not None:
        await d.http.cleanup()
        d.http = None
    if d.mta is not None:
        d.mta.close()
        d.mta = None
    if d.postfix_server is not None:
        d.postfix_server.stop()
        d.postfix_server = None
    for core_server in (d.resp_server, d.resp_tcp_server):
        if core_server is not None:
            core_server.stop()
    d.resp_server = d.resp_tcp_server = None
    if d.postfix is not None:
        d.postfix.close()
    if d.lookups is not None:
        await d.lookups.aclose()
        d.lookups = None
    now_ms = d.clock.now_ms()
    if d.feedback is not None:
        d.collect(now_ms)  # keep where the log readers got to
        d.feedback.close()
        d.feedback = None
    d.record(now_ms, "stop", "daemon", "stop", "kiln stopped cleanly", {})
    try:
        d.flush(now_ms, final=True)
    except StoreError as e:
        d.log.error("final_flush_failed", error=str(e), unsaved_batches=len(d.persist.unsaved))
    d.persist.stop_thread()
    if d.suppression.unsnapshotted:
        try:
            d.suppression.save_snapshot()  # a faster next start; the log stays the truth
        except OSError as e:
            d.log.warning("suppression_snapshot_not_saved", error=str(e))
    d.store.close()
    d.notifier.close()
    postfix = [d.config.postfix.socket] if d.config.postfix is not None else []
    resp = [d.config.resp_socket] if d.config.resp_socket is not None else []
    for path in (d.config.socket, d.config.operator_socket, *postfix, *resp):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    d.log.info("stopped")
