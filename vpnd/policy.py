"""Plans and the live policy of accounts: device limits, bandwidth caps, per-account counters.

A plan (from the server config) limits concurrent devices, bandwidth per account (a token bucket
per direction, shared by the account's devices) and new flows per second (enforced in nftables,
see egress.py). `AccountState` is the in-memory view of one account while it has live sessions:
its live session count, buckets and byte counters, which the timer moves into the per-day
statistics. Nothing here is per connection or per address.
"""

from __future__ import annotations

import time

from .registry import Plan


class TokenBucket:
    """Bytes per second with a burst; `take(n)` is False (drop) when the bucket is empty."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, mbit: float, burst_seconds: float = 0.25):
        self.rate = mbit * 1e6 / 8
        # A burst of 0.25 s: the cap drops whole super-packets (up to 64 KiB, ~45 TCP segments), and
        # with 0.05 s TCP stalled on retransmission timeouts at a quarter of the rate (measured:
        # ~5 Mbit/s on a 20 Mbit/s plan; 0.25 s gave 18.7-21.3).
        self.burst = max(self.rate * burst_seconds, 2 * 65536 + 1500)
        self.tokens = self.burst
        self.stamp = time.monotonic()

    def take(self, n: int, now: float) -> bool:
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.stamp = now
        if tokens > self.burst:
            tokens = self.burst
        if tokens < n:
            self.tokens = tokens
            return False
        self.tokens = tokens - n
        return True


class AccountState:
    """One account's live state in memory (while it has sessions, and its day counters)."""

    __slots__ = ("id", "plan", "sessions", "up", "down", "bytes_in", "bytes_out", "slot", "suspended")

    def __init__(self, account_id: str, plan: Plan, slot: int):
        self.id = account_id
        self.plan = plan
        self.slot = slot                  # index of its nftables flow-cap sets
        self.sessions: set = set()        # live Peer objects of this account's devices
        self.suspended = False
        self.bytes_in = self.bytes_out = 0
        if plan.bandwidth_mbit > 0:
            self.up, self.down = TokenBucket(plan.bandwidth_mbit), TokenBucket(plan.bandwidth_mbit)
        else:
            self.up = self.down = None

    def __repr__(self) -> str:
        return f"AccountState(slot={self.slot})"

    def __reduce__(self):
        raise TypeError("session state is memory-only")


class Policy:
    """Accounts, plans and egress rules for one server: who may connect, with how many devices.

    Keys come from the config's [[client]] entries (no account: no limits) and from the accounts
    registry (active accounts' devices), applied as a whole snapshot whenever it changes
    (`apply`); plans are the registry's.
    """

    def __init__(self, cfg, egress=None):
        self.cfg = cfg
        self.egress = egress
        self.static_keys = {c.public_key: c.psk for c in cfg.clients}
        self.key_account: dict[bytes, str] = {}         # device key -> account id (active and suspended)
        self.accounts: dict = {}                        # account id -> registry Account
        self.plans: dict[str, Plan] = dict(cfg.plans)   # the registry's, once a snapshot is applied
        self.live: dict[str, AccountState] = {}         # account id -> state while it has sessions
        self.generation = None                          # of the snapshot applied last
        self._slots = 0
        self.nft_script: list[str] = []                 # queued nftables changes, applied by a task
        self.slots_to_drop: list[int] = []              # nftables account slots to delete, by a task

    def __repr__(self) -> str:
        return f"Policy(accounts={len(self.accounts)})"

    # --- the registry -------------------------------------------------------------------------
    def apply(self, snapshot) -> None:
        """Take the registry's view (a Snapshot): accounts, their devices, plans."""
        self.generation = snapshot.generation
        self.accounts = snapshot.accounts
        self.plans = snapshot.plans
        self.key_account = {k: a.id for a in self.accounts.values() for k in a.devices}

    def authorized(self) -> dict[bytes, bytes | None]:
        """Every key that may handshake now, with its PSK."""
        keys = dict(self.static_keys)
        for a in self.accounts.values():
            if a.status == "active" and a.plan in self.plans:
                for k in a.devices:
                    keys.setdefault(k, None)
        return keys

    # --- sessions -------------------------------------------------------------------------------
    def admit(self, peer) -> tuple[AccountState | None, str | None]:
        """(account state, None) to admit a new session, or (None, reason) to refuse it."""
        aid = self.key_account.get(peer.public_key)
        if aid is None:
            if peer.public_key in self.static_keys:
                return None, None
            return None, "this device is not registered on this server"
        acct = self.accounts.get(aid)
        if acct is None or acct.status != "active":
            return None, "account suspended"
        plan = self.plans.get(acct.plan)
        if plan is None:
            return None, "account has an unknown plan; contact the operator"
        state = self.live.get(aid)
        if state is None:
            self._slots += 1
            state = self.live[aid] = AccountState(aid, plan, self._slots)
            if self.egress is not None:
                self.nft_script.append(self.egress.account_slot(state.slot, plan.new_flows_per_second))
        if len(state.sessions) >= plan.devices:
            return None, (f"device limit reached: plan {plan.name!r} allows {plan.devices} "
                          f"device{'s' if plan.devices != 1 else ''} at a time")
        state.sessions.add(peer)
        return state, None

    def addresses_added(self, state: AccountState, addresses) -> None:
        if state is not None and self.egress is not None:
            self.nft_script.extend(self.egress.element(state.slot, a, True) for a in addresses)

    def release(self, state: AccountState | None, peer, addresses) -> None:
        if state is None:
            return
        state.sessions.discard(peer)
        if self.egress is not None:
            self.nft_script.extend(self.egress.element(state.slot, a, False) for a in addresses)

    def to_end(self) -> list[tuple[object, str]]:
        """Live sessions the registry no longer allows: (peer, reason) for each."""
        out = []
        for aid, state in self.live.items():
            acct = self.accounts.get(aid)
            if acct is None:
                reason = "account removed"
            elif acct.status != "active":
                reason = "account suspended"
            else:
                plan = self.plans.get(acct.plan)
                if plan is not None and plan != state.plan:
                    state.plan = plan          # a plan change applies from now on
                    if self.egress is not None:
                        self.nft_script.append(self.egress.flow_cap(state.slot, plan.new_flows_per_second))
                    if plan.bandwidth_mbit > 0:
                        state.up, state.down = TokenBucket(plan.bandwidth_mbit), TokenBucket(plan.bandwidth_mbit)
                    else:
                        state.up = state.down = None
                out.extend((p, "device removed from the account") for p in state.sessions
                           if p.public_key not in acct.devices)
                continue
            out.extend((p, reason) for p in state.sessions)
        return out

    def forget_gone(self) -> list[str]:
        """Drop the live state of accounts removed or suspended (after their sessions ended): the
        state itself, its nftables slot (queued for deletion); returns their ids, whose per-day
        figures the caller drops too."""
        gone = [aid for aid, state in self.live.items() if not state.sessions and
                (aid not in self.accounts or self.accounts[aid].status != "active")]
        for aid in gone:
            state = self.live.pop(aid)
            if self.egress is not None:
                self.slots_to_drop.append(state.slot)
        return gone

    def take_bytes(self) -> dict[str, tuple[int, int]]:
        """Per-account bytes since the last call (for the day's statistics)."""
        out = {}
        for aid, state in list(self.live.items()):
            if state.bytes_in or state.bytes_out:
                out[aid] = (state.bytes_in, state.bytes_out)
                state.bytes_in = state.bytes_out = 0
        return out
