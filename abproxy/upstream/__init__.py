"""Talking to upstreams: one keep-alive HTTP/1.1 client (:mod:`.client`, :mod:`.http11`) for
every call, and the policy at that border (:mod:`.policy`: which headers pass, timeouts, and
what a failure means for the client)."""
