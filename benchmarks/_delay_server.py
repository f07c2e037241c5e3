"""A stand-in for a remote service: echoes each byte it receives, DELAY seconds later.

``python -m benchmarks._delay_server DELAY`` prints the port it listens on
(127.0.0.1), then serves until its standard input closes. It runs in its own
process and times the delay by spinning on the clock, so the answer is due
within microseconds of DELAY (the OS's timers overshoot by 0.1-0.5 ms on a
virtual machine, as much as the event loops' own timers do). The measured loop
then sees each answer as socket readiness, the way it sees a real service's,
and none of its own timers is involved. The spinning costs this process a core.
"""

from __future__ import annotations

import contextlib
import heapq
import selectors
import socket
import sys
import threading
import time


def _serve(listener: socket.socket, delay: float, stop: threading.Event) -> None:
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    due: list[tuple[float, int, socket.socket, bytes]] = []
    order = 0  # ties in the heap never compare sockets
    clock = time.perf_counter
    while not stop.is_set():
        for key, _ in selector.select(0):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is listener:
                conn, _ = listener.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.setblocking(False)
                selector.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(64)
            except ConnectionError:
                data = b""
            if not data:
                selector.unregister(sock)
                sock.close()
                continue
            order += 1
            heapq.heappush(due, (clock() + delay, order, sock, data))
        now = clock()
        while due and due[0][0] <= now:
            _, _, sock, data = heapq.heappop(due)
            with contextlib.suppress(OSError):  # the client went away
                sock.sendall(data)


def main() -> None:
    delay = float(sys.argv[1])
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    stop = threading.Event()
    server = threading.Thread(target=_serve, args=(listener, delay, stop))
    server.start()
    print(listener.getsockname()[1], flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or exits)
    stop.set()
    server.join()


if __name__ == "__main__":
    main()
