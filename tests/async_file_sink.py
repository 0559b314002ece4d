"""An AsyncSink for the tests of ``fastsock serve --sink python://...``: from coroutines on
the event loop, it appends each message to a file as a line "CONNECTION PEER PAYLOAD".

    fastsock serve tcp://127.0.0.1:0 --sink 'python://async_file_sink:AsyncFileSink?path=FILE'
"""

import asyncio
import urllib.parse


class AsyncFileSink:
    @classmethod
    def from_url(cls, url):
        (path,) = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["path"]
        return cls(path)

    def __init__(self, path):
        self.name = path
        self.file = open(path, "ab")  # noqa: SIM115 - closed by close()

    async def write(self, messages):
        data = b"".join(
            b"%d %s %s\n" % (message.connection_id, message.peer.encode(), message.payload)
            for message in messages
        )
        # Confirmed once the loop has run again: a write that must yield, as a broker's does.
        await asyncio.sleep(0)
        self.file.write(data)
        self.file.flush()

    async def flush(self, timeout):
        self.file.flush()

    async def close(self):
        self.file.close()
