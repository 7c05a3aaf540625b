"""Keys of the records between server and clients, named once (kebab-case, as Flower's)."""

ARRAYS = "arrays"  # ArrayRecord: the trainable adapter state
CONFIG = "config"  # ConfigRecord: the round's settings
METRICS = "metrics"  # MetricRecord: what a client reports

# ConfigRecord entries
SERVER_ROUND = "server-round"  # set by Flower's strategies
RUN_CONFIG = "run-config"  # the run's RunConfig as JSON: clients train exactly as the server says

# MetricRecord entries
NUM_EXAMPLES = "num-examples"  # the FedAvg weight (Flower's default weighted_by_key)
TRAIN_LOSS = "train-loss"
EVAL_LOSS = "eval-loss"
ACCURACY = "accuracy"
STEPS = "steps"

# Identity query: a client's stable name, independent of its Flower node id
CLIENT_NAME = "client-name"
