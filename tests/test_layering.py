"""The layering, read statically from the source (ast), so import order or lazy imports cannot hide
an edge (issue 13, part 5):

- vpncore/proto is sans-IO: it imports only pure modules (PURE: no sockets, files, clocks, threads,
  processes or logging), the crypto and msgpack libraries, and itself. The one use of `socket` it may
  make is address conversion (SOCKET_PURE: inet_pton/inet_ntop and the family constants);
- vpncore never imports vpnd or vpnclient (the shells sit on the core, not the other way round);
- vpnd and vpnclient never import each other.

Every import counts: at module level, inside functions, under `if TYPE_CHECKING`, relative or not.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Pure standard-library modules vpncore/proto may import (add one here only if it does no I/O).
PURE = {
    "__future__", "abc", "array", "binascii", "bisect", "collections", "copy", "dataclasses", "enum",
    "functools", "hashlib", "heapq", "hmac", "ipaddress", "itertools", "math", "numbers", "operator",
    "re", "string", "struct", "types", "typing", "weakref", "zlib",
    # third-party: crypto primitives and the control messages' encoding
    "nacl", "cryptography", "msgpack",
}
SOCKET_PURE = {"inet_pton", "inet_ntop", "AF_INET", "AF_INET6"}
# Named so that a failure says why (all of these are also absent from PURE).
IO = {"trio", "socket", "os", "time", "logging", "subprocess", "select", "selectors", "fcntl", "threading",
      "asyncio", "signal", "io", "pathlib", "shutil", "tempfile", "mmap", "multiprocessing", "ssl", "random"}


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, names imported from it) for every import statement in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            names = [a.name for a in node.names]
            out.append((node.lineno, mod, names))
            if node.level and not node.module:       # `from . import control`: the submodules
                out += [(node.lineno, f"{mod}.{n}", []) for n in names]
    return out


def top(module: str) -> str:
    return module.split(".")[0]


def socket_attributes(path: Path) -> set[str]:
    """The attributes used as `socket.X` in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "socket"}


def test_the_packages_are_where_the_test_looks():
    for package in ("vpncore/proto", "vpncore", "vpnd", "vpnclient"):
        assert sources(package), package


@pytest.mark.parametrize("path", sources("vpncore/proto"), ids=lambda p: p.name)
def test_proto_imports_only_pure_modules(path):
    bad = []
    for line, mod, names in imports(path):
        if mod == "vpncore.proto" or mod.startswith("vpncore.proto."):
            continue
        if mod == "socket" and (not names or set(names) <= SOCKET_PURE):
            continue                                 # checked below: address conversion only
        if top(mod) in PURE:
            continue
        why = "an I/O module" if top(mod) in IO else "not in PURE: add it there only if it does no I/O"
        bad.append(f"{path.relative_to(ROOT)}:{line}: imports {mod} ({why})")
    assert not bad, "\n".join(bad)
    if any(mod == "socket" for _, mod, _ in imports(path)):
        used = socket_attributes(path) - SOCKET_PURE
        assert not used, f"{path.relative_to(ROOT)} uses socket.{sorted(used)}: only {sorted(SOCKET_PURE)} are pure"


FORBIDDEN = {
    "vpncore": {"vpnd", "vpnclient"},
    "vpnd": {"vpnclient"},
    "vpnclient": {"vpnd"},
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_across_the_layers(package):
    bad = [f"{path.relative_to(ROOT)}:{line}: imports {mod}"
           for path in sources(package) for line, mod, _ in imports(path) if top(mod) in FORBIDDEN[package]]
    assert not bad, "\n".join(bad)


def test_the_reader_catches_what_the_rules_forbid(tmp_path, monkeypatch):
    """The checks above see a forbidden import however it is written (nested, relative, guarded)."""
    pkg = tmp_path / "vpncore" / "proto"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text("from __future__ import annotations\n"
                              "def f():\n    import time\n    from .. import net\n"
                              "if False:\n    from vpnd import server\n"
                              "from . import wire\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = {mod for _, mod, _ in imports(pkg / "x.py")}
    assert {"time", "vpncore", "vpncore.net", "vpnd", "vpncore.proto", "vpncore.proto.wire"} <= found, found
    (pkg / "y.py").write_text("import socket\nsocket.socket()\n")
    with pytest.raises(AssertionError, match="socket"):
        test_proto_imports_only_pure_modules(pkg / "y.py")
    with pytest.raises(AssertionError, match="imports time"):
        test_proto_imports_only_pure_modules(pkg / "x.py")
