"""Which hosts are this machine: the one rule `billion serve --host` (off loopback it warns and
wants an API key) and `billion load` (it loads loopback servers only) share."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (bracketed or not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
