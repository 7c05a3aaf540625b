"""A federation with clients that send every kind of malformed reply, plain and under secure
aggregation: each round completes, each bad client is named in `clients_rejected` with the
problem, the honest clients are aggregated and the global adapter stays finite.

The misbehaving clients are the real ClientApp with its replies corrupted after the fact (a
wrapper app defined in the subprocess's `__main__`, which Ray ships to its workers by value), so
the corruptions follow whatever an honest client sends (dtype, vector length) and not a copy of
the protocol's encoding.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedtune.server.checkpoint import checkpoint_rounds, latest_checkpoint
from fedtune.server.metrics_log import read_rounds

MALFORMED_APP = r'''
import json, sys
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
import fedtune.client.app as honest
from fedtune.client.node import Node
from fedtune.common.config import RunConfig
from fedtune.simulations import engine

SETTINGS, PLAN = json.loads(sys.argv[1]), json.loads(sys.argv[2])  # "round:name" -> kind


def records(content, **changes):
    """The reply's records with some replaced (None: removed)."""
    items = {name: record for name, record in content.items()}
    for name, record in changes.items():
        items.pop(name, None)
        if record is not None:
            items[name] = record
    return RecordDict(items)


def arrays(content):
    return {k: v.numpy() for k, v in content["arrays"].items()}


def with_arrays(content, state):
    return records(content, arrays=ArrayRecord({k: Array(np.ascontiguousarray(v))
                                                for k, v in state.items()}))


def with_metrics(content, **changes):
    metrics = {k: v for k, v in content["metrics"].items()}
    for name, value in changes.items():
        metrics.pop(name, None)
        if value is not None:
            metrics[name] = value
    return records(content, metrics=MetricRecord(metrics))


def with_config(content, **changes):
    config = {k: v for k, v in content["config"].items()}
    config.update(changes)
    return records(content, config=ConfigRecord(config))


def matrix(state):
    """The name of the first two-dimensional tensor (a LoRA matrix)."""
    return next(k for k in sorted(state) if state[k].ndim == 2)


def changed(content, change):
    state = arrays(content)
    name = matrix(state)
    state[name] = change(state[name].copy())
    return with_arrays(content, state)


def poke(value):
    def change(v):
        v.flat[0] = value
        return v
    return change


def masked(content, change):
    vector = content["arrays"]["masked"].numpy()
    return records(content, arrays=ArrayRecord({"masked": Array(change(vector))}))


def rogue(vector):
    """About 3 (a quarter of the ring) added to every adapter value inside the masks, the
    weight and totals left as sent: a sum no honest inputs could give."""
    vector = vector.copy()
    vector[:-3] += np.uint32(2**30)
    return vector


def unopenable(content):
    """Every share ciphertext client-1 sends another client altered so that it fails
    authentication: each of them complains, so most of its receivers accuse it."""
    config = content["config"]
    sealed = [ciphertext if name == "client-1" else ciphertext[:-1] + bytes([ciphertext[-1] ^ 1])
              for name, ciphertext in zip(config["to-names"], config["to-sealed"], strict=True)]
    return with_config(content, **{"to-sealed": sealed})


CORRUPT = {  # kind -> (the message type whose reply it corrupts, how)
    "missing-metric": ("train", lambda c: with_metrics(c, **{"train-loss": None})),
    "metric-type": ("train", lambda c: with_metrics(c, **{"train-loss": [0.5, 0.5]})),
    "epsilon-list": ("train", lambda c: with_metrics(c, epsilon=[1.0, 2.0])),
    "epsilon-extra": ("train", lambda c: with_metrics(c, epsilon=0.5)),
    "extra-tensor": ("train", lambda c: with_arrays(c, {**arrays(c),
                                                        "extra": np.zeros(3, np.float32)})),
    "missing-tensor": ("train", lambda c: with_arrays(c, {k: v for k, v in arrays(c).items()
                                                          if k != matrix(arrays(c))})),
    "wrong-shape": ("train", lambda c: changed(c, lambda v: v.reshape(-1))),
    "broadcast-shape": ("train", lambda c: changed(c, lambda v: v[None])),
    "wrong-dtype": ("train", lambda c: changed(c, lambda v: v.astype(np.float64))),
    "nan": ("train", lambda c: changed(c, poke(np.nan))),
    "inf": ("train", lambda c: changed(c, poke(np.inf))),
    "absurd-norm": ("train", lambda c: changed(c, lambda v: v + 1e4)),
    "examples-huge": ("train", lambda c: with_metrics(c, **{"num-examples": 10**12})),
    "examples-negative": ("train", lambda c: with_metrics(c, **{"num-examples": -5})),
    "examples-fractional": ("train", lambda c: with_metrics(c, **{"num-examples": 2.5})),
    "zero-key": ("train.secagg_keys", lambda c: with_config(c, **{"c-public": bytes(32)})),
    "equal-keys": ("train.secagg_keys", lambda c: with_config(c, **{
        "s-public": c["config"]["c-public"]})),
    "keys-not-bytes": ("train.secagg_keys", lambda c: with_config(c, **{"c-public": "a key"})),
    "keys-no-record": ("train.secagg_keys", lambda c: records(c, config=None)),
    "bad-shares": ("train.secagg_shares", lambda c: with_config(c, **{
        "to-names": list(c["config"]["to-names"])[:-1]})),
    "masked-dtype": ("train.secagg_masked", lambda c: masked(c, lambda v: v.astype(np.float64))),
    "masked-length": ("train.secagg_masked", lambda c: masked(c, lambda v: v[:-1])),
    "masked-missing": ("train.secagg_masked", lambda c: records(c, arrays=None)),
    "masked-no-metrics": ("train.secagg_masked", lambda c: records(c, metrics=None)),
    "masked-bad-metric": ("train.secagg_masked", lambda c: with_metrics(c, epsilon=[1.0, 2.0])),
    "unopenable-share": ("train.secagg_shares", unopenable),
    "rogue-ring": ("train.secagg_masked", lambda c: masked(c, rogue)),
    "bad-reveal": ("train.secagg_unmask", lambda c: with_config(c, **{
        "owners": list(c["config"]["owners"])[:-1]})),
}


class Misbehaving(ClientApp):
    """The real ClientApp; a planned client's reply to one step comes back corrupted. Every
    other message (a step this test does not know of too) passes as it is."""

    def __call__(self, message, context):
        reply = honest.app(message, context)
        step = message.metadata.message_type
        if reply.has_error() or step not in {s for s, _ in CORRUPT.values()}:
            return reply
        name = Node.from_node_config(context.node_config).name
        kind = PLAN.get(f"{int(message.content['config']['server-round'])}:{name}")
        if kind is None or CORRUPT[kind][0] != step:
            return reply
        return Message(CORRUPT[kind][1](reply.content), reply_to=message)


engine.client_app = Misbehaving()
engine.simulate(RunConfig.from_mapping(SETTINGS))
'''

CLIENTS = 7

# Plain FedAvg: five of seven clients misbehave each round, client-0 and client-6 never.
PLAIN = {
    1: {"client-1": "missing-metric", "client-2": "metric-type", "client-3": "epsilon-list",
        "client-4": "extra-tensor", "client-5": "missing-tensor"},
    2: {"client-1": "wrong-shape", "client-2": "broadcast-shape", "client-3": "wrong-dtype",
        "client-4": "nan", "client-5": "inf"},
    3: {"client-1": "absurd-norm", "client-2": "examples-huge", "client-3": "examples-negative",
        "client-4": "examples-fractional", "client-5": "epsilon-extra"},
}

# Secure aggregation: as many kinds per round as leave a cohort that meets its threshold and
# quorum (over two thirds: 5 of 7) and lets every client receive all but a fifth of its shares.
SECURE = {
    1: {"client-1": "zero-key", "client-2": "equal-keys"},
    2: {"client-1": "bad-shares", "client-2": "masked-dtype"},
    3: {"client-1": "keys-not-bytes", "client-2": "keys-no-record"},
    4: {"client-1": "masked-length", "client-2": "masked-missing"},
    5: {"client-1": "masked-no-metrics", "client-2": "masked-bad-metric"},
    6: {"client-1": "bad-reveal"},
    7: {"client-1": "unopenable-share"},  # blamed by all its receivers, never sampled again
    8: {"client-2": "rogue-ring"},
}

REASON = {  # kind -> what its reason must say
    "missing-metric": r"metrics \[.*\] differ from the expected",
    "metric-type": r"train-loss must be a finite number",
    "epsilon-list": r"metrics \[.*'epsilon'.*\] differ from the expected",
    "epsilon-extra": r"metrics \[.*'epsilon'.*\] differ from the expected",
    "extra-tensor": r"unexpected \['extra'\]",
    "missing-tensor": r"missing \['[^']+'\]",
    "wrong-shape": r"tensor \S+ is \w+\[\d+\], expected \w+\[\d+, \d+\]",
    "broadcast-shape": r"tensor \S+ is \w+\[1, \d+, \d+\], expected \w+\[\d+, \d+\]",
    "wrong-dtype": r"tensor \S+ is float64\[.*\], expected",
    "nan": r"NaN or infinite",
    "inf": r"NaN or infinite",
    "absurd-norm": r"update norm .* exceeds federation.max_update_norm",
    "examples-huge": r"num-examples 1000000000000 is outside",
    "examples-negative": r"num-examples -5 is outside",
    "examples-fractional": r"num-examples must be an integer, got 2.5",
    "zero-key": r"share-encryption key: unusable public key",
    "equal-keys": r"its two public keys are the same",
    "keys-not-bytes": r"'c-public' must be bytes",
    "keys-no-record": r"no 'config' record",
    "bad-shares": r"ciphertexts do not match their names",
    "masked-dtype": r"masked input: .*float64",
    "masked-length": r"masked input: .*shape",
    "masked-missing": r"masked input: .*no 'masked' vector",
    "masked-no-metrics": r"masked input: .*'metrics'",
    "masked-bad-metric": r"masked input: .*epsilon",
    "bad-reveal": r"unmask shares: .*columns differ",
    "unopenable-share": r"its shares to client-0, client-2, .* do not open \(signed complaints\)",
    "rogue-ring": r"impossible for honest ones",
}

# A client whose step-4 reveal is malformed has its masked input in the sum already: it is
# counted among the clients summed as well as rejected.
SUMMED_ANYWAY = {"bad-reveal"}
# Named in `clients_blamed` (its neighbour's signed complaint) rather than `clients_rejected`.
BLAMED = {"unopenable-share"}
# Values out of bounds inside the masks: no one can be named, the sum is refused and counted.
REFUSED_SUM = {"rogue-ring"}


def run(plan: dict[int, dict[str, str]], out: Path, model: Path, data: Path,
        secure: bool) -> subprocess.CompletedProcess:
    settings = {"model.name": str(model), "data.path": str(data),
                "federation.num_clients": CLIENTS, "federation.rounds": len(plan),
                "federation.fraction_evaluate": 0.0, "train.batch_size": 8,
                "secagg.enabled": secure, "output.dir": str(out)}
    flat = {f"{r}:{name}": kind for r, kinds in plan.items() for name, kind in kinds.items()}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-c", MALFORMED_APP, json.dumps(settings),
                           json.dumps(flat)], capture_output=True, text=True, timeout=900,
                          env=env)


def test_the_plans_cover_every_kind():
    assert sorted(k for p in (PLAIN, SECURE) for r in p.values() for k in r.values()) == \
        sorted(REASON)


@pytest.mark.slow
@pytest.mark.parametrize(("secure", "plan"), [(False, PLAIN), (True, SECURE)],
                         ids=["plain", "secagg"])
def test_malformed_replies_are_rejected_and_the_rounds_go_on(secure, plan, tiny_model_dir,
                                                             toy_data_dir, tmp_path):
    out = tmp_path / "run"
    done = run(plan, out, tiny_model_dir, toy_data_dir, secure)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_rounds(out)
    assert [row["round"] for row in rows] == list(plan), done.stderr[-3000:]
    assert checkpoint_rounds(out) == list(plan)
    retired = 0
    for row in rows:
        bad = plan[row["round"]]
        rejected, blamed = row.get("clients_rejected", {}), row.get("clients_blamed", {})
        named = {n for n, kind in bad.items() if kind not in REFUSED_SUM}
        assert sorted(rejected) == sorted(n for n in named if bad[n] not in BLAMED), row
        assert sorted(blamed) == sorted(n for n in named if bad[n] in BLAMED), row
        for name, kind in bad.items():
            reason = row["round_abandoned"] if kind in REFUSED_SUM else \
                (blamed if kind in BLAMED else rejected)[name]
            assert re.search(REASON[kind], reason), (kind, reason)
        if REFUSED_SUM & set(bad.values()):
            assert row["sums_refused"] == 1 and row["clients"] == 0, row
            continue
        summed = [name for name, kind in bad.items() if kind in SUMMED_ANYWAY]
        assert row["clients"] == CLIENTS - retired - len(bad) + len(summed), row
        retired += len(blamed)
        assert row["clients_failed"] == 0, row
        assert "epsilon" not in row  # no DP: an epsilon could only come from a rejected reply
    for value in latest_checkpoint(out).arrays.values():
        assert np.isfinite(value).all()
