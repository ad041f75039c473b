"""Reading what a user wrote: TOML config files, base64 keys, typed options (DESIGN §6).

Every failure is a `UserError` naming the file or option and how to fix it.
"""

from __future__ import annotations

import base64
import binascii
import os
import tomllib

from .cli import UserError


def load_toml(path: str, what: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} {path!r} does not exist; pass the path of an existing file") from None
    except PermissionError:
        raise UserError(f"{what} {path!r} is not readable; check its permissions or run as root") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path!r} is a directory; pass a file") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path!r} is not UTF-8 text; pass the TOML config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{what} {path!r} is not valid TOML ({exc}); fix the syntax") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {path!r}: {exc.strerror}") from None


def parse_key(value, what: str) -> bytes:
    """A 32-byte key in base64 (as `genkey` prints it)."""
    if not isinstance(value, str):
        raise UserError(f"{what} must be a base64 string of a 32-byte key, as printed by 'genkey'")
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{what} is not valid base64; paste the key exactly as 'genkey' printed it") from None
    if len(raw) != 32:
        raise UserError(f"{what} decodes to {len(raw)} bytes, not 32; paste the key exactly as 'genkey' printed it")
    return raw


def encode_key(raw: bytes) -> str:
    return base64.b64encode(bytes(raw)).decode()


def read_private_key(section: dict, what: str, base_dir: str) -> bytes:
    """`private_key = "..."` inline, or `private_key_file = "path"` (relative to the config file)."""
    if "private_key" in section:
        return parse_key(section["private_key"], f"{what}.private_key")
    if "private_key_file" in section:
        path = os.path.join(base_dir, str(section["private_key_file"]))
        try:
            with open(path, "rb") as f:
                text = f.read().decode("ascii")
        except OSError as exc:
            raise UserError(f"cannot read the private key file {path!r} ({exc.strerror}); "
                            f"check the path and its permissions") from None
        except UnicodeDecodeError:
            raise UserError(f"the private key file {path!r} contains binary data; "
                            f"store the base64 key that 'genkey' prints") from None
        return parse_key(text, f"private key file {path!r}")
    raise UserError(f"{what} needs private_key (or private_key_file); generate one with 'genkey'")


_TOML_TYPES = {dict: "a table", str: "a string", int: "an integer", list: "a list", bool: "true or false"}


def need(section: dict, key: str, kind: type, where: str):
    if key not in section:
        raise UserError(f"{where} is missing '{key}'; add it to the config file")
    value = section[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise UserError(f"'{key}' in {where} must be {_TOML_TYPES.get(kind, kind.__name__)}; fix the config file")
    return value


def check_keys(section: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise UserError(f"{where} has unknown option '{unknown[0]}'; allowed: {', '.join(sorted(allowed))}")
