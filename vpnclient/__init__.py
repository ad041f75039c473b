"""vpnclient: the command-line client, a thin policy shell over vpncore."""
