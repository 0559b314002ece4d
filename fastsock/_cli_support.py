"""Pieces the fastsock command line's subcommands share: one-line errors and argument types."""

import argparse
import math
import re

__all__ = [
    "ArgumentParser",
    "CLIError",
    "CommandError",
    "UsageError",
    "byte_size",
    "cpu_list",
    "name_list",
    "natural_int",
    "number",
    "positive_float",
    "positive_int",
]


class CLIError(Exception):
    """An error of ``command`` (``fastsock serve``...), reported in one line."""

    def __init__(self, command, message):
        super().__init__(message)
        self.command = command


class UsageError(CLIError):
    """Bad arguments: exit status 2."""


class CommandError(CLIError):
    """A failure while running: exit status 1."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors raised as UsageError instead of printed with the usage, and
    no abbreviated options: a prefix such as ``--server`` must not keep old or mistyped
    option names alive as aliases of the one they happen to start."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(self.prog, message)


def positive_float(text):
    value = number(text, float)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number > 0, not {text!r}")
    return value


def positive_int(text):
    value = number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, not {text!r}")
    return value


def natural_int(text):
    value = number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, not {text!r}")
    return value


def number(text, kind):
    try:
        return kind(text)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {noun}, not {text!r}") from None


def byte_size(text):
    match = re.fullmatch(r"(\d+)\s*([KMG]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not match or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (say 2G, 512M or 1000000)")
    return int(match.group(1)) * 1024 ** " KMG".index(match.group(2).upper() or " ")


def cpu_list(text):
    """CPU numbers: "1", "0,2" or "0-3"."""
    cpus = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise argparse.ArgumentTypeError(f"not a CPU list: {text!r} (say 1, 0,2 or 0-3)")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise argparse.ArgumentTypeError(f"not a CPU range: {part.strip()!r}")
        cpus.update(range(first, last + 1))
    return sorted(cpus)


def name_list(choices):
    def parse(text):
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            what = f"unknown name {unknown[0]!r}; " if unknown else ""
            raise argparse.ArgumentTypeError(f"{what}choose among {', '.join(choices)}")
        return list(dict.fromkeys(names))

    return parse
