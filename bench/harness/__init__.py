"""The benchmarks' shared harness (bench/e2e.py, loss.py, scale.py).

    host      commands, polling, signals, root and tool checks, the bench lock, /proc readings
    topology  BenchTopology: tests/e2e/netns.Topology (one server and one client namespace, one veth)
              plus a temp folder, logs and the segmented-underlay mode
    peers     the tunnels compared: bare veth, vpnd (tests/e2e/vpn.py helpers), wireguard-go, OpenVPN
    measure   iperf3 TCP/UDP, ping idle and under load, one repetition on a fresh topology
    results   summaries, machine info, bench/results/<date>.json/.md/.png

Import it as `bench.harness` with the repository root on sys.path (each script puts it there):
`tests.e2e` and `vpncore` are imported from the root too.
"""
