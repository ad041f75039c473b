"""vpncore: the VPN protocol core (sans-IO) and its I/O layer."""
