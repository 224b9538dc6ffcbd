"""The relay floor of bench/cluster.py's (g): what a bare Python daemon on the same libraries
costs from a bus change on host A to a subscriber on host B, with no ctsd code.

    python bench/relay.py NATS_URLS PORT STREAM    # bench/cluster.py starts three

A websockets server on PORT (one process, as a daemon is) and a nats-py connection: a frame
is published to STREAM as it came and answered with the stream's ack (`{"type": "result",
…}`); `{"type": "subscribe"}` makes a connection a subscriber; every message the relay's
push consumer delivers (ack none, flow control, as the daemon's) goes to its subscribers as
`{"type": "events", "events": [{"id": <stream seq>}]}`. No validation, no journal, no files.
"""

from __future__ import annotations

import asyncio
import json
import sys

import nats
import uvloop
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from websockets.asyncio.server import ServerConnection, broadcast, serve


async def main(urls: list[str], port: int, stream: str) -> None:
    nc = await nats.connect(urls)
    js = nc.jetstream()
    subscribers: set[ServerConnection] = set()

    async def delivered(msg: Msg) -> None:
        if not msg.data:  # flow control and idle heartbeats
            if msg.reply:
                await nc.publish(msg.reply, b"")
            return
        event = {"id": msg.metadata.sequence.stream}
        broadcast(subscribers, json.dumps({"type": "events", "events": [event]}))

    inbox = nc.new_inbox()
    await nc.subscribe(inbox, cb=delivered)
    await js.add_consumer(
        stream,
        ConsumerConfig(
            deliver_subject=inbox,
            deliver_policy=DeliverPolicy.NEW,
            ack_policy=AckPolicy.NONE,
            flow_control=True,
            idle_heartbeat=1.0,
            mem_storage=True,
            num_replicas=1,
        ),
    )

    async def handler(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "auth_ok"}))
        async for raw in ws:
            frame = json.loads(raw)
            if frame["type"] == "subscribe":
                subscribers.add(ws)
                result = None
            else:
                ack = await js.publish(f"{stream.lower()}.x", raw.encode())
                result = {"revision": ack.seq}
            await ws.send(
                json.dumps({"type": "result", "id": frame["id"], "success": True, "result": result})
            )

    async with serve(handler, "127.0.0.1", port, compression=None):
        print("ready", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3]))
