"""Local control sockets: `vpnclient status|down`, `vpnd stats` (and later account changes).

A Unix stream socket at a path the operator chose, created with mode 0600 in a
0700 directory, so only root (or the owner) can open it. One request per
connection: a line of text in, one line of JSON out.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import socket

import trio

from ..cli import UserError

MAX_REQUEST = 65536


def open_listener(path: str, prog: str, stop_hint: str) -> socket.socket:
    """Bind `path`; refuse if another live process answers there, replace a stale socket. A plain
    socket (closing it needs no Trio run: a start that fails later closes it outside one)."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        pass
    else:
        raise UserError(f"another {prog} is already running with control socket {path}; {stop_hint}", 1)
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise UserError(f"cannot use control socket path {path} ({exc.strerror}); choose another", 1) from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot create control socket {path} ({exc.strerror}); choose another path", 1) from None
    finally:
        os.umask(old)
    sock.listen(16)
    sock.setblocking(False)
    return sock


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


async def recv_until(conn, done, limit: int) -> bytes:
    """Read from a Trio socket until `done(data)`, the peer's end, or `limit` bytes."""
    data = b""
    while not done(data) and len(data) < limit:
        chunk = await conn.recv(limit)
        if not chunk:
            break
        data += chunk
    return data


async def serve(listener, handle) -> None:
    """Answer requests forever: `handle(line)` returns a dict, or an awaitable of one (for an
    answer that needs a worker thread); it never blocks."""
    listener = trio.socket.from_stdlib_socket(listener)
    with listener:
        while True:
            conn, _ = await listener.accept()
            with conn:
                try:
                    with trio.move_on_after(2):
                        data = await recv_until(conn, lambda d: d.endswith(b"\n"), MAX_REQUEST)
                        try:
                            answer = handle(data.decode("utf-8", "replace").strip())
                            if inspect.isawaitable(answer):
                                answer = await answer
                        except UserError as exc:
                            answer = {"error": str(exc)}
                        await conn.send(json.dumps(answer).encode() + b"\n")
                except OSError as exc:
                    if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                        raise


def query(path: str, command: str, prog: str, timeout: float = 5.0) -> dict:
    """Send one command to a running `prog` and return its JSON answer; UserError otherwise."""
    start_hint = {"vpnclient": "start it with 'vpnclient up --config FILE'",
                  "vpnd": "start it with 'vpnd serve --config FILE'"}.get(prog, "start it")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except FileNotFoundError:
        s.close()
        raise UserError(f"{prog} is not running (no control socket at {path}); {start_hint}", 1) from None
    except ConnectionRefusedError:
        s.close()
        raise UserError(f"{prog} is not running (stale control socket {path}); {start_hint}", 1) from None
    except PermissionError:
        s.close()
        raise UserError("permission denied on the control socket; run as root", 1) from None
    except OSError as exc:
        s.close()
        raise UserError(f"cannot connect to the control socket {path} ({exc.strerror or exc}); "
                        f"check the path", 1) from None
    with s:
        data = b""
        try:
            s.sendall(command.encode() + b"\n")
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise UserError(f"{prog} did not answer '{command}' within {timeout:g} s; "
                            f"it may be hung: end it with SIGTERM", 1) from None
        except OSError as exc:
            raise UserError(f"lost the connection to {prog} ({exc.strerror or exc})", 1) from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise UserError(f"{prog} answered with something unreadable; is it the same version?", 1) from None
    if isinstance(answer, dict) and "error" in answer and len(answer) == 1:
        raise UserError(str(answer["error"]), 1)
    return answer
