"""The websocket bus at `/ws` (served by `ctsd.web.server` on the HTTP port).

    server.py    the ASGI websocket endpoint: admission before the upgrade (Host, Origin,
                 the cap on unauthenticated connections), one Session per connection, shutdown
    session.py   one bus connection: auth (header or first message, 10 s, 1008), envelope
                 checks (ids strictly increase), rate limit, dispatch, replies
    commands.py  what each command does, for the bus and the HTTP routes alike: changes
                 through the store's door (`WRITE_OPS`: the op and how its result is shown),
                 reads from memory through `views`
    views.py     masked read views (connections, state, documents, snapshot, export, status)
    fanout.py    subscriptions: filters, replay + live with no gap, one encode per distinct frame
    outbox.py    one connection's ordered sender: direct writes while the client keeps up, a
                 bounded queue otherwise, 4008 for one that falls behind
    protocol.py  every message as a msgspec Struct; `protocol_schema()`
    ratelimit.py token buckets per client

Limits: client frames over 1 MiB are answered `too_large` and closed with 1009; over 2 MiB
(`server.HARD_MAX_FRAME_BYTES`) the protocol closes with 1009 without reading them. Server frames
are not capped: a snapshot, an export or one change touching 10,000 records is one frame, so
clients should raise their own `max_size`. A subscriber's queue holds at most 1,000 frames or
8 MiB beyond what its socket buffers take; past that it is closed with 4008 and resumes with
`since`. Rate limit: `server.rate_limit` per bus connection (heartbeats exempt). A wrong token
is answered (`auth_invalid`, close 1008) and logged in summary; it never slows anybody else.
Keepalive pings every 20 s.
"""
