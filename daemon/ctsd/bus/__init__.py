"""The websocket bus and the plain HTTP routes on the same port (CONTRACT §4, §5).

    server.py    websockets `serve` on one port: `/ws` upgrades, everything else is HTTP
                 (`process_request`); Origin allowlist (403 before the upgrade); shutdown
    session.py   one bus connection: auth (header or first message, 10 s, 1008), envelope
                 checks (ids strictly increase), rate limit, dispatch, replies
    commands.py  what each command does: changes through `store.submit(op, source="bus")`,
                 reads from memory through `views`
    views.py     masked read views (connections, state, documents, snapshot, export, status)
    fanout.py    subscriptions: filters, replay + live with no gap, one encode per distinct
                 frame, direct writes while a client keeps up, bounded queue, 4008 for laggards
    protocol.py  every message as a msgspec Struct; `protocol_schema()`
    http.py      the HTTP routes, JSON errors, CORS for the listed origins
    ratelimit.py token buckets per client; failed-auth limit per remote address

Limits: client frames over 1 MiB are answered `too_large` and closed with 1009; over 2 MiB
(`server.HARD_MAX_FRAME_BYTES`) websockets closes with 1009 without reading them. Server frames
are not capped: a snapshot, an export or one change touching 10,000 records is one frame, so
clients should raise their own `max_size`. A subscriber's queue holds at most 1,000 frames or
8 MiB beyond what its socket buffers take; past that it is closed with 4008 and resumes with
`since`. Rate limit: `server.rate_limit` per bus connection and per remote address for HTTP
(heartbeats and `/health` exempt). 10 wrong tokens (HTTP header, bus header or `auth` message)
per address per minute refuse further wrong tokens from that address (429 / auth_invalid) for
the rest of the minute; a correct token always passes, and requests without a token are not
counted (any web page can make a browser send those). Keepalive pings every 20 s.
"""
