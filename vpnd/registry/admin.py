"""The admin commands on a registry (`vpnd account|device|plan|registry ...`), for either engine.

Each returns what it did twice: as JSON (for `--json`) and as text lines. Mistakes (an unknown
account, a duplicate key, a full device list, an unknown plan) are one clear line (UserError) from
the engine, raised before anything is written.
"""

from __future__ import annotations

from dataclasses import replace

from vpncore.configfile import encode_key, parse_key

from vpncore.cli import UserError

from . import Plan, RegistryUnavailable, open_registry


def _account_lines(a) -> str:
    lines = [f"account  {a.id}", f"plan     {a.plan}", f"status   {a.status}", f"created  {a.created}"]
    lines += [f"device   {encode_key(d)}" + (f"  {a.names[d]}" if d in a.names else "") for d in a.devices]
    return "\n".join(lines)


def _plan_line(p: Plan) -> str:
    bw = f"{p.bandwidth_mbit:g} Mbit/s" if p.bandwidth_mbit else "no bandwidth cap"
    flows = f"{p.new_flows_per_second} new flows/s" if p.new_flows_per_second else "no new-flow cap"
    return f"{p.name}  devices {p.devices}  {bw}  {flows}"


def run(location, cmd: str, op: str, args, config_plans=()) -> dict:
    """`config_plans`: the [plans] of the server config named by --config; for a SQLite registry
    (a server on its own) they are the registry's, as when that server starts."""
    try:
        return _run(location, cmd, op, args, config_plans)
    except RegistryUnavailable as exc:
        raise UserError(f"cannot reach the registry's database ({exc})", 1) from None


def _run(location, cmd: str, op: str, args, config_plans) -> dict:
    from vpnd.stats import utc_day
    from .migrate import migrate_json

    if cmd == "registry" and op == "init":
        reg = open_registry(location, create=True)
        if getattr(args, "reader", None):
            reg.grant_reader(args.reader)
        reg.close()
        return {"json": {"ok": True}, "text": "vpnd: the registry is ready" +
                (f"; role {args.reader} may read it" if getattr(args, "reader", None) else "")}
    reg = open_registry(location, create=(cmd == "registry") or None)   # SQLite: made on first use
    try:
        if config_plans and reg.engine == "sqlite":
            reg.put_plans(config_plans)
        if cmd == "registry":            # migrate
            n = migrate_json(args.source, reg)
            return {"json": {"ok": True, "accounts": n},
                    "text": f"vpnd: migrated {n} account{'s' if n != 1 else ''} from {args.source} (checked)"}
        if cmd == "plan":
            if op == "set":
                old = reg.snapshot().plans.get(args.name) or Plan(args.name, 1)
                given = {k: v for k, v in (("devices", args.devices), ("bandwidth_mbit", args.bandwidth_mbit),
                                           ("new_flows_per_second", args.new_flows_per_second)) if v is not None}
                reg.put_plan(replace(old, **given))      # what is not given stays as it was
                return {"json": {"ok": True}, "text": f"vpnd: plan {args.name} set"}
            if op == "remove":
                reg.remove_plan(args.name)
                return {"json": {"ok": True}, "text": f"vpnd: plan {args.name} removed"}
            plans = reg.snapshot().plans
            return {"json": {n: p.as_json() for n, p in sorted(plans.items())},
                    "text": "\n".join(_plan_line(p) for _, p in sorted(plans.items()))}
        if op == "list" and cmd == "account":
            accounts = reg.snapshot().accounts
            return {"json": {a.id: a.as_json() for a in accounts.values()},
                    "text": "\n".join(f"{a.id}  plan {a.plan}  {a.status}  devices {len(a.devices)}  created {a.created}"
                                      for a in accounts.values())}
        if op in ("show", "list"):
            a = reg.account(args.id)
            if cmd == "device":
                return {"json": a.as_json()["devices"],
                        "text": "\n".join(encode_key(d) + (f"  {a.names[d]}" if d in a.names else "")
                                          for d in a.devices)}
            return {"json": {a.id: a.as_json()}, "text": _account_lines(a)}
        if cmd == "device":
            key = parse_key(args.key, "the device public key")
            if op == "add":
                reg.add_device(args.id, key, args.name)
                verb = "device added to"
            else:
                reg.remove_device(args.id, key)
                verb = "device removed from"
            return {"json": {"ok": True, "account": args.id}, "text": f"vpnd: {verb} account {args.id}"}
        if op == "add":
            reg.add_account(args.id, args.plan, utc_day())
        elif op in ("suspend", "resume"):
            reg.set_status(args.id, "suspended" if op == "suspend" else "active")
        elif op == "remove":
            reg.remove_account(args.id)
        elif op == "set-plan":
            reg.set_account_plan(args.id, args.plan)
        verb = {"add": "created", "suspend": "suspended", "resume": "resumed", "remove": "removed",
                "set-plan": "moved to the new plan"}[op]
        return {"json": {"ok": True, "account": args.id}, "text": f"vpnd: account {args.id} {verb}"}
    finally:
        reg.close()
