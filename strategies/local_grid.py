"""An in-process Flower Grid: a strategy's messages go to Python callables, not to a SuperLink.

For running and measuring server halves without Ray or network (unit tests, benchmarks,
debugging a strategy step by step). Each node is a callable taking the instruction Message and
returning the reply's RecordDict; an exception becomes an error reply, as a crashing ClientApp's
does in a real federation.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

from flwr.app import Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

Node = Callable[[Message], RecordDict]


class LocalGrid(Grid):
    """A Grid whose nodes (id -> callable) run in this process, one message after another."""

    def __init__(self, nodes: dict[int, Node | None], run_id: int = 1) -> None:
        # This process plays the ServerApp: Flower's messages read their sender from here.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 0
        self.nodes = nodes
        self._run = Run.create_empty(run_id=run_id)
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count()

    def set_run(self, run: Run) -> None:
        """Set the run this Grid operates in."""
        self._run = run

    @property
    def run(self) -> Run:
        """Run information."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """A new instruction message from this ServerApp."""
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Ids of the nodes, in insertion order."""
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run each message's node now; keep the reply (or the error) under a new id."""
        ids = []
        for msg in messages:
            node = self.nodes[msg.metadata.dst_node_id]
            try:
                if node is None:
                    raise RuntimeError(f"node {msg.metadata.dst_node_id} has no handler")
                reply = Message(node(msg), reply_to=msg)
            except Exception as err:  # noqa: BLE001 - a crashing client gives an error reply
                reply = Message(Error(code=0, reason=repr(err)), reply_to=msg)
            msg_id = str(next(self._ids))
            self._replies[msg_id] = reply
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to the pushed messages with these ids."""
        return [self._replies.pop(i) for i in message_ids]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, run and pull; `timeout` is moot in process."""
        return self.pull_messages(self.push_messages(messages))
