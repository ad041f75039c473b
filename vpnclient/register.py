"""`vpnclient register`: add this machine as a device of an account, as the providers' apps do.

    vpnclient register --api https://api.example.net --account ID [--config PATH] [--name NAME] [--force]

1. Check the arguments and that PATH can be written (and does not exist, unless --force).
2. GET {api}/v1/servers (no authentication): the server list, validated like the config loader
   would (names, locations, endpoints, keys); done first, so an unreachable API registers nothing.
3. Generate an X25519 key pair (vpncore.keys.genkey; the public key is derived from it).
4. POST {api}/v1/devices with `Authorization: Bearer <account>`: {"public_key": ..., "name": ...}.
5. Write the complete client config (TOML) to PATH, mode 0600, atomically (vpncore.atomicfile).

The private key exists only in that file; the account number is sent only in the Authorization
header: neither ever appears in output or in an error line. Redirects are not followed (they could
carry the Authorization header elsewhere, or from https to http). Every failure is one UserError
line: status 2 for a mistake in the command line, 1 for a failure at run time.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from nacl.bindings import crypto_scalarmult_base

from vpncore import atomicfile
from vpncore.cli import UserError
from vpncore.configfile import encode_key, parse_key
from vpncore.keys import genkey
from vpncore.version import version

TIMEOUT = 15.0                  # seconds, for each request
MAX_RESPONSE = 1 << 20          # bytes read from any answer
MAX_ACCOUNT = 64
MAX_DEVICE_NAME = 64
_ACCOUNT = re.compile(r"[\x21-\x7e]+")          # printable ASCII, no spaces: safe in a header


@dataclass
class Server:
    name: str
    location: str
    endpoint: str
    public_key: str


@dataclass
class Result:
    path: str
    public_key: str
    servers: list[Server]

    def __repr__(self) -> str:
        return f"Result({self.path!r}, {len(self.servers)} servers)"


# ---------------------------------------------------------------------------------------- arguments

def check_api(url: str) -> str:
    """The base URL without a trailing '/', or one UserError (status 2)."""
    if not isinstance(url, str) or not url or any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise UserError("--api must be a URL like https://api.example.net, without spaces")
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port                               # raises ValueError on a bad port
    except ValueError:
        raise UserError(f"--api {url!r} is not a valid URL; use one like https://api.example.net") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise UserError(f"--api must start with https:// (or http://), not {parts.scheme + ':' if parts.scheme else url!r}; "
                        f"use e.g. https://api.example.net")
    if not parts.hostname:
        raise UserError(f"--api {url!r} names no host; use e.g. https://api.example.net")
    if parts.username is not None or parts.password is not None:
        raise UserError("--api must not carry a user name or password; the account goes in --account")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise UserError(f"--api {url!r} must be a base URL without '?' or '#'; use e.g. https://api.example.net")
    if parts.scheme.lower() == "http" and not _loopback(parts.hostname):
        raise UserError("--api over plain http:// would send the account number in clear; use https:// "
                        "(http:// only to this machine: 127.0.0.1, ::1, localhost)")
    return url.rstrip("/")


def _loopback(host: str) -> bool:
    import ipaddress
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_account(account: str) -> str:
    account = (account or "").strip()
    if not account or len(account) > MAX_ACCOUNT or not _ACCOUNT.fullmatch(account):
        raise UserError(f"--account must be the account number: 1 to {MAX_ACCOUNT} printable characters "
                        f"without spaces; copy it from the account page")
    return account


def check_name(name: str | None) -> str | None:
    if name is None:
        return None
    if not name.strip() or len(name) > MAX_DEVICE_NAME or not name.isprintable():
        raise UserError(f"--name must be 1 to {MAX_DEVICE_NAME} printable characters (e.g. \"laptop\"); "
                        f"or leave it out and the service picks one")
    return name


def _nearest_dir(path: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(d):
        d = os.path.dirname(d)
    return d


def check_target(path: str, force: bool) -> None:
    """PATH can be written: status 2 for an existing file without --force, a directory or a directory
    that cannot be written. Checked before anything is registered."""
    if not path or "\0" in path:
        raise UserError("--config must be a file path")
    if os.path.isdir(path):
        raise UserError(f"--config {path!r} is a directory; pass the path of the config file to write, "
                        f"e.g. {os.path.join(path, 'vpn0.toml')}")
    if os.path.lexists(path) and not force:
        raise UserError(f"{path} already exists; pass --force to replace it (its private key is then lost) "
                        f"or choose another --config")
    d = _nearest_dir(path)
    if not os.path.isdir(d):
        raise UserError(f"cannot write {path}: {d} is not a directory; choose another --config")
    if not os.access(d, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: no permission to write in {d}; run as root (sudo) or "
                        f"choose another --config")


# ---------------------------------------------------------------------------------------- HTTP

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None                  # urllib then raises HTTPError with the 3xx status


def _clean(text, account: str, limit: int = 200) -> str:
    """A server-sent text as part of one line: printable, short, never the account number."""
    text = " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())
    if account:
        text = text.replace(account, "***")
    return text[:limit] + ("..." if len(text) > limit else "")


def _error_text(body: bytes, fallback: str, account: str) -> str:
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        doc = None
    msg = doc.get("error") if isinstance(doc, dict) else None
    return _clean(msg if isinstance(msg, str) and msg.strip() else fallback, account)


def _retry_after(headers) -> str:
    value = (headers.get("Retry-After") or "").strip() if headers is not None else ""
    return f"wait {int(value)} s" if value.isdigit() and int(value) < 10**6 else "wait a while"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"no answer within {TIMEOUT:g} s"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its TLS certificate is not trusted: {exc.verify_message or 'verification failed'}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return f"the host name does not resolve: {exc.strerror or exc}"
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.strerror or errno.errorcode.get(exc.errno, str(exc.errno))
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}"


def _request(method: str, url: str, base: str, account: str, body: dict | None = None):
    """(status, headers, body bytes) of any HTTP answer; UserError (1) when there is none."""
    headers = {"Accept": "application/json", "User-Agent": f"vpnclient/{version()}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
        headers["Authorization"] = f"Bearer {account}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.build_opener(_NoRedirect).open(req, timeout=TIMEOUT) as resp:
            return resp.status, resp.headers, _read(resp, base)
    except urllib.error.HTTPError as exc:
        try:
            content = exc.read(MAX_RESPONSE)
        except (OSError, ValueError, AttributeError):
            content = b""
        finally:
            exc.close()
        return exc.code, exc.headers, content
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise UserError(f"the API at {base} cannot be reached ({_clean(_reason(exc), account)}); check --api "
                        f"and the network", 1) from None
    except http.client.HTTPException as exc:          # a broken answer
        raise UserError(f"the API at {base} gave a broken HTTP answer ({_clean(_reason(exc), account)}); "
                        f"check --api", 1) from None


def _read(resp, base: str) -> bytes:
    content = resp.read(MAX_RESPONSE + 1)
    if len(content) > MAX_RESPONSE:
        raise UserError(f"the API at {base} sent more than {MAX_RESPONSE >> 20} MiB; check --api", 1)
    return content


def _json(content: bytes, base: str, what: str):
    try:
        return json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"the API at {base} answered {what} with something that is not JSON; check --api "
                        f"(it should be the device API's base URL)", 1) from None


def _common_failure(status: int, headers, content: bytes, base: str, account: str, what: str) -> UserError:
    """The UserError for an answer other than success (shared by both requests)."""
    text = _error_text(content, f"HTTP {status}", account)
    if 300 <= status < 400:
        return UserError(f"the API at {base} redirects {what} (HTTP {status}); pass the final URL "
                         f"with --api (redirects are not followed)", 2)
    if status == 404:
        return UserError(f"the API at {base} has no {what} (HTTP 404: {text}); check --api "
                         f"(the base URL, without /v1)", 2)
    if status == 429:
        return UserError(f"the device API refused {what} after too many failed attempts ({text}); "
                         f"{_retry_after(headers)} and try again", 1)
    if status >= 500:
        return UserError(f"the device API at {base} failed on {what} (HTTP {status}: {text}); "
                         f"try again later", 1)
    return UserError(f"the device API answered {what} with HTTP {status} ({text}); check --api", 1)


# ---------------------------------------------------------------------------------------- steps

def _toml_str(value: str) -> str:
    """A TOML basic string; control characters (and lone surrogates) are refused."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise ValueError("control character in a TOML string")
    return json.dumps(value, ensure_ascii=False)


def parse_servers(doc) -> list[Server]:
    """The API's server list, checked by the config loader's own rules for [[server]] tables
    (vpnclient/config.py); raises ValueError with what is wrong."""
    from .config import _servers

    servers = doc.get("servers") if isinstance(doc, dict) else None
    if not isinstance(servers, list):
        raise ValueError("no \"servers\" list")
    if not servers:
        raise ValueError("the list is empty")
    table = []
    for i, sv in enumerate(servers, 1):
        if not isinstance(sv, dict):
            raise ValueError(f"server number {i} is not an object")
        table.append({k: sv[k] for k in ("name", "location", "endpoint", "public_key") if k in sv})
    try:
        entries = _servers({"server": table})
    except UserError as exc:
        raise ValueError(str(exc).replace("[[server]] number", "server number")) from None
    return [Server(e.name, e.location, f"[{e.host}]:{e.port}" if ":" in e.host else f"{e.host}:{e.port}",
                   encode_key(e.public_key)) for e in entries]


def render(private_key: str, servers: list[Server]) -> bytes:
    """The client config: [client] with the private key, then [server] (one) or [[server]] (several)."""
    lines = ["# vpnclient config written by 'vpnclient register'; it holds this device's private key:",
             "# keep it mode 0600. Options: see 'vpnclient up --help'.",
             "[client]", f"private_key = {_toml_str(private_key)}", ""]
    header = "[server]" if len(servers) == 1 else "[[server]]"
    for s in servers:
        lines += [header, f"name = {_toml_str(s.name)}", f"location = {_toml_str(s.location)}",
                  f"endpoint = {_toml_str(s.endpoint)}", f"public_key = {_toml_str(s.public_key)}", ""]
    return "\n".join(lines).encode("utf-8")


def fetch_servers(base: str, account: str) -> list[Server]:
    status, headers, content = _request("GET", f"{base}/v1/servers", base, account)
    if status != 200:
        raise _common_failure(status, headers, content, base, account, "the server list")
    try:
        return parse_servers(_json(content, base, "the server list"))
    except ValueError as exc:
        raise UserError(f"the API at {base} sent a malformed server list ({_clean(exc, account)}); nothing was "
                        f"registered; try again later or report it to the service", 1) from None


def add_device(base: str, account: str, public_key: str, name: str | None) -> None:
    body = {"public_key": public_key}
    if name is not None:
        body["name"] = name
    status, headers, content = _request("POST", f"{base}/v1/devices", base, account, body)
    if status in (200, 201):
        doc = _json(content, base, "the registration")
        if not isinstance(doc, dict) or doc.get("public_key", public_key) != public_key:
            raise UserError(f"the API at {base} confirmed a different device than the one sent; check --api "
                            f"and remove the device in the app if it was added", 1)
        return
    text = _error_text(content, f"HTTP {status}", account)
    if status == 401:
        raise UserError(f"the device API refused the account number ({text}); check it", 1)
    if status == 409:
        low = text.lower()
        if "limit" in low or "plan" in low or "allow" in low or "too many" in low:
            raise UserError(f"the account already has as many devices as its plan allows ({text}); remove one "
                            f"in the app or with 'vpnd device remove'", 1)
        raise UserError(f"the device API already knows this device's key ({text}); run 'vpnclient register' "
                        f"again for a new key", 1)
    if status == 400:
        raise UserError(f"the device API rejected the registration ({text}); check --name", 2)
    if status == 413:
        raise UserError(f"the device API found the registration too big ({text}); use a shorter --name", 2)
    raise _common_failure(status, headers, content, base, account, "the registration")


def register(api: str, account: str, path: str, name: str | None = None, force: bool = False) -> Result:
    """Register a new key pair with the device API and write the config at `path`. UserError on any
    failure; nothing is written unless the device was registered."""
    base = check_api(api)
    account = check_account(account)
    name = check_name(name)
    check_target(path, force)
    servers = fetch_servers(base, account)
    private = genkey()
    public = encode_key(crypto_scalarmult_base(parse_key(private, "the new private key")))
    data = render(private, servers)
    add_device(base, account, public, name)
    try:
        if os.path.lexists(path) and not force:        # appeared meanwhile
            raise FileExistsError(errno.EEXIST, "it appeared while registering")
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755, exist_ok=True)
        atomicfile.replace(path, data, mode=0o600)
    except OSError as exc:
        raise UserError(f"the device was registered (public key {public}) but {path} cannot be written "
                        f"({exc.strerror or exc}); remove that device in the app or with 'vpnd device remove' "
                        f"and run 'vpnclient register' again", 1) from None
    return Result(path, public, servers)


def run(args) -> int:
    """`vpnclient register` from parsed arguments (api, account, config, name, force)."""
    res = register(args.api, args.account, args.config, args.name, args.force)
    n = len(res.servers)
    print(f"vpnclient: device registered; config written to {res.path} ({n} server{'s' if n != 1 else ''}); "
          f"connect with 'vpnclient up --config {res.path}'", flush=True)
    return 0
