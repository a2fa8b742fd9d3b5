"""The coordinator's fleet gateway: the only port the sites reach.

Flower 1.42's SuperLink serves three APIs on one HTTP port: the Fleet API (``/v1/fleet/...``,
what SuperNodes call), the Control API (``/v1/control/...``: ``flwr run``, ``flwr supernode
register``, ``flwr ls``) and the runtime API (``/v1/runtime/...``: the ServerApp). In the free
distribution the Control API has no authentication, so whoever reaches that port can register a
node or start a run. ``myelofed server start`` therefore binds the SuperLink to loopback and puts
this gateway on the public interface: it terminates TLS with the SuperLink's certificate, forwards
exactly the Fleet API's routes (POST, the paths Flower's own fleet router declares) over TLS to the
SuperLink, and answers everything else with 403 and a log line naming the caller and the path.
A Fleet call the SuperLink fails with 5xx is sent again (after 0.5, 1, 2 and 4 s, within 20 s)
where that is safe: the calls that only read or refresh a heartbeat, and the pushes of a site's
reply and of its objects (see :data:`RETRIED`).

The log is one line per refused request, per retry and per failure; forwarded requests are
counted by route and summed up in one line every :data:`SUMMARY_S` seconds (a site polls every
few seconds: a line per forwarded call grew the log by 1.2 MB in 30 minutes with 3 sites).

SuperNode authentication is untouched: a SuperNode signs a timestamp in its request headers and
the gateway forwards the headers as they are, so the SuperLink still checks every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

log = logging.getLogger("myelofed.gateway")

#: Headers that belong to one connection, never forwarded (RFC 9110 section 7.6.1), and the
#: ones the gateway sets itself.
_HOP_BY_HOP: Final = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length"})

#: The largest request body forwarded (a site's model weights travel in such bodies).
DEFAULT_MAX_BODY: Final = 1 << 30

#: Fleet calls safe to send again when the SuperLink answers 5xx, as its SQLite state does when
#: a write waited over 5 s for a lock (many sites on a loaded coordinator). The reads and the
#: heartbeat change nothing that a second call would double. The two pushes are how a site's
#: reply reaches the server, and a SuperNode does not send them again itself (Flower 1.42 retries
#: 502, 503 and 504, not 500): a lost push is a site lost for the phase. Sending them again is
#: safe because the SuperLink stores a reply in one transaction and refuses a second copy of it,
#: and stores an object under its content's hash only while the object is still pending.
RETRIED: Final = frozenset({"/v1/fleet/pull-messages", "/v1/fleet/send-node-heartbeat",
                            "/v1/fleet/get-run", "/v1/fleet/get-fab", "/v1/fleet/pull-object",
                            "/v1/fleet/push-messages", "/v1/fleet/push-object"})
RETRY_DELAYS_S: Final = (0.5, 1.0, 2.0, 4.0)
#: No new attempt starts later than this after the first (a SuperNode waits 30 s for an answer).
RETRY_BUDGET_S: Final = 20.0
#: How often the forwarded requests are summed up in the log (seconds).
SUMMARY_S: Final = 600.0


class Counter:
    """Forwarded requests by route and answer, since the last summary."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}

    def add(self, path: str, status: int) -> None:
        key = (path.rsplit("/", 1)[-1], status)
        self.counts[key] = self.counts.get(key, 0) + 1

    def summary(self) -> str | None:
        """One log line of the counts, then reset (None: nothing was forwarded)."""
        if not self.counts:
            return None
        total = sum(self.counts.values())
        parts = ", ".join(f"{route} {status}: {n}"
                          for (route, status), n in sorted(self.counts.items()))
        self.counts = {}
        return f"forwarded {total} request(s) ({parts})"


def fleet_paths() -> frozenset[str]:
    """The Fleet API's routes as the installed Flower declares them (``/v1/fleet/...``)."""
    # the SuperLink's own modules: only a running gateway needs them
    from flwr.superlink.routers.fleet.router import router

    paths = frozenset(route.path for route in router.routes)
    if not paths or not all(p.startswith("/v1/fleet/") for p in paths):
        raise RuntimeError(f"Flower's fleet router has unexpected routes: {sorted(paths)}")
    return paths


@dataclass(frozen=True)
class Upstream:
    """Where the SuperLink listens (loopback) and the CA its certificate is checked against
    (None: plaintext, for ``--insecure`` loopback tests)."""
    host: str
    port: int
    ca_certfile: Path | None

    @property
    def url(self) -> str:
        return f"{'http' if self.ca_certfile is None else 'https'}://{self.host}:{self.port}"


def refusal(request: Request, why: str) -> Response:
    """403, and a log line naming who asked for what."""
    client = request.client.host if request.client else "?"
    log.warning("refused %s %s from %s: %s", request.method, request.scope.get("path"), client,
                why)
    return PlainTextResponse(f"MyeloFed gateway: {why}\n", status_code=403)


def create_app(upstream: Upstream, *, allowed: frozenset[str] | None = None,
               max_body: int = DEFAULT_MAX_BODY, timeout_s: float = 300.0,
               transport: httpx.AsyncBaseTransport | None = None,
               counter: Counter | None = None, summary_s: float = SUMMARY_S) -> Starlette:
    """The gateway as an ASGI app: ``allowed`` paths (default: :func:`fleet_paths`) are
    forwarded to ``upstream``; anything else gets 403. ``transport``: how the upstream is
    reached (default: the network; a mock in the tests). Forwarded requests are counted in
    ``counter`` and logged as one summary line every ``summary_s`` seconds."""
    counter = Counter() if counter is None else counter
    allowed = fleet_paths() if allowed is None else allowed
    verify: ssl.SSLContext | bool = False
    if upstream.ca_certfile is not None:
        verify = ssl.create_default_context(cafile=str(upstream.ca_certfile))
    client = httpx.AsyncClient(base_url=upstream.url, verify=verify, timeout=timeout_s,
                               limits=httpx.Limits(max_connections=256), transport=transport)

    async def forward(request: Request) -> Response:
        path = request.scope["path"]
        raw = request.scope.get("raw_path") or b""
        if request.method == "GET" and path == "/health":
            return PlainTextResponse("ok\n")
        if path not in allowed:
            return refusal(request, f"{path} is not served to sites (only Flower's Fleet API "
                                    "is)")
        # the exact path, as sent: no percent-encoding, no dot segments, no query string
        if raw.decode("latin-1") != path or request.scope.get("query_string"):
            return refusal(request, "the path must be sent as is, without encoding or query")
        if request.method != "POST":
            return refusal(request, f"{request.method} is not a Fleet API method")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_body):
            return refusal(request, f"body of {declared} bytes (at most {max_body})")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                return refusal(request, f"body over {max_body} bytes")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP]
        delays = RETRY_DELAYS_S if path in RETRIED else ()
        started = time.monotonic()
        for attempt in range(len(delays) + 1):
            try:
                answer = await client.post(path, content=bytes(body), headers=headers)
            except httpx.HTTPError as exc:
                log.error("SuperLink unreachable at %s: %s", upstream.url, exc)
                return PlainTextResponse("MyeloFed gateway: the SuperLink is unreachable\n",
                                         status_code=502)
            if (answer.status_code < 500 or attempt == len(delays)
                    or time.monotonic() - started + delays[attempt] > RETRY_BUDGET_S):
                break
            log.warning("SuperLink answered %d to %s: trying again in %g s",
                        answer.status_code, path, delays[attempt])
            await asyncio.sleep(delays[attempt])
        counter.add(path, answer.status_code)
        return Response(answer.content, status_code=answer.status_code,
                        headers={k: v for k, v in answer.headers.items()
                                 if k.lower() not in _HOP_BY_HOP | {"content-encoding"}})

    def log_summary() -> None:
        line = counter.summary()
        if line:
            log.info(line)

    async def summarize() -> None:
        while True:
            await asyncio.sleep(summary_s)
            log_summary()

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(summarize())
        yield
        task.cancel()
        log_summary()
        await client.aclose()

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)],
                     lifespan=lifespan)


@dataclass(frozen=True)
class Listen:
    """Where the gateway listens, and its TLS files (None: plaintext, loopback tests only)."""
    host: str
    port: int
    certfile: Path | None = None
    keyfile: Path | None = None


def serve(listen: Listen, upstream: Upstream, *,
          watch: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run the gateway until SIGINT/SIGTERM, or until ``watch`` returns (e.g. the SuperLink it
    fronts has exited)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per forwarded call otherwise
    config = uvicorn.Config(
        create_app(upstream), host=listen.host, port=listen.port, log_level="warning",
        ssl_certfile=None if listen.certfile is None else str(listen.certfile),
        ssl_keyfile=None if listen.keyfile is None else str(listen.keyfile),
        proxy_headers=False, server_header=False, timeout_keep_alive=75)
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        if watch is not None:
            watcher = asyncio.create_task(watch())
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                server.should_exit = True
        await task

    log.info("gateway on %s:%d (%s) -> SuperLink at %s (Fleet API only)", listen.host,
             listen.port, "TLS" if listen.certfile else "plaintext", upstream.url)
    # uvicorn shuts down on SIGINT/SIGTERM, then raises the signal again with the handler it
    # found, inside its task: a handler that raised there would leave a task's exception
    # unretrieved (a traceback in the log). So it finds one that only notes the signal, which
    # is raised again here, outside the event loop, for the caller's own handler.
    noted: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, lambda signum, frame: noted.append(signum))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        asyncio.run(main())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if noted:
        signal.raise_signal(noted[0])
