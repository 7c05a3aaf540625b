"""The ClientApp: a routing table from the server's messages to this node's answers.

Every message is untrusted. Each is read once (`client/request.py`); a train request is admitted
from the request and the node's own policy alone (`client/admission.py`) before any row is read;
an admitted round trains and releases (`client/local_round.py`); secure aggregation's steps are
`client/secagg_steps.py`; an evaluation is `client/evaluation.py`. What each reply may carry is
`client/replies.py`.

Torch, PEFT and Opacus are imported only by the steps that load the model (a train, secure
aggregation's steps 1 and 3, an evaluation): a deployed node starts a process per message, and
the steps that only share, sign and reveal then start in a fraction of the time (under
client-level DP they still load Opacus, whose accountant sizes the noise share).
"""

from __future__ import annotations

from collections.abc import Callable
from logging import ERROR

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from fedtune.client import evaluation, secagg_steps
from fedtune.client.admission import Refused, admit
from fedtune.client.ledger import BudgetExhausted
from fedtune.client.node import Node
from fedtune.client.replies import budget_refusal, refusal, train_metrics
from fedtune.client.request import Request, RequestError
from fedtune.client.secagg import SecAggViolation
from fedtune.common import console
from fedtune.common import record_keys as keys
from fedtune.common.adapter_state import to_record

app = ClientApp()
console.quiet_worker()  # a no-op outside a non-verbose simulation's Ray workers
PLAIN = "plain"  # the kind of release a plain train reply makes: the trained adapter


class NodeFailure(RuntimeError):
    """What the server is told when a deployed node fails: no detail, since an exception's text
    can hold the node's data (a row's field, a label, a count)."""


Step = Callable[[Request], Message | Refused]


def answered(name: str, step: Step) -> Callable[[Message, Context], Message]:
    """A Flower handler around `step`: the request read once, a refusal turned into its reply,
    and, on a deployed node, any other error logged here and sent as one fixed line. Protocol
    refusals (SecAggViolation) name no data and pass as they are; simulated nodes keep the full
    error, the researcher being both sides."""

    def handler(msg: Message, context: Context) -> Message:
        try:
            request = Request.parse(msg, context)
        except RequestError as error:
            return refusal(msg, [str(error)])
        try:
            verdict = step(request)
        except SecAggViolation:
            raise
        except BudgetExhausted as exhausted:  # a concurrent run took the budget first
            return budget_refusal(msg, exhausted.spent)
        except Exception as error:
            if request.node.simulated:
                raise
            log(ERROR, "%s failed on this node: %r", name, error)
            raise NodeFailure(f"{name} failed on this node; the node's log has the details") \
                from None
        if isinstance(verdict, Refused):
            if verdict.spent is not None:
                return budget_refusal(msg, verdict.spent)
            return refusal(msg, verdict.rules)
        return verdict

    handler.__name__ = handler.__qualname__ = name
    return handler


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Answer with this node's stable name, which the server uses to sample reproducibly."""
    node = Node.from_node_config(context.node_config)
    return Message(RecordDict({keys.CONFIG: ConfigRecord({keys.CLIENT_NAME: node.name})}),
                   reply_to=msg)


def train_plain(request: Request) -> Message | Refused:
    """Train the received adapter on this node's rows, if its policy allows a plain update."""
    from fedtune.client.local_round import recall, remember, train_round  # see the module's note

    kept = recall(request, PLAIN)
    verdict = admit(request, secure=False, answered=kept is not None)
    if isinstance(verdict, Refused):
        return verdict
    release = kept or remember(request, PLAIN, lambda: train_round(request, verdict))
    epsilon = verdict.ledger.spent() if verdict.ledger is not None else None
    metrics = train_metrics(examples=release.examples, loss=release.loss,
                            dp=request.config.privacy.dp, secure=False, epsilon=epsilon)
    return Message(RecordDict({keys.ARRAYS: to_record(release.arrays), keys.METRICS: metrics}),
                   reply_to=request.msg)


def evaluate_held_out(request: Request) -> Message | Refused:
    """Held-out accuracy of the global adapter, where this node's policy shares it."""
    verdict = evaluation.admit_evaluation(request)
    return verdict if verdict is not None else evaluation.answer(request)


# The routing table: Flower's message type -> this node's answer.
train = app.train()(answered("train", train_plain))
secagg_keys = app.train(keys.SECAGG_KEYS)(answered(keys.SECAGG_KEYS, secagg_steps.start))
secagg_shares = app.train(keys.SECAGG_SHARES)(answered(keys.SECAGG_SHARES, secagg_steps.share))
secagg_masked = app.train(keys.SECAGG_MASKED)(answered(keys.SECAGG_MASKED, secagg_steps.mask))
secagg_consistency = app.train(keys.SECAGG_CONSISTENCY)(
    answered(keys.SECAGG_CONSISTENCY, secagg_steps.consistency))
secagg_unmask = app.train(keys.SECAGG_UNMASK)(answered(keys.SECAGG_UNMASK, secagg_steps.unmask))
evaluate_global = app.evaluate()(answered("evaluate_global", evaluate_held_out))
