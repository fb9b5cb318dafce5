"""SecantusDB, a MongoDB-wire server with change streams, run as a real process for tests.

SecantusDB is GPL-2.0: it is a test dependency only, never imported by ``reactive``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pymongo import MongoClient
from pymongo.errors import PyMongoError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MongoServer:
    """One ``secantusd-py`` process on a fixed port and storage path; it can be killed and restarted."""

    def __init__(self, storage: Path, *, port: int | None = None, args: tuple[str, ...] = ()) -> None:
        self.storage = storage
        self.port = port or free_port()
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        self.log = storage.parent / f"secantusd-{self.port}.log"

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def database_uri(self, database: str) -> str:
        return f"mongodb://127.0.0.1:{self.port}/{database}?directConnection=true&serverSelectionTimeoutMS=3000"

    def start(self, timeout: float = 30.0) -> MongoServer:
        self.storage.mkdir(parents=True, exist_ok=True)
        command = [
            str(Path(sys.executable).with_name("secantusd-py")),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--storage-path", str(self.storage),
            *self.args,
        ]  # fmt: skip
        # cwd is the storage folder: secantusd-py reads ./secantusd.toml if one exists.
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.storage)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"secantusd-py exited with {self.process.returncode}; see {self.log}")
            try:
                with MongoClient(self.uri, serverSelectionTimeoutMS=200) as client:
                    client.admin.command("ping")
                return self
            except PyMongoError:
                continue
        raise RuntimeError(f"secantusd-py did not answer within {timeout} s; see {self.log}")

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None
