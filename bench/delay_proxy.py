#!/usr/bin/env python3
"""A TCP proxy that delays every chunk by DELAY_MS in each direction: a
network round trip on loopback, since this kernel has no netem.

    delay_proxy.py LISTEN_PORT TARGET_PORT DELAY_MS

The event loop uses select(2): the default epoll loop rounds its timeouts
up to whole milliseconds, which would turn 0.5 ms into 1 ms."""
import asyncio
import selectors
import sys


class Pipe(asyncio.Protocol):
    def __init__(self, delay):
        self.delay = delay
        self.peer = None
        self.pending = []
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        loop = asyncio.get_running_loop()
        loop.call_at(loop.time() + self.delay, self.forward, data)

    def forward(self, data):
        if self.peer is None:
            self.pending.append(data)
        elif not self.peer.transport.is_closing():
            self.peer.transport.write(data)

    def connection_lost(self, exc):
        if self.peer is not None and not self.peer.transport.is_closing():
            loop = asyncio.get_running_loop()
            loop.call_at(loop.time() + self.delay, self.peer.transport.close)


async def main(listen, target, delay):
    loop = asyncio.get_running_loop()

    class Front(Pipe):
        def connection_made(self, transport):
            super().connection_made(transport)
            transport.pause_reading()
            asyncio.ensure_future(self.connect())

        async def connect(self):
            _, back = await loop.create_connection(lambda: Pipe(self.delay), "127.0.0.1", target)
            back.peer, self.peer = self, back
            for d in back.pending:
                self.transport.write(d)
            for d in self.pending:
                back.transport.write(d)
            self.pending = []
            self.transport.resume_reading()

    server = await loop.create_server(lambda: Front(delay), "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    listen, target, delay_ms = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    asyncio.set_event_loop(loop)
    loop.run_until_complete(main(listen, target, delay_ms / 1000.0))
