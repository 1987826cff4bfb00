"""A Flower ServerApp that runs fedbat's loop with Flower messages as the transport.

Sampling, the downlink each client needs, packet validation, the strategy, checkpoints and
loggers are fedbat's own (``fedbat.lifecycle.run``); only the way a round's clients are reached
differs: one train message per sampled client to the SuperNode that serves it, carrying the
downlink packets, and the fedbat packet back. A client that does not reply within
``round-timeout`` seconds (killed, disconnected) or replies with an error is rejected alone
and counted; the round completes with the others. Its state is then unknown, so it is sent
the full model next time.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    no_object_id_recompute,
)
from omegaconf import OmegaConf

from fedbat.downlink import Delivery
from fedbat.errors import ConfigError, PeerLost
from fedbat.integrations.flower.node_data import declared, server_data
from fedbat.integrations.flower.protocol import (
    RECORD,
    Asked,
    failed,
    result_from_record,
)
from fedbat.lifecycle import run
from fedbat.transport import RoundContext, Trained

app = ServerApp()
POLL_S = 0.2  # between pulls of a round's replies (Flower's own send_and_receive waits 3 s)
ASK_TRIES = 3  # queries to a node that does not say which client it serves


def message_bytes(message: Message) -> int:
    """The bytes Flower moves for ``message``: every object of its tree (the message, its
    records, their contents) as Flower serialises them for the wire. Each object's id is
    computed once (a record's id is the hash of its serialised form, which Flower otherwise
    recomputes for every parent that names it: a 420 MB model was serialised about a dozen
    times to be counted)."""
    with no_object_id_recompute():
        return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


class FlowerTransport:
    """Reach the round's clients through a Flower Grid (SuperLink)."""

    def __init__(
        self,
        grid: Grid,
        round_timeout: float,
        wait_nodes: float = 120.0,
        clients_persist: bool = False,
        node_data: bool = False,
    ) -> None:
        self.grid, self.round_timeout, self.wait_nodes = grid, round_timeout, wait_nodes
        self.node_data = node_data  # the nodes hold their data and declare their counts
        self.sizes: dict[int, int] = {}  # fedbat client -> samples its node declared
        # a node's Flower context lasts one Flower run: only nodes that keep their state on
        # their own disk (node config ``state-dir``) hold it across a resume
        self.clients_persist = clients_persist
        self.nodes: dict[int, int] = {}  # fedbat client -> Flower node id
        self.asked: dict[int, int] = {}  # node -> times asked which client it serves
        self.sent = {"flower/uplink_bytes": 0, "flower/downlink_bytes": 0}
        self.max_bytes = 0  # the largest packet a reply may carry, from the model's size

    def train(self, ctx: RoundContext) -> Trained:
        online = self._discover(ctx.num_clients)
        messages, results = {}, {}
        common = self._common(ctx, any(d.full for d in ctx.deliveries))  # once a round
        if not self.max_bytes:  # an update, the strategy's message, and room for headers
            self.max_bytes = 3 * len(common.get("full") or ctx.full_model()) + 65536
        asked = {}
        for d in ctx.deliveries:
            if self.nodes.get(d.client) not in online:
                results[d.client] = failed(d.client, "no SuperNode online serves this client")
                continue
            nonce = secrets.token_hex(16)
            size = ctx.client_size(d.client)
            asked[d.client] = Asked(d.client, size, ctx.index, nonce, self.max_bytes)
            request = self._request(ctx, d, common) | {"nonce": nonce}  # the reply echoes it
            messages[d.client] = Message(
                RecordDict({RECORD: ConfigRecord(request)}),
                dst_node_id=self.nodes[d.client],
                message_type=MessageType.TRAIN,
            )
        self.sent = {"flower/uplink_bytes": 0, "flower/downlink_bytes": 0}
        self.sent["flower/downlink_bytes"] = sum(map(message_bytes, messages.values()))
        replies, lost = self._exchange(messages)
        for client, why in lost.items():
            results[client] = failed(client, why)
        for client, reply in replies.items():
            if reply.has_error():
                results[client] = failed(client, f"client error: {reply.error.reason[:300]}")
                continue
            record = reply.content.config_records.get(RECORD, {})  # absent: a failed client
            res = result_from_record(record, asked[client])
            if res.ok:
                self.sent["flower/uplink_bytes"] += message_bytes(reply)
            results[client] = res
        failures = {c for c, res in results.items() if not res.ok}  # a node's state unknown
        return Trained([results[c] for c in sorted(results)], lost=failures)

    def round_metrics(self) -> dict[str, float]:
        return dict(self.sent)

    def _exchange(self, messages: dict[int, Message]) -> tuple[dict[int, Message], dict[int, str]]:
        """Push the round's messages, then pull replies until every client has replied, the
        round timeout has passed, or Flower reports the node of every client still awaited
        offline (a SuperNode that died is not waited for). A reply counts only from the node
        the message went to. Returns the replies and, per client without one, why."""
        pushed = list(self.grid.push_messages(list(messages.values())))
        pushed += [None] * (len(messages) - len(pushed))  # none at all: too large for it
        pairs = list(zip(pushed, messages, strict=True))
        lost = {c: "the SuperLink did not take its message" for i, c in pairs if i is None}
        waiting = {i: c for i, c in pairs if i is not None}
        replies: dict[int, Message] = {}
        deadline = time.monotonic() + self.round_timeout
        while waiting:
            for reply in self.grid.pull_messages(list(waiting)):
                client = waiting.get(reply.metadata.reply_to_message_id)
                if client is not None and reply.metadata.src_node_id == self.nodes[client]:
                    replies[client] = reply
                    del waiting[reply.metadata.reply_to_message_id]
            if not waiting:
                break
            online = set(self.grid.get_node_ids())
            for i, client in list(waiting.items()):
                if self.nodes[client] not in online:
                    lost[client] = "its SuperNode went offline"
                    del waiting[i]
            if time.monotonic() >= deadline:
                lost |= {c: f"no reply within {self.round_timeout:g} s" for c in waiting.values()}
                break
            time.sleep(POLL_S)
        return replies, lost

    @staticmethod
    def _common(ctx: RoundContext, full: bool) -> dict:
        """What the round's messages share: the full model (``w_hat``) when some client
        needs it, and the learning-rate schedule's state."""
        out: dict = {}
        if full:
            out["full"] = ctx.full_model()
        if ctx.schedule.active:
            try:
                out["schedule"] = json.dumps(ctx.schedule.state_dict())
            except TypeError as err:
                raise ConfigError(
                    f"the LR scheduler's state cannot travel to clients: {err}"
                ) from None
        return out

    @staticmethod
    def _request(ctx: RoundContext, d: Delivery, common: dict) -> dict:
        content: dict = {"client": d.client, "round": ctx.index}
        if d.full:
            content["full"] = common["full"]
        else:
            content["version"] = d.rounds[0]
            content["chain"] = [ctx.chain_packet(j) for j in d.rounds]
        if "schedule" in common:
            content["schedule"] = common["schedule"]
        return content

    def _discover(self, num_clients: int) -> set[int]:
        """The SuperNodes online; each new one is asked which client it serves (its
        ``partition-id``, and its sample count when it holds its own data), again in later
        rounds when it did not answer (its ClientApp may take long to start on a loaded
        host), up to ``ASK_TRIES`` times. Before the first
        round, waits up to ``wait_nodes`` seconds for a node per client, so that no client
        is missed for having connected late."""
        deadline = time.monotonic() + (self.wait_nodes if not self.asked else 0.0)
        while True:
            online = set(self.grid.get_node_ids())
            known = set(self.nodes.values())
            if ask := {n for n in online - known if self.asked.get(n, 0) < ASK_TRIES}:
                for n in ask:
                    self.asked[n] = self.asked.get(n, 0) + 1
                queries = [
                    Message(RecordDict({}), dst_node_id=n, message_type=MessageType.QUERY)
                    for n in ask
                ]
                for reply in self.grid.send_and_receive(queries, timeout=60):
                    if reply.has_error() or RECORD not in reply.content.config_records:
                        continue
                    answer = reply.content.config_records[RECORD]
                    pid, count = answer.get("partition-id"), declared(answer.get("num-samples"))
                    if not (isinstance(pid, int) and 0 <= pid < num_clients):
                        continue
                    if self.node_data:
                        if count is None:  # no count, no weight: not one of this run's nodes
                            continue
                        self.sizes[pid] = count
                    self.nodes[pid] = reply.metadata.src_node_id
            if len(self.nodes) >= num_clients or time.monotonic() >= deadline:
                return online
            time.sleep(0.5)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """fedbat's loop over this grid. What ends it early is one line, printed and written to
    the run config's ``error-file`` (Flower's log stream does not carry a ServerApp's
    stderr), where ``fedbat flower`` reads it."""
    cfg = OmegaConf.create(str(context.run_config["config"]))
    timeout = float(context.run_config.get("round-timeout", 600))
    launcher = int(context.run_config.get("launcher", 0)) or None  # it holds the run dir
    persist = bool(context.run_config.get("clients-persist", False))
    own = bool(context.run_config.get("node-data", False))
    transport = FlowerTransport(grid, timeout, clients_persist=persist, node_data=own)
    try:
        data = server_data(cfg, transport.sizes) if own else None
        run(cfg, data=data, transport=transport, launcher=launcher)
    except (ConfigError, PeerLost) as err:
        _report(context, f"fedbat: error: {err}")
        raise SystemExit(2 if isinstance(err, ConfigError) else 1) from None
    except Exception as err:
        _report(context, f"fedbat: error: the ServerApp failed: {type(err).__name__}: {err}")
        raise


def _report(context: Context, line: str) -> None:
    line = " ".join(line.split())[:1000]
    print(line, file=sys.stderr, flush=True)
    if path := str(context.run_config.get("error-file", "")):
        Path(path).write_text(line + "\n")
