"""MongoDB error paths a real server cannot be made to produce on demand, scripted with mockupdb.

SecantusDB has no 16 MB limit on change events, so mongod's error 10334 (an event too large
to return) is scripted here: the listener must reopen its stream with large documents
stripped from events, resuming where it was.
"""

from __future__ import annotations

import threading

from mockupdb import MockupDB
from pymongo import MongoClient

from reactive.backends.mongodb.listener import LARGE_DOCUMENT_BYTES, MongoChangeStreamListener
from reactive.queue import CDCQueue

TOKEN = {"_data": "0001"}
#: mongod's BSONObjectTooLarge: a change event over 16 MB.
EVENT_TOO_LARGE = 10334


class MemoryCheckpoints:
    """A checkpoint store in memory, holding the stream position the listener resumes from."""

    def __init__(self) -> None:
        self.saved = {"mongodb/app/stream": {"token": TOKEN, "start_after": False}}

    def load_checkpoint(self, name: str):
        return self.saved.get(name)

    def save_checkpoint(self, name: str, value) -> None:
        self.saved[name] = dict(value)

    def delete_checkpoint(self, name: str) -> None:
        self.saved.pop(name, None)


def receive(server: MockupDB, command: str):
    """The next request for ``command``, answering anything else (killCursors...) with ok."""
    request = server.receives()
    while request.command_name != command:
        request.ok()
        request = server.receives()
    return request


def test_an_event_over_16_mb_reopens_the_stream_with_large_documents_stripped() -> None:
    server = MockupDB(auto_ismaster={"setName": "rs", "maxWireVersion": 21, "minWireVersion": 0})
    server.run()
    client = MongoClient(server.uri, directConnection=True, serverSelectionTimeoutMS=500)
    listener = MongoChangeStreamListener(
        client.app, MemoryCheckpoints(), CDCQueue(), uri="mongodb://scripted/app", max_await_ms=50
    )
    try:
        starting = threading.Thread(target=listener.start)
        starting.start()
        first = receive(server, "aggregate")
        assert len(first["pipeline"]) == 2  # $changeStream and $match: no stripping yet
        first.ok(cursor={"id": 42, "ns": "app.$cmd.aggregate", "firstBatch": [], "postBatchResumeToken": TOKEN})
        starting.join(10)

        receive(server, "getMore").command_err(EVENT_TOO_LARGE, "BSONObjectTooLarge")
        # pymongo kills the failed cursor; the listener then opens a new stream.
        request = receive(server, "aggregate")
        stages = request["pipeline"]
        assert stages[0]["$changeStream"]["resumeAfter"] == TOKEN
        condition = stages[-1]["$set"]["fullDocument"]["$cond"]
        assert condition[0]["$gt"][1] == LARGE_DOCUMENT_BYTES
        request.ok(cursor={"id": 0, "ns": "app.$cmd.aggregate", "firstBatch": [], "postBatchResumeToken": TOKEN})
    finally:
        listener.stop()
        server.stop()  # unblocks a getMore the listener may be waiting on
        listener.join(10)
        client.close()
    assert not listener.is_alive()
