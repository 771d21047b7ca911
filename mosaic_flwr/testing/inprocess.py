"""An in-process Grid: drives a ClientApp's handlers directly, without Ray or a SuperLink.

For tests and benchmarks of the strategies and apps together. Payloads cross as Flower
serialises them (``RecordDict`` -> protobuf bytes -> ``RecordDict``, in both directions), so
no tensor is shared between "server" and "clients", every record must survive Flower's wire
format, and a handler that raises becomes an error reply, as on a real SuperNode.

Faults can be injected: ``hook(grid, node_id, incoming, reply)`` sees every reply and returns it,
a replacement (a tampered payload) or ``None`` (the client never answers: the server's wait
times out); an exception it raises becomes an error reply. Nodes in ``offline`` are not
listed by ``get_node_ids`` and never answer (a SuperNode that disconnected).

``push_messages`` / ``pull_messages`` work as on a SuperLink: a pushed message is handled
when a pull asks for its id (``pull_batch`` messages per pull, in push order, or in the
order ``pull_order`` gives: a test's stand-in for replies arriving in another order), so a
server that pulls replies one at a time never holds more than it asked for.
"""

from __future__ import annotations

from typing import Callable, Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 1


def over_the_wire(content: RecordDict) -> RecordDict:
    """``content`` as the other side receives it: serialised to Flower's protobuf bytes and
    parsed back (what a SuperLink and SuperNode do between the apps)."""
    return recorddict_from_proto(ProtoRecordDict.FromString(recorddict_to_proto(content).SerializeToString()))


class InProcessGrid(Grid):
    def __init__(self, client_app: ClientApp, run_config: dict, num_nodes: int, *,
                 node_config: Callable[[int], dict] | None = None, run_id: int = 1,
                 hook: Callable[["InProcessGrid", int, Message, Message], Message | None] | None = None,
                 first_node_id: int = 100, pull_batch: int = 1,
                 pull_order: Callable[[list[Message]], list[Message]] | None = None):
        self.client_app = client_app
        self.run_config = dict(run_config)
        self.node_ids = [first_node_id + i for i in range(num_nodes)]
        make_cfg = node_config or (lambda i: {"partition-id": i, "num-partitions": num_nodes})
        self.contexts = {nid: Context(run_id=run_id, node_id=nid, node_config=make_cfg(i),
                                      state=RecordDict(), run_config=self.run_config)
                         for i, nid in enumerate(self.node_ids)}
        self._run_id = run_id
        # Messages built on the "server" side read their identity from here.
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 0, SERVER_NODE_ID
        self.sent: list[Message] = []
        self.hook = hook
        self.offline: set[int] = set()
        self.pending: dict[str, Message] = {}   # pushed, not yet handled
        self.pull_batch = pull_batch
        self.pull_order = pull_order

    # -- Grid API ---------------------------------------------------------------------
    def set_run(self, run) -> None:  # pragma: no cover - not used in-process
        pass

    @property
    def run(self):  # pragma: no cover - not used in-process
        raise NotImplementedError

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.node_ids if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            self.sent.append(msg)
            self.pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = [self.pending[i] for i in message_ids if i in self.pending]
        if self.pull_order is not None:
            wanted = self.pull_order(wanted)
        replies = []
        for msg in wanted[:self.pull_batch]:
            del self.pending[msg.metadata.message_id]
            reply = self._handle(msg)
            if reply is not None:
                replies.append(reply)
        return replies

    def _handle(self, msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        if node in self.offline:
            return None
        incoming = Message(content=over_the_wire(msg.content), dst_node_id=node,
                           message_type=msg.metadata.message_type, group_id=msg.metadata.group_id)
        incoming.metadata.__dict__["_message_id"] = msg.metadata.message_id or str(uuid4())
        try:
            reply = self.client_app(incoming, self.contexts[node])
            reply = Message(content=over_the_wire(reply.content), reply_to=incoming)
            if self.hook is not None:
                reply = self.hook(self, node, incoming, reply)
        except Exception as exc:  # a crashing client becomes an error reply
            reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=incoming)
        return reply

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            reply = self._handle(msg)
            if reply is not None:
                replies.append(reply)
        return replies
