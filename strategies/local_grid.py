"""An in-process Flower Grid: a strategy's messages go to Python callables, not to a SuperLink.

For running and measuring server halves without Ray or network (unit tests, benchmarks,
debugging a strategy step by step). Each node is a callable taking the instruction Message and
returning the reply's RecordDict; an exception becomes an error reply, as a crashing ClientApp's
does in a real federation. An optional batch handler takes all train messages of one push in
one call (an engine that trains a round's clients together) and returns, per message, the
reply's RecordDict or the exception that becomes its error reply; other messages still go to
their node one by one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

from flwr.app import Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

Node = Callable[[Message], RecordDict]
BatchNode = Callable[[list[Message]], list[RecordDict | Exception]]


class LocalGrid(Grid):
    """A Grid whose nodes (id -> callable) run in this process, one message after another,
    or, with `batch`, a push's train messages all in one call of it."""

    def __init__(
        self, nodes: dict[int, Node | None], run_id: int = 1, batch: BatchNode | None = None
    ) -> None:
        # This process plays the ServerApp: Flower's messages read their sender from here.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 0
        self.nodes = nodes
        self.batch = batch
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
        """Run each message's node now (the train messages through `batch` together, if
        set); keep the reply (or the error) under a new id, in the order pushed."""
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        outcomes: dict[int, RecordDict | Exception] = {}
        if self.batch is not None and train:
            outcomes = dict(zip(map(id, train), self._call_batch(train), strict=True))
        ids = []
        for msg in messages:
            outcome = outcomes[id(msg)] if id(msg) in outcomes else self._call_node(msg)
            if isinstance(outcome, Exception):
                reply = Message(Error(code=0, reason=repr(outcome)), reply_to=msg)
            else:
                reply = Message(outcome, reply_to=msg)
            msg_id = str(next(self._ids))
            self._replies[msg_id] = reply
            ids.append(msg_id)
        return ids

    def _call_node(self, msg: Message) -> RecordDict | Exception:
        node = self.nodes[msg.metadata.dst_node_id]
        try:
            if node is None:
                raise RuntimeError(f"node {msg.metadata.dst_node_id} has no handler")
            return node(msg)
        except Exception as err:  # noqa: BLE001 - a crashing client gives an error reply
            return err

    def _call_batch(self, messages: list[Message]) -> list[RecordDict | Exception]:
        try:
            return list(self.batch(messages))
        except Exception as err:  # noqa: BLE001 - a crashing batch fails each of its clients
            return [err] * len(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to the pushed messages with these ids."""
        return [self._replies.pop(i) for i in message_ids]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, run and pull; `timeout` is moot in process."""
        return self.pull_messages(self.push_messages(messages))
