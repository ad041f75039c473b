"""Micro benchmark (no root): the shipped pump over a fake TUN and loopback UDP, plus per-call costs.

Four processes: a generator writes packets into the client's fake TUN (vpncore/net/fake.py: one
end of an AF_UNIX datagram socketpair, which keeps packet boundaries like a TUN fd), the real
vpnclient (vpnclient.client.Client, its pump: cutting, governor, held sends and TUN writer thread
as shipped) encrypts them to the real vpnd (vpnd.server.Server, attached to the fake TUN and a
loopback socket) and the server writes them to its fake TUN, where this process counts what
arrives. Sizes: 64 B and 1,400 B packets, and
64 KiB TCP super-packets (virtio_net_hdr with GSO_TCPV4, as a TUN with offloads gives).

    python bench/micro.py [--seconds 5] [--json-only]

Prints one JSON object per line and, last, a JSON summary.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import multiprocessing as mp
import os
import resource
import socket
import struct
import sys
import tempfile
import time
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt  # noqa: E402

from vpncore.proto.constants import KIND_DATA  # noqa: E402
from vpncore.proto.gso import VNET_HDR, checksum  # noqa: E402
from vpncore.proto.keypair import Keypair  # noqa: E402

CLIENT_ADDR, SERVER_ADDR = "198.19.0.2", "198.19.0.1"
SOCKBUF = 8 << 20


def _socketpair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKBUF)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKBUF)
    return a, b


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_server(server_key: bytes, client_pub: bytes, tun_fd: int, port_q, seconds: float, result_q):
    import trio

    from vpncore.log import Log, QUIET
    from vpncore.net.fake import FakeTun
    from vpncore.net.udp import open_listener
    from vpnd.config import ClientEntry, ServerConfig
    from vpnd.server import Server

    cfg = ServerConfig(private_key=server_key, listen=[("127.0.0.1", 0)],
                       pool4=ipaddress.ip_network("198.19.0.0/24"), clients=[ClientEntry(client_pub)])
    srv = Server(cfg, Log("vpnd", QUIET))
    sock = open_listener("127.0.0.1", 0)
    srv.attach(FakeTun(socket.socket(fileno=tun_fd)), [sock])
    port_q.put(sock.getsockname()[1])

    async def main():
        with trio.move_on_after(seconds):
            await srv.run()
    cpu0 = _cpu()
    trio.run(main)
    result_q.put(("server", _cpu() - cpu0))


def run_client(client_key: bytes, server_pub: bytes, port: int, tun_fd: int, sock_path: str, seconds: float,
               result_q):
    import trio

    from vpncore.log import Log, QUIET
    from vpncore.net.fake import FakeApplied, FakeTun
    from vpncore.net.udp import open_connected
    from vpnclient.client import Client
    from vpnclient.config import ClientConfig

    cfg = ClientConfig(private_key=client_key, server_host="127.0.0.1", server_port=port,
                       server_public=server_pub, control_socket=sock_path, persistent_keepalive=0)
    cl = Client(cfg, Log("vpnclient", QUIET), out=lambda line: None)
    sock, endpoint = open_connected("127.0.0.1", port)
    cl.attach(FakeTun(socket.socket(fileno=tun_fd)), sock, endpoint, FakeApplied())

    async def main():
        with trio.move_on_after(seconds):
            await cl.run()
    cpu0 = _cpu()
    trio.run(main)
    result_q.put(("client", _cpu() - cpu0))


def ipv4_udp(size: int) -> bytes:
    """A complete IPv4/UDP packet of `size` bytes from the client's to the server's tunnel address."""
    payload = bytes(size - 28)
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 1, 0, 64, 17, 0,
                                ipaddress.ip_address(CLIENT_ADDR).packed, ipaddress.ip_address(SERVER_ADDR).packed))
    hdr[10:12] = struct.pack("!H", checksum(bytes(hdr)))
    udp = struct.pack("!HHHH", 40000, 9, size - 20, 0)
    return bytes(hdr) + udp + payload


def tcp_super(total: int = 65536 - 10 - 16, mss: int = 1380) -> bytes:
    """virtio_net_hdr (GSO_TCPV4, NEEDS_CSUM) + one IPv4/TCP super-packet, as a TUN with TSO gives."""
    size = total
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 1, 0x4000, 64, 6, 0,
                                ipaddress.ip_address(CLIENT_ADDR).packed, ipaddress.ip_address(SERVER_ADDR).packed))
    hdr[10:12] = struct.pack("!H", checksum(bytes(hdr)))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 1, 5 << 4, 0x18, 65535, 0, 0)
    vnet = VNET_HDR.pack(1, 1, 40, mss, 20, 16)
    return vnet + bytes(hdr) + tcp + bytes(size - 40)


def generate(fd: int, frame: bytes, seconds: float, start_evt):
    start_evt.wait(30)
    s = socket.socket(fileno=fd)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(64):
            try:
                s.send(frame)
            except OSError:
                time.sleep(0.0005)
    s.detach()


def pump(size_label: str, frame: bytes, seconds: float) -> dict:
    from vpncore.keys import genkey
    from vpncore.configfile import parse_key
    from nacl.bindings import crypto_scalarmult_base
    from vpnclient.client import query

    ctx = mp.get_context("fork")
    sk, ck = parse_key(genkey(), "k"), parse_key(genkey(), "k")
    ctun_app, ctun_gen = _socketpair()      # client's TUN: pump end, generator end
    stun_app, stun_sink = _socketpair()     # server's TUN: pump end, our sink end
    port_q, result_q, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    tmp = tempfile.mkdtemp(prefix="vpnmicro-")
    sock_path = os.path.join(tmp, "c.sock")
    life = seconds + 8
    srv = ctx.Process(target=run_server, args=(sk, crypto_scalarmult_base(ck), stun_app.fileno(), port_q, life, result_q))
    srv.start()
    port = port_q.get(timeout=10)
    cli = ctx.Process(target=run_client, args=(ck, crypto_scalarmult_base(sk), port, ctun_app.fileno(), sock_path,
                                               life, result_q))
    cli.start()
    gen = ctx.Process(target=generate, args=(ctun_gen.fileno(), frame, seconds, start))
    gen.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                st = query(sock_path, "status", timeout=1)
                if st.get("state") == "established" and st.get("mtu"):
                    break
            except Exception:
                pass
            time.sleep(0.05)
        time.sleep(0.2)   # the server confirms the session with the first transport message
        stun_sink.settimeout(1.0)
        start.set()
        packets = nbytes = 0
        t0 = None
        end = time.monotonic() + seconds + 1
        while time.monotonic() < end:
            try:
                got = stun_sink.recv(70000)
            except socket.timeout:
                if t0 is not None:
                    break
                continue
            if t0 is None:
                t0 = time.monotonic()
            packets += 1
            nbytes += len(got) - 10
        elapsed = max(1e-9, time.monotonic() - (t0 or time.monotonic()))
        gen.join(seconds + 5)
        cli.join(life + 5)
        srv.join(life + 5)
        cpu = dict(result_q.get(timeout=5) for _ in range(2))
    finally:
        for p in (gen, cli, srv):
            if p.is_alive():
                p.kill()
        for s in (ctun_app, ctun_gen, stun_app, stun_sink):
            s.close()
        try:
            os.unlink(sock_path)
        except OSError:
            pass
        os.rmdir(tmp)
    return {"bench": "pump", "size": size_label, "packets_per_s": round(packets / elapsed),
            "gbit_per_s": round(nbytes * 8 / elapsed / 1e9, 3), "packets": packets,
            "client_cpu_s": round(cpu.get("client", 0), 2), "server_cpu_s": round(cpu.get("server", 0), 2)}


def per_call_costs() -> list[dict]:
    kp = Keypair(os.urandom(32), os.urandom(32), 1, 2, 0.0, True)
    rx = Keypair(kp._keys[1], kp._keys[0], 2, 1, 0.0, False)
    out = []
    for size in (64, 1400, 65536):
        plain = bytes(size)
        n = 20000 if size < 10000 else 2000
        t_seal = timeit.timeit(lambda: kp.seal(KIND_DATA, plain), number=n) / n
        dgs = [kp.seal(KIND_DATA, plain) for _ in range(n)]
        tx = Keypair(os.urandom(32), os.urandom(32), 1, 2, 0.0, True)
        tx._seal, rx_open = kp._seal, rx
        it = iter(enumerate(dgs, start=kp.send_counter - n))
        t_open = timeit.timeit(lambda: rx_open.open(*_dg_counter(next(it))), number=n) / n
        key, nonce, ad = os.urandom(32), bytes(12), bytes(16)
        t_nacl = timeit.timeit(lambda: crypto_aead_chacha20poly1305_ietf_encrypt(plain, ad, nonce, key), number=n) / n
        out.append({"bench": "aead", "size": size, "seal_us": round(t_seal * 1e6, 2), "open_us": round(t_open * 1e6, 2),
                    "pynacl_encrypt_us": round(t_nacl * 1e6, 2)})
    return out


def _dg_counter(item):
    counter, dg = item
    return dg, counter


def handshakes_per_second(n: int = 300) -> dict:
    from vpncore.proto.client import ClientConnection
    from vpncore.proto.noise import public_key
    from vpncore.proto.server import ServerProtocol

    sk, ck = os.urandom(32), os.urandom(32)
    srv = ServerProtocol(private_key=sk, rng=os.urandom)
    srv.authorize(public_key(ck))
    t0 = time.perf_counter()
    for i in range(n):
        cl = ClientConnection(private_key=ck, server_public=public_key(sk), rng=os.urandom, wall_offset=i)
        cl.connect(float(i))
        for dg in cl.datagrams_to_send():
            srv.receive_datagram(dg, ("198.18.0.2", 1000), float(i))
        for _, dg in srv.datagrams_to_send():
            cl.receive_datagram(dg, float(i))
        for dg in cl.datagrams_to_send():
            srv.receive_datagram(dg, ("198.18.0.2", 1000), float(i))
        srv.datagrams_to_send()
        while srv.next_event():
            pass
        assert cl.state == "established"
    dt = time.perf_counter() - t0
    return {"bench": "handshake", "full_handshakes_per_s": round(n / dt), "note": "initiator and responder work both counted"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args(argv)
    results = []
    for r in per_call_costs():
        print(json.dumps(r), flush=True)
        results.append(r)
    r = handshakes_per_second()
    print(json.dumps(r), flush=True)
    results.append(r)
    for label, frame in (("64B", bytes(10) + ipv4_udp(64)), ("1400B", bytes(10) + ipv4_udp(1400)),
                         ("64KiB-super", tcp_super())):
        r = pump(label, frame, args.seconds)
        print(json.dumps(r), flush=True)
        results.append(r)
    summary = {r["size"]: {"pps": r["packets_per_s"], "gbps": r["gbit_per_s"]} for r in results if r["bench"] == "pump"}
    print(json.dumps({"micro": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
