"""What can go wrong talking to an upstream, as exceptions the policy turns into the client's
502 or 504 (:func:`abproxy.upstream.policy.translate_failure`). A timeout is Python's own
``TimeoutError``; everything else that breaks an exchange is a ``ConnectionError``."""

from __future__ import annotations


class UpstreamDisconnected(ConnectionError):
    """The upstream closed the connection before the response was complete."""


class UpstreamBadResponse(ConnectionError):
    """A response the proxy cannot read: malformed HTTP, a status outside 100–599, a body in an
    unknown content-encoding or one that does not decompress to its end."""


class UpstreamResponseTooLarge(UpstreamBadResponse):
    """The body is larger than ``server.max_response_bytes`` (counted after decoding)."""
