"""The ``fastsock`` command: ``fastsock bench`` and ``fastsock serve``.

    fastsock bench                                   # about a minute, on loopback
    fastsock bench --full --json out.json --plot out.png
    fastsock serve tcp://127.0.0.1:9000 --framing lines --format jsonl --output received.jsonl

Bad arguments print one line, ``fastsock serve: error: ...``, and exit with status 2; a
failure while running (a port already taken, say) prints one line and exits with status 1.
"""

import argparse
import sys

from fastsock import constants
from fastsock._cli_serve import SERVE_DETAILS, add_serve_arguments
from fastsock._cli_support import ArgumentParser, CommandError, UsageError

__all__ = ["main"]


def main(argv=None):
    """Run the command line ``argv`` (default: sys.argv[1:]); return the exit status."""
    parser = build_parser()
    try:
        options = parser.parse_args(argv)
        options.argv = sys.argv[1:] if argv is None else list(argv)
        return options.run(options)
    except CommandError as error:
        print(f"{error.command}: error: {error}", file=sys.stderr)
        return 1
    except UsageError as error:
        print(f"{error.command}: error: {error} (see {error.command} --help)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def build_parser():
    parser = ArgumentParser(
        prog="fastsock",
        description="fastsock's benchmark and command-line receive server.",
    )
    commands = parser.add_subparsers(
        title="commands", dest="command", required=True, parser_class=Subcommand
    )
    bench = commands.add_parser(
        "bench", help="receive rates of fastsock against the stdlib, asyncio and C sinks"
    )
    bench.populate = add_bench_arguments
    add_serve_arguments(
        commands.add_parser(
            "serve",
            help="receive messages and write them to stdout or a file",
            epilog=SERVE_DETAILS,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            description=(
                "Receive on an endpoint with fastsock's compiled receive path and write every "
                "message out, raw or as JSON lines. Binds to loopback addresses only, unless "
                "--allow-remote is given. SIGINT or SIGTERM stops it: it stops accepting, every "
                "connection hands over what its peer sent before the stop (for at most "
                f"--drain-timeout, default {constants.SHUTDOWN_DRAIN_TIMEOUT:g} s; the rest is "
                "counted), everything received is written, the final counters go to stderr "
                "and it exits 0."
            ),
        )
    )
    return parser


class Subcommand(ArgumentParser):
    """A subcommand's parser, whose arguments ``populate(parser)`` may add only when it
    parses: ``fastsock bench`` imports the benchmark (fastsock.bench) only when it runs."""

    populate = None

    def parse_known_args(self, args=None, namespace=None):
        if self.populate is not None:
            populate, self.populate = self.populate, None
            populate(self)
        return super().parse_known_args(args, namespace)


def add_bench_arguments(parser):
    from fastsock.bench.cli import add_bench_arguments

    add_bench_arguments(parser)
