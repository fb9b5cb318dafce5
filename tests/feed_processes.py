"""Feed processes for tests/test_feed.py: a publisher driven over stdin, a subscriber over a pipe.

**The publisher**: ``python tests/feed_processes.py --service S [--address A] [--checkpoints
URI] [--rows JSON] [--peer-timeout S]`` starts a :class:`~reactive.feed.Node` and a
:class:`~reactive.feed.DataService` (``--rows``: ``{table: [[id, value], ...]}`` published
before the service goes on the node, so the first snapshot anyone gets already holds them),
prints one JSON line ``{"address", "data_address", "pid", "epoch", "seqnums"}``, then answers
each command line with one JSON line:

- ``{"op": "publish", "table": t, "rows": [[id, value], ...]}``: publish the whole table
  (rows as pairs, so ids may be ints); answers ``{"seqnum": n}``.
- ``{"op": "delta", "table": t, "changes": [[event, id, value], ...]}``: publish a delta.
- ``{"op": "state", "table": t}``: ``{"seqnum": n, "rows": [[id, value], ...]}``.
- ``{"op": "subscribers"}``: ``{"subscribers": [[service, table], ...]}``.
- ``{"op": "stop"}``: stop the service and the node (a clean stop), answer, exit.

Ids that are lists are turned into tuples.

**The subscriber** (:func:`subscriber_main`, run with multiprocessing's "spawn" context):
follows a table, says ``("ready", service id)`` on its pipe, then for each sequence number it
receives answers ``("view", rows, changes, status)`` once it has delivered that number.

**A client of the wire alone** (:func:`wire_client_main`, likewise): what a subscriber of any
version, or in another language, sends: it fetches a table's snapshot over a bare ZMQ DEALER as
``caller``, says ``("ready", caller)``, and waits to be killed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def _id(value: Any) -> Any:
    return tuple(_id(v) for v in value) if isinstance(value, list) else value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--service", required=True)
    parser.add_argument("--address", default="tcp://127.0.0.1:0")
    parser.add_argument("--checkpoints", default=None)
    parser.add_argument("--heartbeat", type=float, default=0.1)
    parser.add_argument("--peer-timeout", type=float, default=30.0)
    parser.add_argument("--rows", default="{}")
    args = parser.parse_args()

    from reactive.feed import DataService, Node

    store = None
    if args.checkpoints:
        from reactive.checkpoints import section_store

        store = section_store(args.checkpoints)
    node = Node(args.address, heartbeat_interval=args.heartbeat, rpc_timeout=5.0, peer_timeout=args.peer_timeout)
    service = DataService(args.service, node, checkpoints=store)
    seqnums = {
        table: service.publish(table, {_id(i): v for i, v in rows}) for table, rows in json.loads(args.rows).items()
    }
    node.start()
    service.start()

    def say(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    say(
        {
            "address": node.address,
            "data_address": node.data_address,
            "pid": os.getpid(),
            "epoch": service.epoch,
            "seqnums": seqnums,
        }
    )
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "publish":
            data = {_id(i): v for i, v in command["rows"]}
            say({"seqnum": service.publish(command["table"], data)})
        elif op == "delta":
            changes = [(e, _id(i), v) for e, i, v in command["changes"]]
            say({"seqnum": service.publish(command["table"], changes, use_snapshot=False)})
        elif op == "state":
            seqnum, data = service.get_last_published_data_with_seqnum(command["table"])
            say({"seqnum": seqnum, "rows": [[i, v] for i, v in data.items()]})
        elif op == "subscribers":
            say({"subscribers": service.subscriber_list()})
        elif op == "stop":
            service.stop()
            node.stop()
            say({"stopped": True})
            return
        else:
            say({"error": f"unknown op {op!r}"})
    service.stop()
    node.stop()


def subscriber_main(address: str, table: str, conn: Any) -> None:
    """A subscriber process: see the module's docstring."""
    import reactive.feed

    changes: list[tuple[str, Any, Any, int]] = []
    sub = reactive.feed.subscribe(
        address, table, lambda c: changes.append((c.event, c.id, c.value, c.seqnum)), heartbeat_interval=0.1
    )
    try:
        conn.send(("ready", sub.service_id))
        while True:
            seqnum = conn.recv()
            if seqnum is None:
                break
            delivered = sub.wait_delivered(seqnum, 10)
            conn.send(("view", delivered, sorted(sub.view.items()), list(changes), sub.status))
    finally:
        sub.close()
        conn.close()


def wire_client_main(address: str, table: str, caller: str, conn: Any) -> None:
    """A client of the documented wire alone: see the module's docstring."""
    import zmq

    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.connect(address)
    body = {"v": 1, "service": "pub", "action": "get_last_published_data_with_seqnum", "kwargs": {"table": table}}
    socket.send_multipart([b"1", json.dumps({**body, "caller": caller}).encode()])
    request_id, answer = socket.recv_multipart()
    assert request_id == b"1" and json.loads(answer)["ok"], answer
    conn.send(("ready", caller))
    conn.recv()  # until killed, or told to end


if __name__ == "__main__":
    main()
