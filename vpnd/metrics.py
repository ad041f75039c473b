"""Metrics without logs (issue 18): an opt-in Prometheus text endpoint on loopback.

    [server]
    metrics_listen = "127.0.0.1:9586"     # off unless set; loopback only

`GET /metrics` answers in the Prometheus text format (version 0.0.4) with aggregate counters
since vpnd started, and nothing finer:

    vpnd_transport_bytes_total{direction="in"|"out"}   transport bytes, all sessions together
    vpnd_sessions_started_total                          sessions that completed a handshake
    vpnd_sessions_active                                 live sessions, rounded to ROUND
    vpnd_cookie_replies_total                            cookie replies sent under load
    vpnd_drops_total{reason="..."}                       dropped input by reason (fixed names)
    vpnd_dns_total{counter="..."}                        the DNS forwarder's counters (no names)

No label carries an account, an address, a key or a port, and the active-session gauge is rounded
so that scraping it every second cannot rebuild when one session started or ended. A few lines of
our own over Trio rather than prometheus-client: the text format is four line shapes, and a
server of our own answers one path, reads at most MAX_REQUEST bytes, and logs nothing.
"""

from __future__ import annotations

import re
import socket

import trio

from vpncore.cli import UserError
from vpncore.net.ctlsock import recv_until
from vpncore.net.udp import parse_hostport

ROUND = 10
MAX_REQUEST = 4096
_NAME = re.compile(r"^[a-z0-9_-]{1,64}$")


def listen_address(text: str) -> tuple[str, int]:
    host, port = parse_hostport(text, "server.metrics_listen")
    if host not in ("127.0.0.1", "::1", "localhost") or port == 0:
        raise UserError("server.metrics_listen must be a loopback address with a port, e.g. \"127.0.0.1:9586\" "
                        "(put a proxy in front to scrape from elsewhere)")
    return host, port


def open_listener(addr: tuple[str, int]) -> socket.socket:
    host, port = addr
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(16)
        s.setblocking(False)
    except OSError as exc:
        s.close()
        raise UserError(f"cannot listen on server.metrics_listen ({exc.strerror}); pick a free port", 1) from None
    return s


def rounded(n: int) -> int:
    return (n + ROUND // 2) // ROUND * ROUND


def render(m: dict) -> bytes:
    """The text format for a totals dict: bytes_in, bytes_out, sessions_started, sessions_active,
    drops (reason -> count), dns (counter -> count)."""
    drops = dict(m.get("drops", {}))
    cookies = drops.pop("cookie-sent", 0)
    lines = ["# HELP vpnd_transport_bytes_total Transport bytes of all sessions together.",
             "# TYPE vpnd_transport_bytes_total counter",
             f'vpnd_transport_bytes_total{{direction="in"}} {m.get("bytes_in", 0)}',
             f'vpnd_transport_bytes_total{{direction="out"}} {m.get("bytes_out", 0)}',
             "# HELP vpnd_sessions_started_total Sessions that completed a handshake.",
             "# TYPE vpnd_sessions_started_total counter",
             f"vpnd_sessions_started_total {m.get('sessions_started', 0)}",
             f"# HELP vpnd_sessions_active Live sessions, rounded to {ROUND}.",
             "# TYPE vpnd_sessions_active gauge",
             f"vpnd_sessions_active {rounded(m.get('sessions_active', 0))}",
             "# HELP vpnd_cookie_replies_total Cookie replies sent under load.",
             "# TYPE vpnd_cookie_replies_total counter",
             f"vpnd_cookie_replies_total {cookies}",
             "# HELP vpnd_drops_total Dropped input by reason.",
             "# TYPE vpnd_drops_total counter"]
    lines += [f'vpnd_drops_total{{reason="{r}"}} {n}' for r, n in sorted(drops.items()) if _NAME.match(r)]
    lines += ["# HELP vpnd_dns_total The DNS forwarder's counters (no names, no addresses).",
              "# TYPE vpnd_dns_total counter"]
    lines += [f'vpnd_dns_total{{counter="{c}"}} {n}' for c, n in sorted(m.get("dns", {}).items())
              if _NAME.match(c) and isinstance(n, int)]
    return ("\n".join(lines) + "\n").encode()


async def serve(listener: socket.socket, totals) -> None:
    """Answer `GET /metrics` with render(totals()); anything else 404; one request per connection."""
    sock = trio.socket.from_stdlib_socket(listener)
    with sock:
        while True:
            conn, _ = await sock.accept()
            with conn:
                try:
                    with trio.move_on_after(2):
                        data = await recv_until(conn, lambda d: b"\r\n\r\n" in d or b"\n\n" in d, MAX_REQUEST)
                        if data.split(b" ", 2)[:2] == [b"GET", b"/metrics"]:
                            body, status = render(totals()), b"200 OK"
                            ctype = b"text/plain; version=0.0.4; charset=utf-8"
                        else:
                            body, status, ctype = b"only GET /metrics here\n", b"404 Not Found", b"text/plain"
                        out = memoryview(b"HTTP/1.0 " + status + b"\r\nContent-Type: " + ctype +
                                         b"\r\nContent-Length: " + str(len(body)).encode() +
                                         b"\r\nConnection: close\r\n\r\n" + body)
                        while out:
                            out = out[await conn.send(out):]
                except OSError:
                    pass
