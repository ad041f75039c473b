"""vpnd's stderr at every log level, with sessions coming and going (issue 18, point 1).

Under systemd every line reaches the journal, which stamps it with a microsecond time: a line
printed once per session would be a record of when each session started and ended. So at the
default level (info) and at quiet, the number of lines vpnd prints must not grow with the number
of sessions; at verbose and debug, asked for by the operator, the per-session lines do appear
(which shows the count would catch them). The real vpnd (tests/e2e/vpnd_harness.py) runs in a
namespace; the sessions come from tests/e2e/canary_driver.py, driven as in test_nologs.py: first
2 sessions, then 8 more, each closed by its client. Runs at info and debug have stderr named by
JOURNAL_STREAM, as under systemd, and their lines must carry sd-daemon priority prefixes; the
others must carry none.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.e2e import vpnd_harness
from tests.e2e.netns import Topology, require_root, wait_until
from tests.e2e.test_nologs import CANARIES4, World, make_keys, write_vpnd_config
from vpncore.log import EVENTS, SERVER_PER_SESSION, event_priority

pytestmark = pytest.mark.netns

ROUNDS = (2, 8)                     # sessions in the first round, then in the second
SENTENCES = {f"vpnd: {sentence}": name for name, (_, sentence, *_) in EVENTS.items()}
PREFIX = re.compile(r"^<([0-7])>")


class LevelWorld(World):
    """test_nologs.World's vpnd at `level` instead of debug, with as many clients as the rounds use;
    its drive/query/stop as they are there."""

    def __init__(self, topo: Topology, tmp: Path, level: str, journal: bool):
        self.topo, self.tmp = topo, tmp
        self.server_key, self.server_pub = make_keys(1)[0]
        self.keys = make_keys(sum(ROUNDS))
        self.sock = tmp / "vpnd.sock"
        cfg = write_vpnd_config(tmp / "vpnd.toml", self.server_key, self.sock, self.keys)
        text = cfg.read_text()
        assert 'log_level = "debug"\n' in text
        cfg.write_text(text.replace('log_level = "debug"\n', f'log_level = "{level}"\n'))
        for c in CANARIES4[:max(ROUNDS)]:
            topo.add_address(topo.client, topo.link.client_if, f"{c}/24")
        self.out = open(tmp / "vpnd.stdout", "wb")
        self.err = open(tmp / "vpnd.stderr", "wb")
        argv = vpnd_harness.argv(cfg, hooks=False)
        assert argv[0] == "env"
        if journal:
            st = os.fstat(self.err.fileno())
            argv.insert(1, f"JOURNAL_STREAM={st.st_dev}:{st.st_ino}")
        else:
            argv.insert(1, "--unset=JOURNAL_STREAM")
        self.proc = topo.popen(topo.server, *argv, stdout=self.out, stderr=self.err, cwd=str(tmp))
        assert wait_until(lambda: self.sock.exists() or self.proc.poll() is not None, 10), "vpnd did not start"
        assert self.proc.poll() is None, (tmp / "vpnd.stderr").read_text()

    def round(self, keys) -> list[str]:
        """`keys` as sessions that handshake, send traffic and close; vpnd's stderr lines once they ended."""
        self.clients = keys
        result = self.drive(close=list(range(len(keys))))
        assert result["established"] == len(keys), result
        assert wait_until(lambda: json.loads(self.query("stats"))["active_sessions"] == 0, 10), \
            "the sessions did not end"
        return self.lines()

    def lines(self) -> list[str]:
        return (self.tmp / "vpnd.stderr").read_text().splitlines()


@pytest.fixture
def level_world(tmp_path):
    require_root()
    topos = []

    def make(level: str, journal: bool) -> LevelWorld:
        topos.append(Topology())
        return LevelWorld(topos[-1], tmp_path, level, journal)
    yield make
    for topo in topos:
        topo.close()


def unprefixed(lines: list[str]) -> list[str]:
    return [PREFIX.sub("", line, count=1) for line in lines]


def per_session(lines: list[str]) -> list[str]:
    return [line for line in unprefixed(lines) if SENTENCES.get(line.split(" active=")[0]) in SERVER_PER_SESSION]


@pytest.mark.parametrize("level,journal", [("quiet", False), ("info", True), ("verbose", False), ("debug", True)])
def test_lines_per_session_only_when_asked(level_world, level, journal):
    w = level_world(level, journal)
    first = w.round(w.keys[:ROUNDS[0]])
    second = w.round(w.keys[ROUNDS[0]:])
    assert w.stop() == 0
    final = w.lines()
    body = unprefixed(final)

    if level in ("quiet", "info"):
        assert per_session(final) == [], f"per-session lines at log_level {level}: {per_session(final)}"
        assert len(second) == len(first), \
            f"vpnd printed more lines with more sessions at log_level {level}: {first} -> {second}"
    else:
        # the check above would catch them: here they are, one started and one ended per session
        assert len(per_session(first)) == 2 * ROUNDS[0], first
        assert len(per_session(second)) == 2 * sum(ROUNDS), second
        assert len(second) > len(first)
    if level == "quiet":
        assert final == [], final
    else:
        assert body[0] == "vpnd: started" and body[-1] == "vpnd: stopped", body

    for raw, line in zip(final, body):
        name = SENTENCES.get(line.split(" active=")[0])
        if journal:
            assert PREFIX.match(raw), f"no sd-daemon priority on a line to the journal: {raw!r}"
            if name is not None:
                assert raw.startswith(f"<{event_priority(name)}>"), raw
        else:
            assert not PREFIX.match(raw), f"a priority prefix without the journal: {raw!r}"
