"""What extending a DP-SGD run costs a node that trains every round: the ledger's epsilon after
the planned rounds, and after the run is extended (the extra rounds are planned with the longer
horizon's noise, as a resumed run plans them), so a node's budget can be set to allow it.

    python -m benchmarks.extension_cost [--quick]
"""

from __future__ import annotations

import argparse
import json
import warnings


def spent(epsilon: float, rounds: int, extra: int, rows: int) -> dict[str, float]:
    """Epsilon of `rounds` rounds planned for them, then of `extra` more planned for the total."""
    from fedtune.client.dp_plan import plan_round
    from fedtune.client.policy import NodePolicy
    from fedtune.common.config import RunConfig
    from fedtune.common.privacy import epsilon_spent

    delta = NodePolicy(budget_epsilon=2 * epsilon).delta  # a deployed node's, not its rows'
    run = RunConfig.from_mapping({"privacy.dp": True, "privacy.epsilon": epsilon,
                                  "federation.rounds": rounds})
    planned = [plan_round(run, rows, delta, "prv").event] * rounds
    extended = run.with_overrides({"federation.rounds": rounds + extra})
    more = [plan_round(extended, rows, delta, "prv").event] * extra
    return {"planned": epsilon_spent(planned, delta, "prv"),
            "extended": epsilon_spent(planned + more, delta, "prv")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    cases = [(8.0, rounds, extra, rows) for rows in ((40,) if args.quick else (40, 1000))
             for rounds in (1, 2, 5) for extra in sorted({1, rounds})]
    results = [{"epsilon": e, "rounds": r, "extra_rounds": x, "rows": n, **spent(e, r, x, n)}
               for e, r, x, n in cases]
    from benchmarks.record import save

    save("extension_cost", {"accountant": "prv", "delta": "the node policy's default",
                            "results": results}, quick=args.quick)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
