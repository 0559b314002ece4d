"""fastsock's stream benchmark: ``fastsock bench`` on the stream workloads.

    python bench/bench_stream.py [fastsock bench options]
    python bench/bench_stream.py --workloads lines-1 --seconds 2 --runs 1 --json lines.json

The same as ``fastsock bench --workloads bulk,lines-1,lines-16 [options]``: a --workloads of
your own replaces that list, and c-epoll-sink is still accepted for the C sink (now
c-sink).  It also runs from a checkout where fastsock is built in place but not installed.
``fastsock bench --help`` lists the options; bench/README.md explains every row and column.
"""

import sys
from pathlib import Path

try:
    from fastsock.cli import main
except ImportError:
    # Run from a checkout where fastsock is built in place but not installed.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fastsock.cli import main

STREAM_WORKLOADS = "bulk,lines-1,lines-16"

if __name__ == "__main__":
    # argparse keeps the last --workloads given: the caller's, when there is one.
    sys.exit(main(["bench", "--workloads", STREAM_WORKLOADS, *sys.argv[1:]]))
