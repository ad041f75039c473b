"""The device API (`vpnd api`, issue 14): users add and remove their own devices, as Mullvad's and
Proton's apps do, and fetch the server list that `vpnclient register` saves as its config.

    GET    /v1/servers               the fleet: name, location, endpoint, public key (no auth)
    POST   /v1/devices               {"public_key": "...", "name": "..."} -> 201
    GET    /v1/devices               the account's devices
    DELETE /v1/devices/{key}         key in URL-safe base64 -> 204

Authentication is the account number as a bearer token (`Authorization: Bearer ID`), compared in
constant time with the one the registry holds; any failure is one generic answer (401 "unknown or
inactive account"), never a hint whether the account exists. Failed attempts are limited without
keeping addresses: counters keyed by a keyed hash of the source (BLAKE2b under a random secret
that is replaced, with every counter, each WINDOW seconds, in memory only), and a ceiling for all
sources together. No request is logged (Hypercorn's access log is off, its error log too), and
nothing is written but the registry. Bodies over MAX_BODY bytes are refused (413).

An ASGI app (Starlette) run by Hypercorn's Trio worker: the daemons' concurrency library, HTTP/1.1
and HTTP/2, TLS when `tls_cert`/`tls_key` are set (or a reverse proxy in front, on loopback by
default). The registry's calls are blocking, so they run in worker threads.

    [api]
    registry = "postgresql://vpnd_owner@db/vpnd?passfile=/etc/vpnd/api.pgpass"   # or sqlite:///...
    listen = "127.0.0.1:8080"        # default
    behind_proxy = false             # true: the source is the last X-Forwarded-For hop
    tls_cert = "/etc/vpnd/api.crt"   # optional, with tls_key
    tls_key = "/etc/vpnd/api.key"

    [[server]]                       # the server list handed to clients
    name = "ams-1"
    location = "nl"
    endpoint = "vpn1.example.net:51820"
    public_key = "..."
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from vpncore.cli import UserError
from vpncore.configfile import check_keys, encode_key, load_toml, need, parse_key
from vpncore.net.udp import parse_hostport

from .registry import ACCOUNT_ID, Conflict, NotFound, RegistryUnavailable, open_registry, parse_location

MAX_BODY = 4096
WINDOW = 300.0                 # seconds: the hash secret and the failure counters are replaced together
FAILURES_PER_SOURCE = 10       # failed authentications per source and window
FAILURES_ALL = 1000            # ... and for all sources together
GENERIC = "unknown or inactive account"
API_KEYS = {"registry", "listen", "behind_proxy", "tls_cert", "tls_key"}
SERVER_KEYS = {"name", "location", "endpoint", "public_key"}


@dataclass
class ApiConfig:
    registry: object
    listen: tuple[str, int] = ("127.0.0.1", 8080)
    behind_proxy: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    servers: list[dict] = field(default_factory=list)


def load_config(path: str) -> ApiConfig:
    doc = load_toml(path, "config file")
    check_keys(doc, {"api", "server"}, "the API config")
    api = doc.get("api")
    if not isinstance(api, dict):
        raise UserError(f"{path} has no [api] table; add one with registry = \"sqlite:///var/lib/vpnd/accounts.db\"")
    check_keys(api, API_KEYS, "[api]")
    base = os.path.dirname(os.path.abspath(path))
    cfg = ApiConfig(parse_location(need(api, "registry", str, "[api]"), base))
    if "listen" in api:
        cfg.listen = parse_hostport(need(api, "listen", str, "[api]"), "[api] listen")
    cfg.behind_proxy = api.get("behind_proxy", False)
    if not isinstance(cfg.behind_proxy, bool):
        raise UserError("[api] behind_proxy must be true or false")
    if ("tls_cert" in api) != ("tls_key" in api):
        raise UserError("[api] needs both tls_cert and tls_key, or neither (TLS at a reverse proxy)")
    for name in ("tls_cert", "tls_key"):
        if name in api:
            setattr(cfg, name, os.path.join(base, need(api, name, str, "[api]")))
    servers = doc.get("server", [])
    if not isinstance(servers, list) or not servers:
        raise UserError("the API config lists no servers; add [[server]] tables with name, location, endpoint, "
                        "public_key")
    for i, s in enumerate(servers, 1):
        where = f"[[server]] number {i}"
        if not isinstance(s, dict):
            raise UserError(f"{where} is not a table")
        check_keys(s, SERVER_KEYS, where)
        entry = {k: need(s, k, str, where) for k in ("name", "location", "endpoint", "public_key")}
        parse_hostport(entry["endpoint"], f"{where} endpoint")
        entry["public_key"] = encode_key(parse_key(entry["public_key"], f"{where} public_key"))
        cfg.servers.append(entry)
    return cfg


class FailureLimiter:
    """Failed authentications per source and in all, per window, with no address kept: a source
    is known only as BLAKE2b(secret, address), and the secret and counters go at each window."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._rotate(clock())

    def __repr__(self) -> str:
        return "FailureLimiter(...)"

    def _rotate(self, now: float) -> None:
        self._secret = os.urandom(32)
        self._counts: Counter[bytes] = Counter()
        self._total = 0
        self._until = now + WINDOW

    def _key(self, source: str) -> bytes:
        return hashlib.blake2b(source.encode(), key=self._secret, digest_size=16).digest()

    def blocked(self, source: str) -> bool:
        now = self._clock()
        if now >= self._until:
            self._rotate(now)
        return self._total >= FAILURES_ALL or self._counts[self._key(source)] >= FAILURES_PER_SOURCE

    def failed(self, source: str) -> None:
        self._total += 1
        self._counts[self._key(source)] += 1


class DeviceApi:
    """The routes, over one registry; counters by outcome (no per-request record)."""

    def __init__(self, cfg: ApiConfig, registry):
        self.cfg = cfg
        self.registry = registry
        self.limiter = FailureLimiter()
        self.counters: Counter[str] = Counter()

    def __repr__(self) -> str:
        return "<DeviceApi>"

    def app(self):
        from starlette.applications import Starlette
        from starlette.routing import Route
        return Starlette(routes=[
            Route("/v1/servers", self.servers, methods=["GET"]),
            Route("/v1/devices", self.list_devices, methods=["GET"]),
            Route("/v1/devices", self.add_device, methods=["POST"]),
            Route("/v1/devices/{key}", self.remove_device, methods=["DELETE"]),
        ], exception_handlers={404: self._not_found, 405: self._not_allowed})

    # --- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _error(status: int, text: str, headers=None):
        from starlette.responses import JSONResponse
        return JSONResponse({"error": text}, status_code=status, headers=headers)

    async def _not_found(self, request, exc):
        return self._error(404, "no such resource; see /v1/servers and /v1/devices")

    async def _not_allowed(self, request, exc):
        return self._error(405, "method not allowed here")

    def _source(self, request) -> str:
        if self.cfg.behind_proxy:
            hops = request.headers.get("x-forwarded-for", "")
            if hops:
                return hops.rsplit(",", 1)[-1].strip()
        return request.client.host if request.client else ""

    async def _call(self, fn, *args):
        from starlette.concurrency import run_in_threadpool
        return await run_in_threadpool(fn, *args)

    async def _account(self, request):
        """The account the bearer token names, or an error response (generic, rate-limited)."""
        source = self._source(request)
        if self.limiter.blocked(source):
            self.counters["rate-limited"] += 1
            return None, self._error(429, "too many failed attempts; wait a few minutes",
                                     {"Retry-After": str(int(WINDOW))})
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        acct = None
        if ACCOUNT_ID.match(token):
            try:
                acct = await self._call(self.registry.account, token)
            except NotFound:
                acct = None
        if acct is None or not hmac.compare_digest(acct.id.encode(), token.encode()) or acct.status != "active":
            self.limiter.failed(source)
            self.counters["auth-failed"] += 1
            return None, self._error(401, GENERIC, {"WWW-Authenticate": "Bearer"})
        return acct, None

    async def _body(self, request):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return None, self._error(413, f"request body over {MAX_BODY} bytes")
        data = b""
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY:
                return None, self._error(413, f"request body over {MAX_BODY} bytes")
        try:
            doc = json.loads(data)
        except ValueError:
            return None, self._error(400, "the body is not JSON; send {\"public_key\": \"...\"}")
        if not isinstance(doc, dict):
            return None, self._error(400, "the body must be a JSON object with public_key")
        return doc, None

    # --- routes -------------------------------------------------------------------------------
    async def servers(self, request):
        from starlette.responses import JSONResponse
        return JSONResponse({"servers": self.cfg.servers})

    async def list_devices(self, request):
        from starlette.responses import JSONResponse
        acct, err = await self._account(request)
        if err is not None:
            return err
        return JSONResponse({"devices": [{"public_key": encode_key(k), "name": acct.names.get(k)}
                                         for k in acct.devices]})

    async def add_device(self, request):
        from starlette.responses import JSONResponse
        acct, err = await self._account(request)
        if err is not None:
            return err
        doc, err = await self._body(request)
        if err is not None:
            return err
        if set(doc) - {"public_key", "name"} or not isinstance(doc.get("public_key"), str) or \
                not isinstance(doc.get("name", ""), (str, type(None))):
            return self._error(400, "send {\"public_key\": \"<base64>\", \"name\": \"<optional>\"}")
        try:
            key = parse_key(doc["public_key"], "public_key")
            await self._call(self.registry.add_device, acct.id, key, doc.get("name") or None)
        except Conflict as exc:
            self.counters["conflict"] += 1
            return self._error(409, str(exc).replace(f"account {acct.id!r}", "this account"))
        except UserError as exc:
            return self._error(400, str(exc))
        self.counters["device-added"] += 1
        return JSONResponse({"public_key": encode_key(key), "name": doc.get("name") or None}, status_code=201)

    async def remove_device(self, request):
        from starlette.responses import Response
        acct, err = await self._account(request)
        if err is not None:
            return err
        text = request.path_params["key"]
        try:
            key = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            return self._error(400, "the device key in the path is URL-safe base64")
        if len(key) != 32:
            return self._error(400, "the device key in the path is URL-safe base64 of 32 bytes")
        try:
            await self._call(self.registry.remove_device, acct.id, key)
        except NotFound:
            return self._error(404, "this account has no such device")
        self.counters["device-removed"] += 1
        return Response(status_code=204)


def serve(path: str) -> int:
    """Run the device API in the foreground until SIGINT or SIGTERM."""
    import signal
    import sys

    import trio
    from hypercorn.config import Config

    from vpncore.log import NOTICE, journal_prefix
    from hypercorn.trio import serve as hypercorn_serve

    cfg = load_config(path)
    try:
        registry = open_registry(cfg.registry)
    except RegistryUnavailable as exc:
        raise UserError(f"cannot reach the accounts registry ({exc}); check the URL and its password file", 1) \
            from None
    api = DeviceApi(cfg, registry)
    hc = Config()
    host, port = cfg.listen
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.accesslog = None
    hc.errorlog = None
    if cfg.tls_cert:
        hc.certfile, hc.keyfile = cfg.tls_cert, cfg.tls_key

    async def main():
        stop = trio.Event()

        async def signals():
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
                async for _ in received:
                    stop.set()
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(signals)
            print(f"{journal_prefix(sys.stderr, NOTICE)}vpnd: device API serving (the [api] listen address)", file=sys.stderr, flush=True)
            await hypercorn_serve(api.app(), hc, shutdown_trigger=stop.wait)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except OSError as exc:
        raise UserError(f"cannot listen on the [api] listen address ({exc.strerror}); pick a free one", 1) from None
    finally:
        registry.close()
    return 0
