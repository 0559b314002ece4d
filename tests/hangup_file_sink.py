"""A FileSink for the tests of ``fastsock serve``'s start-up: opening it sends SIGHUP to its
own process, as logrotate's ``kill -HUP`` may while the server is being built.

    fastsock serve tcp://127.0.0.1:0 --sink 'python://hangup_file_sink:HangupFileSink?path=FILE'
"""

import os
import signal
import urllib.parse

from fastsock.pipeline import FileSink


class HangupFileSink(FileSink):
    @classmethod
    def from_url(cls, url):
        (path,) = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["path"]
        os.kill(os.getpid(), signal.SIGHUP)
        return cls(path)
