"""A publishing process for the change-feed tests: a datalayer on a SQLite file whose listener
``len__text`` (the length of ``docs.text``) and table ``docs`` are published at an address.

    python tests/feed_worker.py <sqlite uri> <feed address>

It prints the bound address, then answers each line on stdin: ``idle`` (wait until every
change is processed and published; prints ``ok``), ``seqnum <table>`` (prints it), ``quit``.
"""

from __future__ import annotations

import sys

import reactive
from reactive.components import Listener, Model


def main() -> None:
    uri, address = sys.argv[1], sys.argv[2]
    db = reactive.connect(uri, poll_interval=0.05)
    db.add(Listener(Model("len", predict=lambda texts: [len(t) for t in texts]), "text", "docs"))
    feed = db.cdc.publish(address, heartbeat_interval=0.2)
    db.cdc.start()
    print(feed.address, flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        if command[0] == "idle":
            print("ok" if db.cdc.wait_idle(timeout=30) else "not idle", flush=True)
        elif command[0] == "seqnum":
            print(feed.service.last_seqnum(command[1]), flush=True)
    db.close()


if __name__ == "__main__":
    main()
