"""Source-address allow-lists: is a peer's address inside one of the configured networks?

Pure functions; the listeners (connectors/dicom/callers.py, connectors/hl7/mllp.py) call
them with the peer address their socket reports. Anything that is not a readable IP
address is outside every list (fail closed).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from radtriage.settings import IpNetwork

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def peer_ip(address: str) -> IpAddress | None:
    """The peer's IP address, or None if `address` is not one.

    A dual-stack socket (bound to `::`) reports an IPv4 peer as `::ffff:a.b.c.d`: that is
    the IPv4 address, and an operator lists it as one. A link-local IPv6 peer may carry a
    zone (`fe80::1%eth0`), which says where it is, not who: it is dropped."""
    try:
        ip = ipaddress.ip_address(address.strip().split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def address_in(address: str, networks: Sequence[IpNetwork]) -> bool:
    """Whether `address` lies in one of `networks` (an empty list contains nothing)."""
    ip = peer_ip(address)
    # `in` between an IPv4 address and an IPv6 network is simply False.
    return ip is not None and any(ip in network for network in networks)


def source_allowed(address: str, allowed: Sequence[IpNetwork]) -> bool:
    """A listener's source check: an empty allow-list lets everyone in (the default)."""
    return not allowed or address_in(address, allowed)
