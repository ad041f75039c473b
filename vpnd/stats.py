"""Aggregate statistics, per UTC day, in memory only (DESIGN §4).

What exists: per day, the number of sessions that started, bytes in and out
(summed over all sessions), and drop counters by reason; and the number of
sessions active now. What does not exist: any figure per connection or per
address, or any time finer than a day. Only the last DAYS_KEPT days are kept.
"""

from __future__ import annotations

import time
from collections import Counter

DAYS_KEPT = 7


def utc_day(unix_time: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() if unix_time is None else unix_time))


class DayTotals:
    __slots__ = ("connections", "bytes_in", "bytes_out", "drops", "accounts")

    def __init__(self):
        self.connections = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.drops: Counter[str] = Counter()
        self.accounts: dict[str, list[int]] = {}   # account id -> [bytes in, bytes out] this day

    def as_dict(self) -> dict:
        return {"connections": self.connections, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "drops": dict(sorted(self.drops.items())),
                "accounts": {a: {"bytes_in": v[0], "bytes_out": v[1]} for a, v in sorted(self.accounts.items())}}


class DailyStats:
    def __init__(self, clock=time.time):
        self._clock = clock
        self.days: dict[str, DayTotals] = {}

    def __repr__(self) -> str:
        return f"DailyStats(days={len(self.days)})"

    def today(self) -> DayTotals:
        day = utc_day(self._clock())
        totals = self.days.get(day)
        if totals is None:
            totals = self.days[day] = DayTotals()
            for old in sorted(self.days)[:-DAYS_KEPT]:
                del self.days[old]
        return totals

    def connection(self) -> None:
        self.today().connections += 1

    def add_bytes(self, bytes_in: int, bytes_out: int) -> None:
        t = self.today()
        t.bytes_in += bytes_in
        t.bytes_out += bytes_out

    def add_account_bytes(self, per_account: dict) -> None:
        if per_account:
            accounts = self.today().accounts
            for aid, (rx, tx) in per_account.items():
                v = accounts.setdefault(aid, [0, 0])
                v[0] += rx
                v[1] += tx

    def account_ids(self) -> set[str]:
        return {aid for totals in self.days.values() for aid in totals.accounts}

    def forget_accounts(self, ids) -> None:
        """An account removed or suspended: its per-day figures go too."""
        for totals in self.days.values():
            for aid in ids:
                totals.accounts.pop(aid, None)

    def add_drops(self, drops: Counter) -> None:
        if drops:
            self.today().drops.update(drops)

    def snapshot(self, active: int) -> dict:
        return {"active_sessions": active, "days": {d: t.as_dict() for d, t in sorted(self.days.items())}}


def format_text(snap: dict) -> str:
    lines = [f"sessions active now: {snap['active_sessions']}"]
    for day, t in snap["days"].items():
        drops = ", ".join(f"{k} {v}" for k, v in t["drops"].items()) or "none"
        lines.append(f"{day}  connections {t['connections']}  in {t['bytes_in']} B  out {t['bytes_out']} B  "
                     f"drops: {drops}")
        for aid, a in t.get("accounts", {}).items():
            lines.append(f"{day}  account {aid}  in {a['bytes_in']} B  out {a['bytes_out']} B")
    return "\n".join(lines)
