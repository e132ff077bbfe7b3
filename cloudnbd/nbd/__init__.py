"""The NBD protocol layer: wire format, handshake and transmission, over a BlockDevice."""
