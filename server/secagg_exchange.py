"""Secure aggregation as a round's training exchange: four message exchanges with the sampled
clients drive `SecAggServer`; the result is the same weighted FedAvg as `train_exchange`, but
the server only ever holds masked vectors and the unmasked sum."""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedtune.common import record_keys as keys
from fedtune.common.adapter_state import from_record, to_record
from fedtune.common.config import RunConfig
from fedtune.common.console import printable
from fedtune.common.secagg.plan import summation_for
from fedtune.common.secagg.records import (
    RecordError,
    cohort_to_record,
    complaint_from_record,
    keys_from_record,
    reveals_from_record,
    routing_to_record,
    sealed_from_record,
    sealed_to_record,
    signature_from_record,
    signatures_to_record,
    survivors_to_record,
)
from fedtune.common.secagg.summation import ImpossibleSum, vector_length
from fedtune.server.client_level_release import ReleaseLog
from fedtune.server.replies import check_masked_metrics
from fedtune.server.roster import answering_node
from fedtune.server.secagg import SecAggAbort, SecAggServer
from fedtune.server.strategies.fedavg import SeededFedAvg
from fedtune.server.train_outcome import (
    TrainOutcome,
    refusal_status,
    refused,
    reported_epsilon,
    retire_refusing,
)


def secure_train_exchange(grid: Grid, strategy: SeededFedAvg, server_round: int,
                          arrays: ArrayRecord, settings: ConfigRecord,
                          config: RunConfig) -> TrainOutcome:
    """One round of training through the protocol; an abandoned round returns no arrays.

    Clients send their masked changes of the adapter (`Summation`); the new global adapter is
    the old one plus the average change, as in plain FedAvg. Under client-level DP the
    clients' noise shares are already in the sum."""
    sampled = [strategy.roster.name_of(m.metadata.dst_node_id)
               for m in strategy.configure_train(server_round, arrays, settings, grid)]
    secagg, timeout = config.secagg, config.federation.timeout
    protocol = SecAggServer(server_round, secagg.threshold, secagg.neighbours)
    base = {**dict(settings), keys.SERVER_ROUND: server_round,
            keys.SECAGG_SESSION: protocol.session}
    link = _Link(grid, strategy, timeout)

    replies = link.exchange(sampled, keys.SECAGG_KEYS, lambda _: RecordDict(
        {keys.CONFIG: ConfigRecord(base)}))
    exhausted, by_policy = retire_refusing(strategy.roster,
                                           [r for r in replies.values() if refused(r)])
    epsilon = {name: eps for name, r in replies.items()
               if refused(r) and (eps := reported_epsilon(r)) is not None}
    public = {name: _parse(protocol, "public keys", keys_from_record, r, name)
              for name, r in replies.items() if not refused(r)}
    public = {name: value for name, value in public.items() if value is not None}
    metrics: dict[str, MetricRecord] = {}
    sums: dict[str, float] = {}
    abandoned: Exception | None = None
    blamed: dict[str, str] = {}
    try:
        cohort = protocol.make_cohort(public)
        replies = link.exchange(cohort.names, keys.SECAGG_SHARES, lambda _: RecordDict(
            {keys.CONFIG: ConfigRecord({**base, **cohort_to_record(cohort)})}))
        sealed = {name: _parse(protocol, "encrypted shares", sealed_from_record, r, name, "to")
                  for name, r in replies.items()}
        inbox = protocol.route({n: s for n, s in sealed.items() if s is not None})

        length = vector_length(from_record(arrays))
        replies = link.exchange(sorted(inbox), keys.SECAGG_MASKED, lambda name: RecordDict(
            {keys.ARRAYS: arrays,
             keys.CONFIG: ConfigRecord({**base, **sealed_to_record(inbox[name], "from")})}))
        masked, metrics, blamed = _masked_inputs(protocol, replies, length)
        convicted = protocol.convicted()
        for name in blamed:  # left out of this round; most of its receivers: never again
            if name in convicted:
                strategy.roster.retire(name)
            log(WARNING, "%s is left out %s: %s", name,
                "for the rest of the run" if name in convicted else "of this round",
                blamed[name])
        summation = summation_for(config, len(cohort.names))
        survivors = protocol.survivors(masked, summation.survivors)
        routing = protocol.routing(survivors)
        agreed = {**base, **survivors_to_record(survivors), **routing_to_record(routing)}

        replies = link.exchange(survivors, keys.SECAGG_CONSISTENCY, lambda _: RecordDict(
            {keys.CONFIG: ConfigRecord(agreed)}))
        signatures = {name: _parse(protocol, "consistency signature", signature_from_record,
                                   r, name) for name, r in replies.items()}
        signed = protocol.consistent(survivors, routing, {
            name: signature for name, signature in signatures.items() if signature is not None})

        if summation.noise_std > 0:  # from here on the server may hold the noised sum
            ReleaseLog(config.output.dir).record(server_round)
        replies = link.exchange(survivors, keys.SECAGG_UNMASK, lambda _: RecordDict(
            {keys.CONFIG: ConfigRecord({**agreed, **signatures_to_record(signed)})}))
        reveals = {name: _parse(protocol, "unmask shares", reveals_from_record, r, name) or []
                   for name, r in replies.items()}
        total = summation.encoding.decode(protocol.unmask(masked, reveals))
        global_state = from_record(arrays)
        change, sums = summation.average(total, global_state, len(survivors))
        new_arrays = to_record({k: (v + change[k]).astype(v.dtype)
                                for k, v in global_state.items()})
    except (SecAggAbort, ImpossibleSum) as error:
        log(WARNING, "Round %d abandoned, the global adapter stays as it was: %s",
            server_round, error)
        new_arrays, metrics, abandoned = None, {}, error
    log(INFO, "secure aggregation: %d of %d sampled clients summed", len(metrics), len(sampled))
    epsilon.update({name: float(m[keys.EPSILON]) for name, m in metrics.items()
                    if keys.EPSILON in m})
    by_policy.update(link.refused)
    rejected = dict(protocol.rejected)  # a bad step-4 reply's input may still be in the sum
    return TrainOutcome(arrays=new_arrays, metrics=_mean_loss(sums), clients=len(metrics),
                        failures=len(sampled) - len(metrics) - len(exhausted) - len(by_policy)
                        - len((set(rejected) | set(blamed)) - set(metrics)),
                        bytes_up=link.bytes_up, bytes_down=link.bytes_down,
                        epsilon=dict(sorted(epsilon.items())), exhausted=exhausted,
                        refused=dict(sorted(by_policy.items())),
                        rejected=dict(sorted(rejected.items())),
                        blamed=dict(sorted(blamed.items())),
                        abandoned="" if abandoned is None else str(abandoned),
                        sum_refused=isinstance(abandoned, ImpossibleSum))


class _Link:
    """Send one step's messages by client name; keep the good replies and count the bytes."""

    def __init__(self, grid: Grid, strategy: SeededFedAvg, timeout: float) -> None:
        self.grid, self.timeout, self.roster = grid, timeout, strategy.roster
        self.bytes_up = self.bytes_down = 0
        self.refused: dict[str, str] = {}  # a node's policy refused a later step: name -> rules

    def exchange(self, names: list[str], action: str,
                 content_for: Callable[[str], RecordDict]) -> dict[str, Message]:
        node_of = dict(self.roster.active())
        messages = [Message(content_for(name), dst_node_id=node_of[name],
                            message_type=f"train.{action}") for name in names if name in node_of]
        self.bytes_down += sum(_size(m) for m in messages)
        replies = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            name = self.roster.name_of(answering_node(reply, messages))
            if reply.has_error():
                log(WARNING, "%s failed at %s: %s", name, action,
                    printable(reply.error.reason))
                continue
            self.bytes_up += _size(reply)
            if action != keys.SECAGG_KEYS and refusal_status(reply) == keys.POLICY_REFUSED:
                self.refused[name] = printable(reply.content[keys.CONFIG].get(keys.REASON, ""))
                log(WARNING, "%s refused %s by its node policy: %s", name, action,
                    self.refused[name])
                continue
            replies[name] = reply
        return replies


def _masked_vector(protocol: SecAggServer, name: str, reply: Message,
                   length: int) -> np.ndarray | None:
    try:
        arrays = reply.content.array_records.get(keys.ARRAYS)
        if arrays is None or keys.MASKED not in arrays:
            raise ValueError(f"no '{keys.MASKED}' vector")
        vector = arrays[keys.MASKED].numpy()
        protocol.check_masked(name, vector, length)
        check_masked_metrics(reply)  # the caller takes the metrics record as it is
    except Exception as error:  # whatever the client sent, the round goes on without it
        protocol.rejected[name] = f"masked input: {error}"
        log(WARNING, "Masked input of %s refused: %s", name, error)
        return None
    return vector


def _masked_inputs(protocol: SecAggServer, replies: dict[str, Message], length: int
                   ) -> tuple[dict[str, np.ndarray], dict[str, MetricRecord], dict[str, str]]:
    """Step 3: the masked vectors and metrics to go on with, and {accused: why} of the valid
    complaints that came with them; the accused and the authors of invalid complaints are left
    out."""
    masked, metrics, complaints = {}, {}, {}
    for name, reply in replies.items():
        vector = _masked_vector(protocol, name, reply, length)
        complaint = _complaint(protocol, name, reply) if vector is not None else None
        if vector is not None and name not in protocol.rejected:
            masked[name], metrics[name] = vector, reply.content[keys.METRICS]
            if complaint is not None:
                complaints[name] = complaint
    blamed = protocol.blame(complaints)
    for name in [*blamed, *protocol.rejected]:
        masked.pop(name, None)
        metrics.pop(name, None)
    return masked, metrics, blamed


def _complaint(protocol: SecAggServer, name: str,
               reply: Message) -> tuple[list[str], bytes] | None:
    """The signed complaint a masked reply carries (neighbours whose shares did not open), or
    None; a malformed one rejects its sender."""
    if keys.CONFIG not in reply.content.config_records:
        return None
    return _parse(protocol, "complaint", complaint_from_record, reply, name)


def _parse(protocol: SecAggServer, what: str, parse, reply: Message, name: str, *args):
    """The protocol record `parse` reads from a reply's config, or None with the client
    rejected for it (`clients_rejected`)."""
    try:
        if keys.CONFIG not in reply.content.config_records:
            raise RecordError(f"no '{keys.CONFIG}' record")
        return parse(reply.content[keys.CONFIG], *args)
    except Exception as error:  # whatever the client sent, the round goes on without it
        protocol.rejected[name] = f"{what}: {error}"
        log(WARNING, "%s of %s refused: %s", what.capitalize(), name, error)
        return None


def _mean_loss(sums: dict[str, float]) -> MetricRecord | None:
    """The clients' mean training loss from the unmasked totals (none under DP: DP clients put
    no loss in their vector)."""
    if not sums.get("examples") or not sums.get("loss-sum"):
        return None
    return MetricRecord({keys.TRAIN_LOSS: sums["loss-sum"] / sums["examples"]})


def _size(message: Message) -> int:
    """Payload bytes: arrays plus the bytes values of config records (keys, shares)."""
    if not message.has_content():
        return 0
    content = message.content
    total = sum(record.count_bytes() for record in content.array_records.values())
    for record in content.config_records.values():
        for value in record.values():
            if isinstance(value, bytes):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(v) for v in value if isinstance(v, bytes))
    return total
