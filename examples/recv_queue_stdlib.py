"""The pattern fastsock replaces: a threaded server whose handler loops on recv() and puts
every chunk into a queue.Queue that a consumer thread drains.

    python examples/recv_queue_stdlib.py [--port 9999]

Then send it something, e.g. ``python examples/send_lines.py --port 9999``.
"""

import argparse
import queue
import socketserver
import threading


class QueueingHandler(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            data = self.request.recv(1024)
            if not data:
                break
            self.server.result_queue.put(data)


class QueueingServer(socketserver.ThreadingTCPServer):
    daemon_threads = True

    def __init__(self, server_address, RequestHandlerClass, result_queue):
        super().__init__(server_address, RequestHandlerClass)
        self.result_queue = result_queue


def consume(result_queue):
    received = 0
    while True:
        chunk = result_queue.get()
        received += len(chunk)
        print(f"received {len(chunk)} bytes ({received} in all)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9999)
    args = parser.parse_args()
    result_queue = queue.Queue()
    threading.Thread(target=consume, args=(result_queue,), daemon=True).start()
    with QueueingServer(("127.0.0.1", args.port), QueueingHandler, result_queue) as server:
        print(f"listening on {server.server_address}; Ctrl-C stops")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
