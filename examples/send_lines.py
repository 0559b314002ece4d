"""Sends numbered lines to a server, for the examples.

python examples/send_lines.py [--port 9999] [--count 100000] [--connections 1]
"""

import argparse
import socket
import threading


def send(port, count, connection):
    with socket.create_connection(("127.0.0.1", port)) as client:
        lines = b"".join(b"connection %d line %d\n" % (connection, n) for n in range(count))
        client.sendall(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9999)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--connections", type=int, default=1)
    args = parser.parse_args()
    senders = [
        threading.Thread(target=send, args=(args.port, args.count, connection))
        for connection in range(args.connections)
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    print(f"sent {args.count * args.connections} lines")


if __name__ == "__main__":
    main()
