"""The node's side of secure aggregation, one function per message: keys, shares, masked input,
consistency, unmask (the protocol itself is `client/secagg.py`).

A step's state lives with the node: on a deployed node in its own files (`client/node_state.py`),
written before each reply leaves, so one round masks at most one update whatever Flower does with
the node's context; in simulation in Flower's context. Each step checks the request first: step 1
and step 3 are admitted like a plain round (`client/admission.py`), and every later step must
belong to the round and configuration step 1 saw.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedtune.client.admission import Admission, Refused, admit
from fedtune.client.node_state import Release
from fedtune.client.replies import train_metrics
from fedtune.client.request import Request
from fedtune.client.secagg import SecAggClient, SecAggViolation, peer_violations
from fedtune.common import record_keys as keys
from fedtune.common.client_dp import with_gaussian_noise
from fedtune.common.secagg.plan import summation_for
from fedtune.common.secagg.records import (
    cohort_from_record,
    keys_to_record,
    reveals_to_record,
    routing_from_record,
    sealed_from_record,
    sealed_to_record,
    signature_to_record,
    signatures_from_record,
    survivors_from_record,
)
from fedtune.common.secagg.signing import Signer, read_peers
from fedtune.common.secagg.summation import Summation

CONTEXT_STATE = "secagg"  # a simulated node's protocol state, in its Flower context
SECURE = "secure"  # the kind of release step 3 makes: the change to sum, noise share included


def start(request: Request) -> Message | Refused:
    """Step 1: fresh key pairs and self-mask seed for this round; the public keys go out."""
    if isinstance(verdict := admit(request, secure=True, trains=False), Refused):
        return verdict
    if broken := peer_violations(request.node, request.config):  # pinned consortium keys
        return Refused(broken)
    session = _session(request)
    if _load(request, session) is not None:
        raise SecAggViolation("a second step 1 in this round: keys are never replaced")
    node = request.node
    signer = Signer.from_file(node.node_key) if node.policy.peers else None
    client = SecAggClient(node.name, session, request.server_round, signer)
    client.config_digest = _config_digest(request)  # the round's configuration, pinned
    _keep(request, client)
    return _reply(request, {keys.CONFIG: keys_to_record(client.signed_keys())})


def share(request: Request) -> Message | Refused:
    """Step 2: Shamir shares of this client's secrets, each encrypted for its holder, if the
    cohort and threshold meet this node's policy."""
    client = _resume(request)
    cohort = cohort_from_record(request.msg.content[keys.CONFIG])
    policy = request.node.policy
    broken = []
    if len(cohort.names) < policy.min_cohort:
        broken.append(f"min-cohort: {len(cohort.names)} clients in the round, this node needs "
                      f"at least {policy.min_cohort}")
    if cohort.threshold < policy.min_threshold:
        broken.append(f"min-threshold: threshold {cohort.threshold}, this node needs at least "
                      f"{policy.min_threshold}")
    pinned = read_peers(policy.peers) if policy.peers else None
    broken += client.pin_violations(cohort, pinned)
    if broken:
        return Refused(broken)
    sealed = client.share_secrets(cohort, pinned)
    _keep(request, client)
    return _reply(request, {keys.CONFIG: ConfigRecord(sealed_to_record(sealed, "to"))})


def mask(request: Request) -> Message | Refused:
    """Step 3: train, then send the change masked, with the example count and loss inside the
    masked vector where the summation weighs them; under client-level DP the change carries
    this client's share of the noise, so no sum the server sees is un-noised.

    On a deployed node the whole step holds its round state: two step-3 messages at once (a
    replay, or a second session of the round) cannot both get past the checks."""
    store = request.state()
    with store.exclusive() if store is not None else nullcontext():
        return _mask(request)


def _mask(request: Request) -> Message | Refused:
    client = _resume(request)
    client.expect("shares")  # a replayed or repeated step 3 is refused before any training
    if (other := _masked_elsewhere(request, client.session)) is not None:
        return other
    from fedtune.client.local_round import recall, remember  # torch, PEFT, Opacus: step 3 only

    kept = recall(request, SECURE)
    # step 3 carries its own request: checked again, never assumed
    verdict = admit(request, secure=True, answered=kept is not None)
    if isinstance(verdict, Refused):
        return verdict
    received = sealed_from_record(request.msg.content[keys.CONFIG], "from")
    # too few shares: refused before training too; neighbours whose shares do not open are
    # left out of the masks and named in a signed complaint
    client.check_shares(received, min_delivered=1 - request.node.policy.max_dropout)
    summation = summation_for(request.config, client.cohort_size())
    release = kept or remember(request, SECURE,
                               lambda: _noised_change(request, verdict, summation))
    vector = summation.to_vector(release.arrays, release.examples, release.loss)
    masked = client.mask(received, vector, summation.encoding,
                         np.random.default_rng(request.seeds.rounding))
    _keep(request, client)  # on the node's disk before the masked input leaves
    if (store := request.state()) is not None:
        store.keep_masked(request.run, request.server_round, client.session)
    epsilon = verdict.ledger.spent() if verdict.ledger is not None else None
    metrics = train_metrics(examples=release.examples, loss=release.loss,
                            dp=request.config.privacy.dp, secure=True, epsilon=epsilon)
    content = {keys.ARRAYS: ArrayRecord({keys.MASKED: Array(masked)}), keys.METRICS: metrics}
    if (complaint := client.complaint()) is not None:
        content[keys.CONFIG] = ConfigRecord(complaint)
    return _reply(request, content)


def consistency(request: Request) -> Message:
    """Consistency round: sign the announced survivor set, once; no share leaves unless a
    majority of the cohort signed the same set."""
    client = _resume(request)
    settings = request.msg.content[keys.CONFIG]
    signature = client.sign_survivors(survivors_from_record(settings),
                                      routing_from_record(settings),
                                      min_survivors=_fewest(request, client))
    _keep(request, client)
    return _reply(request, {keys.CONFIG: ConfigRecord(signature_to_record(signature))})


def unmask(request: Request) -> Message:
    """Step 4: the shares the server may have, never both of one client, and none unless the
    survivor set is the one this client signed, enough others signed it, and enough clients
    are summed."""
    client = _resume(request)
    settings = request.msg.content[keys.CONFIG]
    reveals = client.reveal(survivors_from_record(settings), routing_from_record(settings),
                            signatures_from_record(settings),
                            min_survivors=_fewest(request, client))
    _keep(request, client)
    return _reply(request, {keys.CONFIG: reveals_to_record(reveals)})


def _noised_change(request: Request, admission: Admission, summation: Summation) -> Release:
    """This client's change of the adapter, plus its share of the Gaussian noise when the
    summation carries one (client-level DP under secure aggregation)."""
    from fedtune.client.local_round import train_round

    update = train_round(request, admission)
    start_state = request.adapter
    change = {k: update.arrays[k].astype(np.float64) - start_state[k] for k in start_state}
    if summation.noise_std > 0:
        change = with_gaussian_noise(change, summation.noise_std,
                                     np.random.default_rng(request.seeds.noise))
    return Release(change, update.examples, 0.0 if request.config.privacy.dp else update.loss)


def _masked_elsewhere(request: Request, session: bytes) -> Refused | None:
    """A refusal where this node already masked this run's round in another session: two sums
    whose cohorts differ by one member would give the server that member's update."""
    store = request.state()
    masked = store.masked_in(request.run, request.server_round) if store is not None else None
    if masked is None or masked == session:
        return None
    return Refused([f"secagg: this node already sent round {request.server_round} of this run "
                    "masked in another session; it masks one update per round, once"])


def _fewest(request: Request, client: SecAggClient) -> int:
    """The fewest survivors this client reveals for: its policy's min-cohort, and under
    client-level DP the survivors its noise share was sized for."""
    return max(request.node.policy.min_cohort,
               summation_for(request.config, client.cohort_size()).survivors)


def _session(request: Request) -> bytes:
    return bytes(request.msg.content[keys.CONFIG][keys.SECAGG_SESSION])


def _load(request: Request, session: bytes) -> bytes | None:
    store = request.state()
    if store is not None:
        return store.secagg(session)
    kept = request.context.state.config_records.get(CONTEXT_STATE)
    if kept is None or bytes(kept["session"]) != session:
        return None
    return bytes(kept["state"])


def _keep(request: Request, client: SecAggClient) -> None:
    store = request.state()
    if store is not None:
        store.keep_secagg(client.session, client.to_bytes())
    else:
        request.context.state[CONTEXT_STATE] = ConfigRecord({"session": client.session,
                                                             "state": client.to_bytes()})


def _resume(request: Request) -> SecAggClient:
    """This node's protocol state for the round the message belongs to, or a refusal."""
    data = _load(request, _session(request))
    if data is None:
        raise SecAggViolation("no secure-aggregation round in progress on this node")
    client = SecAggClient.from_bytes(data)
    if request.server_round != client.round:
        raise SecAggViolation("message belongs to another round (stale or replayed)")
    if _config_digest(request) != client.config_digest:
        raise SecAggViolation("the run configuration changed within the round (the noise and "
                              "the survivors it needs are fixed at step 1)")
    return client


def _config_digest(request: Request) -> str:
    return hashlib.sha256(request.config_json.encode()).hexdigest()


def _reply(request: Request, content: dict) -> Message:
    return Message(RecordDict(content), reply_to=request.msg)
