"""Specification constants (SPEC §7). A test checks this table against SPEC.md.

Implementation choices (batch sizes, buffer sizes) live elsewhere, never here.
"""

# §4 Handshake: the Noise protocol name and the prologue.
CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"vpncore tunnel v1"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

# §3 Message types (first byte of every datagram).
MSG_INITIATION = 1
MSG_RESPONSE = 2
MSG_COOKIE_REPLY = 3
MSG_TRANSPORT = 4

# §5 Transport payload kinds (second byte of a transport message).
KIND_DATA = 0      # one IP packet plus zero padding, or nothing (keepalive)
KIND_CONTROL = 1   # one control message (§6)
KIND_SUPER = 2     # one fragment of a super-packet (§5.5)

# §5.5 Super-packets: one AEAD message over virtio_net_hdr + IP super-packet, sent as fragments.
VNET_HDR_LEN = 10
SUPER_MAX_FRAGMENTS = 64
SUPER_MAX_PLAINTEXT = 65536 + VNET_HDR_LEN + 16
SUPER_MAX_PARTIAL = 8       # incomplete super-packets held per keypair; the oldest is evicted
FEATURE_SUPERPACKET = "superpacket"
FEATURE_PARITY = "parity"
SUPER_PARITY_NO = 255       # frag_no of a super-packet's parity fragment
SUPER_PARITY_MIN = 3        # fewest data fragments a super-packet with parity has
LOSS_REPORT_INTERVAL = 1    # seconds between `loss` reports by a receiver of super-packets (§6.3)
LOSS_REPORT_EARLY = 0.1     # ... but one goes out this soon after the previous when a super-packet is lost

# Sizes in bytes.
KEY_LEN = 32
TAG_LEN = 16
MAC_LEN = 16
TIMESTAMP_LEN = 12
COOKIE_NONCE_LEN = 24
INITIATION_LEN = 148
RESPONSE_LEN = 92
COOKIE_REPLY_LEN = 64
TRANSPORT_HEADER_LEN = 16
TRANSPORT_MIN_LEN = TRANSPORT_HEADER_LEN + TAG_LEN
PADDING_MULTIPLE = 16

# §7 Timers (seconds) and limits.
REKEY_AFTER_TIME = 120
REJECT_AFTER_TIME = 180
REKEY_TIMEOUT = 5
HELLO_RETRY_TIMEOUT = 1
KEEPALIVE_TIMEOUT = 2
DEAD_PEER_TIMEOUT = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT
COOKIE_SECRET_LIFETIME = 120
COOKIE_LIFETIME = 120 - 5
REKEY_AFTER_MESSAGES = 2**60
REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1
REPLAY_WINDOW = 8192

# §6 Control channel limits.
CONTROL_MAX_LEN = 1200
CONTROL_MAX_ITEMS = 32
CONTROL_VERSION = 1
CONTROL_MAX_STR = 256
KEEPALIVE_MAX = 3600
TIMESTAMP_GRANULARITY_NS = 2**24   # nanoseconds are rounded down to this (§4.3)
