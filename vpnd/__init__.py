"""vpnd: the server daemon, a thin policy shell over vpncore."""
