"""fedbat's ClientApp on every node but partition 1's, which trains as fedbat does and then
tampers with its reply, a different way each round (``ATTACKS``), as a malicious device
would. Run by tests/test_flower_deployment.py in a real deployment."""

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedbat.integrations.flower import client_app as fedbat_app
from fedbat.integrations.flower.protocol import RECORD

LAST = "hostile-last"  # the reply it sent before, kept in its Flower context to replay


def replay(now: dict, last: dict) -> dict:
    return last


def stale(now: dict, last: dict) -> dict:
    return now | {"round": now["round"] - 1}


def impersonate(now: dict, last: dict) -> dict:
    return now | {"client": 0}


def oversize(now: dict, last: dict) -> dict:
    return now | {"packet": now["packet"] + bytes(8 << 20)}  # the test's model: 0.3 MB


def malformed(now: dict, last: dict) -> dict:
    return now | {"logs": "{not json"}


def overweight(now: dict, last: dict) -> dict:
    return now | {"num_samples": 100 * now["num_samples"]}


# by the request's round index (0 is the first round, honest)
ATTACKS = {1: replay, 2: stale, 3: impersonate, 4: oversize, 5: malformed, 6: overweight}

app = ClientApp()
app.query()(fedbat_app.query)


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = fedbat_app.train(msg, context)
    if int(context.node_config["partition-id"]) != 1:
        return reply
    now = dict(reply.content.config_records[RECORD])
    last = dict(context.state.config_records.get(LAST, {}))
    context.state[LAST] = ConfigRecord(now)
    attack = ATTACKS.get(int(now["round"]))
    sent = attack(now, last) if attack else now
    return Message(RecordDict({RECORD: ConfigRecord(sent)}), reply_to=msg)
