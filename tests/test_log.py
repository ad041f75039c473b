"""vpncore/log.py: sd-daemon priority prefixes under the journal, and no per-session line from vpnd
at the default level (issue 18, point 1)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vpncore import log
from vpncore.log import DEBUG, EVENTS, INFO, QUIET, VERBOSE, Log, event_level, event_priority

REPO = Path(__file__).resolve().parents[1]
PREFIXED = re.compile(r"^<([0-7])>")


def journal_env(monkeypatch, f) -> None:
    st = os.fstat(f.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")


def emit_all(stream) -> None:
    lg = Log("vpnd", DEBUG, stream)
    for name in EVENTS:
        lg.event(name)


def test_journal_lines_carry_their_priority(tmp_path, monkeypatch):
    with open(tmp_path / "err", "w") as f:
        journal_env(monkeypatch, f)
        emit_all(f)
    lines = (tmp_path / "err").read_text().splitlines()
    assert len(lines) == len(EVENTS)
    for name, line in zip(EVENTS, lines):
        assert line == f"<{event_priority(name)}>vpnd: {EVENTS[name][1]}", line
    got = {name: int(PREFIXED.match(line).group(1)) for name, line in zip(EVENTS, lines)}
    assert got["registry-lost"] == 4 and got["harden-warning"] == 4
    assert got["session-started"] == got["session-ended"] == 7     # per session: debug priority
    assert got["started"] == 5 and got["registry-back"] == 5


@pytest.mark.parametrize("value", [None, "", "garbage", "1:2", "{dev}:{other}", "{other}:{ino}"])
def test_no_prefix_outside_the_journal(tmp_path, monkeypatch, value):
    with open(tmp_path / "err", "w") as f:
        st = os.fstat(f.fileno())
        if value is None:
            monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        else:
            monkeypatch.setenv("JOURNAL_STREAM", value.format(dev=st.st_dev, ino=st.st_ino, other=st.st_ino + 1))
        emit_all(f)
        assert log.journal_prefix(f, log.ERR) == ""
    text = (tmp_path / "err").read_text()
    assert text.count("\n") == len(EVENTS) and "<" not in text


def test_no_prefix_on_a_stream_without_fd(tmp_path, monkeypatch):
    with open(tmp_path / "err", "w") as f:
        journal_env(monkeypatch, f)
        buf = io.StringIO()
        emit_all(buf)
        assert PREFIXED.search(buf.getvalue()) is None and buf.getvalue().startswith("vpnd: ")
        assert log.journal_prefix(buf, log.ERR) == "" and log.journal_prefix(f, log.ERR) == "<3>"


def test_journal_detected_through_a_real_stderr(tmp_path):
    """As under systemd: a process whose fd 2 is the stream JOURNAL_STREAM names."""
    err = tmp_path / "err"
    code = ("import sys; from vpncore.log import Log, report_crash, journal_prefix; "
            "Log('vpnd').event('registry-lost'); Log('vpnd').event('started'); "
            "print(journal_prefix(sys.stderr, 3) + 'vpnd: error: x', file=sys.stderr); "
            "report_crash('vpnd', ValueError('boom'))")
    with open(err, "w") as f:
        st = os.fstat(f.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}", PYTHONPATH=str(REPO))
        subprocess.run([sys.executable, "-c", code], stderr=f, env=env, check=True, timeout=30)
    lines = err.read_text().splitlines()
    assert lines[:3] == [f"<4>vpnd: {EVENTS['registry-lost'][1]}", "<5>vpnd: started", "<3>vpnd: error: x"]
    crash = lines[3:]
    assert crash[0] == "<3>vpnd: internal error (please report it):" and len(crash) > 1
    assert all(line.startswith("<3>") for line in crash), crash     # each line is its own journal entry
    assert crash[-1] == "<3>ValueError: boom"


def test_report_crash_unchanged_outside_the_journal(monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    buf = io.StringIO()
    log.report_crash("vpnd", ValueError("at 10.1.2.3"), buf)
    assert buf.getvalue().startswith("vpnd: internal error (please report it):\n")
    assert "<scrubbed>" in buf.getvalue() and "10.1.2.3" not in buf.getvalue()


def test_levels_filter_as_before():
    for level in (QUIET, INFO, VERBOSE, DEBUG):
        buf = io.StringIO()
        emit_all_at = Log("vpnd", level, buf)
        for name in EVENTS:
            emit_all_at.event(name)
        assert buf.getvalue().count("\n") == sum(1 for n in EVENTS if event_level(n) <= level)
    with pytest.raises(TypeError):
        Log("vpnd", DEBUG, io.StringIO()).event("session-started", active="1")


def vpnd_event_names() -> set[str]:
    names = set()
    for path in (REPO / "vpnd").rglob("*.py"):
        names |= set(re.findall(r"""\.event\(\s*["']([\w-]+)["']""", path.read_text()))
    return names


def test_vpnd_prints_nothing_per_session_at_the_default_level():
    """Every event vpnd emits and the default level (info) prints is one of the few that never
    happen per session; the per-session ones are at verbose or debug (the journal would stamp each
    line with a microsecond time: a record of when a session started and ended)."""
    used = vpnd_event_names()
    assert {"session-started", "session-ended", "started"} <= used       # the scan finds the call sites
    assert used <= set(EVENTS)
    shown = {n for n in used if event_level(n) <= INFO}
    assert shown <= log.SERVER_DEFAULT_LEVEL, shown - log.SERVER_DEFAULT_LEVEL
    assert log.SERVER_PER_SESSION <= used
    assert all(event_level(n) > INFO for n in log.SERVER_PER_SESSION)
    assert not log.SERVER_PER_SESSION & log.SERVER_DEFAULT_LEVEL
