"""Bounded waits that fit the run (issue 38): once most replies of a call are in, the rest
get a deadline derived from the measured reply times (``straggler-*``), not the whole
``round-timeout``; a silent client no longer holds a round, the gate or discovery for an
hour. Checked on a grid whose replies arrive at chosen delays (one never)."""

from __future__ import annotations

import logging
import time
from uuid import uuid4

import pytest
from flwr.app import Message, MetricRecord, RecordDict

from mosaic_flwr.config import ConfigError, build_config
from mosaic_flwr.core.server import Straggler, discover_clients, stream_replies, straggler_wait
from server_app.app import wait_for_nodes
from tests.support import as_flower_server


def test_the_rest_wait_a_multiple_of_the_median_reply_time_with_a_floor():
    rule = Straggler(quorum=0.5, factor=3.0, floor=1.0)
    assert straggler_wait([], 4, rule) is None                 # nothing in yet
    assert straggler_wait([2.0], 4, rule) is None               # below the quorum (2 of 4)
    assert straggler_wait([2.0, 4.0], 4, rule) == 9.0           # 3 x median 3.0
    assert straggler_wait([0.1, 0.1], 4, rule) == 1.0           # the floor
    assert straggler_wait([1.0, 1.0, 1.0, 1.0], 4, rule) is None  # none missing
    assert straggler_wait([5.0], 1, rule) is None
    assert straggler_wait([5.0], 3, Straggler(quorum=0.1, factor=2.0, floor=0.0)) == 10.0  # quorum >= 1 reply


class TimedGrid:
    """Replies arrive ``delays[i]`` seconds after message i was pushed (``None``: never)."""

    def __init__(self, delays):
        self.delays, self.pushed = list(delays), {}

    def push_messages(self, messages):
        ids = []
        for msg, delay in zip(messages, self.delays):
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            self.pushed[msg.metadata.message_id] = (msg, delay, time.monotonic())
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        out = []
        for i in message_ids:
            msg, delay, t0 = self.pushed[i]
            if delay is not None and time.monotonic() - t0 >= delay:
                out.append(self.reply(msg))
                self.pushed[i] = (msg, None, t0)  # answered once
        return out

    @staticmethod
    def reply(msg):
        pid = msg.metadata.dst_node_id - 100
        content = RecordDict({"metrics": MetricRecord({"partition-id": pid, "num-examples": 10, "counts": [1] * 10})})
        from flwr.app import ConfigRecord
        content["arch"] = ConfigRecord({"model": "cnn_small", "capacity": 1.0})
        return Message(content, reply_to=msg)


def _messages(n):
    as_flower_server()
    return [Message(RecordDict({}), dst_node_id=100 + i, message_type="query") for i in range(n)]


def test_a_silent_client_holds_a_call_for_the_derived_deadline_not_the_timeout(caplog):
    grid = TimedGrid([0.05, 0.05, 0.1, None])
    start = time.monotonic()
    with caplog.at_level(logging.INFO):
        got = list(stream_replies(grid, _messages(4), 30.0, "round 2", poll=0.01,
                                  straggler=Straggler(quorum=0.5, factor=3.0, floor=0.5)))
    waited = time.monotonic() - start
    assert len(got) == 3 and waited < 3.0, waited   # 30 s without the rule
    assert "round 2: 2 of 4 replies in; the rest get 0 s more" in caplog.text or \
        "round 2: 2 of 4 replies in; the rest get 1 s more" in caplog.text
    # without the rule the same call waits for the whole timeout
    start = time.monotonic()
    got = list(stream_replies(TimedGrid([0.05, 0.05, 0.1, None]), _messages(4), 1.0, "round 2", poll=0.01))
    assert len(got) == 3 and time.monotonic() - start >= 1.0


def test_a_slow_but_live_client_inside_the_derived_deadline_is_still_heard():
    grid = TimedGrid([0.05, 0.05, 0.05, 0.4])
    got = list(stream_replies(grid, _messages(4), 30.0, "round 2", poll=0.01,
                              straggler=Straggler(quorum=0.5, factor=3.0, floor=1.0)))
    assert len(got) == 4


def test_discovery_does_not_wait_for_a_silent_node(caplog):
    grid = TimedGrid([0.02, 0.02, None])
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        clients = discover_clients(grid, [100, 101, 102], 10, timeout=900.0,
                                   straggler=Straggler(quorum=0.5, factor=3.0, floor=0.3))
    assert sorted(clients) == [100, 101] and time.monotonic() - start < 3.0
    assert "No answer from nodes [102]" in caplog.text


def test_the_node_wait_ends_when_enough_nodes_keep_changing():
    class Churning:
        n = 0

        def get_node_ids(self):
            self.n += 1
            return list(range(3 + self.n % 2))  # 3 or 4 nodes, never stable

    start = time.monotonic()
    nodes = wait_for_nodes(Churning(), 3, timeout=0.5, poll=0.05)
    assert len(nodes) >= 3 and time.monotonic() - start < 3.0


@pytest.mark.parametrize("key,value", [("straggler-quorum", 0.0), ("straggler-quorum", 1.5),
                                       ("straggler-factor", 0.0), ("straggler-floor", -1.0)])
def test_straggler_settings_are_checked(key, value):
    with pytest.raises(ConfigError, match=f"^{key}"):
        build_config({key: value})
