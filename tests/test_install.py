"""make install / make uninstall into a scratch root (issue 18, point 5).

One `make install DESTDIR=<tmp>` for the module (a venv made by the machine's Python with the checkout
pip-installed into it: about 15 s from a warm pip cache, up to a minute from the package registry), then:
the installed programs print their version, the wrappers run the venv isolated, the venv names only its
final paths, the units, man pages, completions and example configs are there and usable, and
`make uninstall DESTDIR=<tmp>` leaves nothing but the operator's own files. Nothing outside the scratch
root may change: no file in the real /opt, /usr, /etc, and no system user.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENVDIR = "/opt/vpncore"
TIMEOUT = 900
# What a real install would write: a staged one must leave each as it was.
REAL_PATHS = [VENVDIR, VENVDIR + ".new", "/usr/local/bin/vpnd", "/usr/local/bin/vpnclient", "/etc/vpnd",
              "/etc/vpnclient", "/usr/local/lib/systemd/system/vpnd.service",
              "/usr/local/lib/systemd/system/vpnclient@.service", "/usr/local/share/man/man8/vpnd.8",
              "/usr/local/share/man/man8/vpnclient.8", "/usr/share/bash-completion/completions/vpnd",
              "/usr/share/bash-completion/completions/vpnclient", "/usr/local/share/zsh/site-functions/_vpnd",
              "/usr/local/share/zsh/site-functions/_vpnclient", "/usr/share/doc/vpncore"]
# The Makefile's variables: from the environment they would redirect the install.
MAKE_VARS = ["DESTDIR", "PREFIX", "BINDIR", "MANDIR", "SYSCONFDIR", "VENVDIR", "UNITDIR", "BASHCOMPDIR",
             "ZSHCOMPDIR", "DOCDIR", "SYSTEM_USER", "UNINSTALL_USER", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"]


def project_version() -> str:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def make(*args: str) -> subprocess.CompletedProcess:
    """make in the checkout, with umask 077: what it installs must not depend on the caller's umask
    (vpnd.service runs as the user vpnd, which has to read the venv)."""
    env = {k: v for k, v in os.environ.items() if k not in MAKE_VARS}
    r = subprocess.run(["sh", "-c", 'umask 077 && exec make --no-print-directory -C "$0" "$@"', str(REPO), *args],
                       env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=TIMEOUT)
    assert r.returncode == 0, f"make {' '.join(args)} failed:\n{r.stdout[-6000:]}"
    return r


def real_state() -> dict:
    state = {}
    for p in REAL_PATHS:
        try:
            st = os.lstat(p)
            state[p] = (st.st_mode, st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            state[p] = None
    state["user vpnd"] = subprocess.run(["getent", "passwd", "vpnd"], stdout=subprocess.PIPE, text=True).stdout
    return state


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir() or p.is_symlink()}


@pytest.fixture(scope="module")
def dest():
    tmp = Path(tempfile.mkdtemp(prefix="vpncore-install-"))
    before = real_state()
    try:
        root = tmp / "root"
        make("install", f"DESTDIR={root}")
        yield root
        assert real_state() == before, "a staged install changed the real system"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60, **kw)


def venv_python(dest: Path) -> str:
    return str(dest / VENVDIR.lstrip("/") / "bin" / "python")


def rerooted_wrapper(dest: Path, prog: str, where: Path) -> Path:
    """The installed wrapper with its venv path moved into the scratch root (it names the final one)."""
    text = (dest / "usr/local/bin" / prog).read_text()
    assert f"exec {VENVDIR}/bin/python -I -m {prog} \"$@\"" in text
    copy = where / prog
    copy.write_text(text.replace(f"{VENVDIR}/bin/python", venv_python(dest)))
    copy.chmod(0o755)
    return copy


@pytest.mark.parametrize("prog", ["vpnd", "vpnclient"])
def test_installed_programs_print_the_version(dest, prog, tmp_path):
    want = f"{prog} {project_version()}\n"
    r = run([venv_python(dest), "-I", "-m", prog, "--version"])
    assert (r.returncode, r.stdout, r.stderr) == (0, want, "")
    # the venv's own console script, by the venv's interpreter (its shebang names /opt/vpncore)
    r = run([venv_python(dest), "-I", str(dest / VENVDIR.lstrip("/") / "bin" / prog), "--version"])
    assert (r.returncode, r.stdout) == (0, want)
    # the wrapper, run from a directory holding a package of the same name: -I keeps it out
    (tmp_path / "bin").mkdir()
    wrapper = rerooted_wrapper(dest, prog, tmp_path / "bin")
    fake = tmp_path / "cwd" / prog
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text("print('not the installed code')\n")
    r = run([str(wrapper), "--version"], cwd=tmp_path / "cwd", env={**os.environ, "PYTHONPATH": str(tmp_path / "cwd")})
    assert (r.returncode, r.stdout, r.stderr) == (0, want, "")


@pytest.mark.parametrize("prog", ["vpnd", "vpnclient"])
def test_unmodified_wrapper_with_the_scratch_opt_mounted(dest, prog):
    """The installed wrapper itself, in a mount namespace where the scratch root's /opt is /opt."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not os.path.isdir("/opt"):
        pytest.skip("needs root, unshare and /opt for a private mount of the scratch /opt")
    probe = run(["unshare", "--mount", "--propagation", "private", "true"])
    if probe.returncode != 0:
        pytest.skip(f"no mount namespaces here: {probe.stderr.strip()}")
    r = run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
             'mount --bind "$1/opt" /opt && exec "$1/usr/local/bin/$2" --version', "sh", str(dest), prog])
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{prog} {project_version()}\n", "")


def test_venv_names_only_its_final_location(dest):
    venv = dest / VENVDIR.lstrip("/")
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg
    assert os.readlink(venv / "bin" / "python3").startswith("/")       # the machine's interpreter
    for prog in ("vpnd", "vpnclient", "pip"):
        assert (venv / "bin" / prog).read_text().splitlines()[0] in (f"#!{VENVDIR}/bin/python", f"#!{VENVDIR}/bin/python3")
    stale = []
    for p in venv.rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            if str(dest).encode() in data or (VENVDIR + ".new").encode() in data:
                stale.append(str(p.relative_to(venv)))
    assert stale == []
    assert not (dest / (VENVDIR.lstrip("/") + ".new")).exists()
    # the documentation generators ran from a temporary directory, not from the venv
    r = run([venv_python(dest), "-I", "-c", "import argparse_manpage"])
    assert r.returncode != 0
    r = run([venv_python(dest), "-I", "-c", "import shtab"])
    assert r.returncode != 0


def test_everything_but_the_config_directories_is_world_readable(dest):
    unreadable = []
    for p in dest.rglob("*"):
        rel = str(p.relative_to(dest))
        if p.is_symlink() or rel.startswith("etc/vpn"):
            continue
        need = 0o005 if p.is_dir() else 0o004
        if p.stat().st_mode & need != need:
            unreadable.append(f"{rel} {oct(p.stat().st_mode & 0o7777)}")
    assert unreadable == []
    for prog in ("vpnd", "vpnclient"):
        assert (dest / "usr/local/bin" / prog).stat().st_mode & 0o777 == 0o755


def test_units_and_docs(dest):
    for unit in ("vpnd.service", "vpnclient@.service"):
        installed = dest / "usr/local/lib/systemd/system" / unit
        assert installed.read_text() == (REPO / "packaging" / unit).read_text()
        assert oct(installed.stat().st_mode & 0o777) == "0o644"
    assert "ExecStart=/usr/local/bin/vpnd serve" in (dest / "usr/local/lib/systemd/system/vpnd.service").read_text()
    for name in ("README.md", "LICENSE"):
        assert (dest / "usr/share/doc/vpncore" / name).read_bytes() == (REPO / name).read_bytes()
    for prog in ("vpnd", "vpnclient"):
        assert os.access(dest / "usr/local/bin" / prog, os.X_OK)


@pytest.mark.parametrize("prog,words,man_only", [
    ("vpnd", ["serve", "genkey", "stats", "account", "--config"], ["/etc/vpnd/vpnd.toml", "vpnd.service"]),
    ("vpnclient", ["up", "down", "genkey", "register", "--config"], ["/etc/vpnclient/vpn0.toml", "exit status"]),
])
def test_man_pages_and_completions(dest, prog, words, man_only):
    page = (dest / "usr/local/share/man/man8" / f"{prog}.8").read_text()
    assert page.startswith(f'.TH {prog.upper()} "8"')
    assert f"vpncore {project_version()}" in page
    bash = (dest / "usr/share/bash-completion/completions" / prog).read_text()
    zsh = (dest / "usr/local/share/zsh/site-functions" / f"_{prog}").read_text()
    assert zsh.startswith(f"#compdef {prog}")
    assert f"complete -o bashdefault -F _shtab_{prog} {prog}" in bash
    for word in words:
        assert word.replace("-", "\\-") in page, word
        assert word in bash and word in zsh, word
    for text in man_only:
        assert text.replace("-", "\\-") in page, text
    if shutil.which("bash"):
        assert run(["bash", "-n", str(dest / "usr/share/bash-completion/completions" / prog)]).returncode == 0
    if shutil.which("groff"):       # valid roff: no warnings (an unknown request, a bad escape)
        r = run(["groff", "-man", "-Tutf8", "-ww", "-z", str(dest / "usr/local/share/man/man8" / f"{prog}.8")])
        assert (r.returncode, r.stderr) == (0, "")


CHECK_CONFIG = """
import sys
import {prog}.config as c
cfg = c.load(sys.argv[1])
print(type(cfg).__name__, len(cfg.{entries}))
"""


@pytest.mark.parametrize("prog,example,keyfile,placeholder,entries", [
    ("vpnd", "etc/vpnd/vpnd.example.toml", "vpnd.key", "REPLACE-WITH-THE-CLIENT-PUBLIC-KEY", "clients"),
    ("vpnclient", "etc/vpnclient/vpnclient.example.toml", "vpn0.key", "REPLACE-WITH-THE-SERVER-PUBLIC-KEY",
     "servers"),
])
def test_example_configs_load_once_the_keys_are_filled_in(dest, tmp_path, prog, example, keyfile, placeholder,
                                                          entries):
    installed = dest / example
    assert installed.read_text() == (REPO / "packaging" / installed.name).read_text()
    text = installed.read_text()
    assert placeholder in text
    conf = tmp_path / "test.toml"
    conf.write_text(text)
    check = [venv_python(dest), "-I", "-c", CHECK_CONFIG.format(prog=prog, entries=entries), str(conf)]
    r = run(check)                        # as shipped: the placeholders stop it, with one clear line
    assert r.returncode != 0 and "UserError" in r.stderr
    keys = [base64.b64encode(os.urandom(32)).decode() for _ in range(2)]
    (tmp_path / keyfile).write_text(keys[0] + "\n")
    conf.write_text(text.replace(placeholder, keys[1]))
    r = run(check)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[1] == "1"
    mode = (dest / example).parent.stat().st_mode & 0o777
    assert mode == 0o750                  # group: the unit's user (chgrp in a real install)


def test_uninstall_leaves_only_the_operators_files(dest):
    (dest / "etc/vpnd/vpnd.toml").write_text("[server]\n")           # the operator's config
    changed = dest / "etc/vpnclient/vpnclient.example.toml"
    changed.write_text(changed.read_text() + "# edited\n")             # an example the operator edited
    out = make("uninstall", f"DESTDIR={dest}").stdout
    assert files_under(dest) == {"etc/vpnd/vpnd.toml", "etc/vpnclient/vpnclient.example.toml"}
    assert "keeping" in out
    (dest / "etc/vpnd/vpnd.toml").unlink()
    changed.unlink()
    make("uninstall", f"DESTDIR={dest}")                               # again: nothing to do, no error
    assert list(dest.iterdir()) == []
