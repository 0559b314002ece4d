"""recv_queue_stdlib.py moved to fastsock's compiled receive path: the handler class and
its recv() loop are gone, the queue.Queue became a bounded RingQueue, and the consumer
takes messages in batches.

    python examples/recv_queue_fastsock.py [--port 9999] [--framing raw|lines|length]

Then send it something, e.g. ``python examples/send_lines.py --port 9999``.
"""

import argparse
import threading

import fastsock


def consume(ring):
    received = 0
    while True:
        messages = ring.get_many()
        received += len(messages)
        print(f"received {len(messages)} messages ({received} in all), first {messages[0]!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9999)
    parser.add_argument("--framing", choices=["raw", "lines", "length"], default="lines")
    args = parser.parse_args()
    ring = fastsock.RingQueue()
    threading.Thread(target=consume, args=(ring,), daemon=True).start()
    handler = fastsock.receiver(ring, framing=args.framing)
    with fastsock.ThreadingTCPServer(("127.0.0.1", args.port), handler) as server:
        server.daemon_threads = True
        print(f"listening on {server.server_address}; Ctrl-C stops")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    print(server.stats())


if __name__ == "__main__":
    main()
