"""Keys of the records between server and clients, named once (kebab-case, as Flower's)."""

ARRAYS = "arrays"  # ArrayRecord: the trainable adapter state
CONFIG = "config"  # ConfigRecord: the round's settings
METRICS = "metrics"  # MetricRecord: what a client reports

# ConfigRecord entries
SERVER_ROUND = "server-round"  # set by Flower's strategies
RUN_CONFIG = "run-config"  # the run's RunConfig as JSON: untrusted on a node, checked by its policy

# MetricRecord entries
NUM_EXAMPLES = "num-examples"  # the FedAvg weight (Flower's default weighted_by_key)
TRAIN_LOSS = "train-loss"
EVAL_LOSS = "eval-loss"
ACCURACY = "accuracy"

# Identity query: a client's stable name, independent of its Flower node id
CLIENT_NAME = "client-name"

# Privacy: a client's epsilon spent and its refusal to train past its budget
EPSILON = "epsilon"  # MetricRecord: the node's total epsilon after this round (sample level)
STATUS = "status"  # ConfigRecord entry of a train reply that carries no update
BUDGET_EXHAUSTED = "budget-exhausted"
POLICY_REFUSED = "policy-refused"  # the node's own privacy policy forbids what was asked
REASON = "reason"  # ConfigRecord entry beside a refusal: the rules it broke
UNIT_WEIGHT = "unit-weight"  # MetricRecord: 1 per client; the FedAvg weight under any DP

# Secure aggregation steps, in order: ClientApp actions (message types "train.<action>")
SECAGG_KEYS = "secagg_keys"  # 1. each client's public keys
SECAGG_SHARES = "secagg_shares"  # 2. its secrets' shares, sealed for their holders
SECAGG_MASKED = "secagg_masked"  # 3. its masked update
SECAGG_CONSISTENCY = "secagg_consistency"  # 4. its signature on the survivor set
SECAGG_UNMASK = "secagg_unmask"  # 5. the shares that remove the survivors' masks
SECAGG_STEPS = (SECAGG_KEYS, SECAGG_SHARES, SECAGG_MASKED, SECAGG_CONSISTENCY, SECAGG_UNMASK)
SECAGG_SESSION = "secagg-session"  # 16 random bytes naming one round's protocol run
MASKED = "masked"  # ArrayRecord entry: the masked ring vector
