"""How far one malicious client moves secure aggregation's average from inside its masks, with
the decoded sum checked against what honest inputs allow (common/secagg/summation.py):
weighted by examples (no DP) against unit weights (under any DP), default and tight norm.

    python -m benchmarks.secagg_influence [--quick]

Nine honest clients of 2,000 examples send changes drawn N(0, 0.003) per value (synthetic: the
figures that pass the check scale with the bounds, not with this); the tenth sends ring values
of its choosing. Masks cancel exactly (tests/server/test_secagg_protocol.py), so the decoded sum
is the sum of the encodings, computed here directly. Each figure is the largest move of one
value, and the L2 move, of the average from the nine honest clients' own average.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from fedtune.common.secagg.summation import ImpossibleSum, Summation

CLIENTS, HONEST_EXAMPLES, HONEST_STD = 10, 2_000, 0.003
MINILM_ADAPTER = 77_581  # values in the embedded MiniLM's adapter


def attacks(summation: Summation, honest_weight: float, length: int) -> dict[str, np.ndarray]:
    """Real values (before the ring) a malicious client can send; the ring holds |x| <= n."""
    bound, total = summation.bound, honest_weight + 1.0
    weight = 1.0  # the most an honest client weighs (its in-format claim)
    share = weight if summation.weighted else 0.0  # the example share it sends
    tiny = -honest_weight + 1e-4  # the weight cancelled, as in the construction
    edge = 0.99 * bound * total  # the largest per-value push the check lets through
    spread = min(edge, 0.9 * summation.norm * total / np.sqrt(length))  # ... and in L2
    return {
        "tiny-weight-huge-values": np.r_[np.full(length, 3.0), tiny, tiny, 0.0],
        "huge-values": np.r_[np.full(length, 9.0), weight, share, 0.0],
        "in-format-full-weight": np.r_[np.full(length, bound), weight, share, 0.0],
        "at-the-check's-edge": np.r_[np.full(length, edge), weight, share, 0.0],
        "norm-at-the-edge": np.r_[np.full(length, spread), weight, share, 0.0],
    }


def ring(summation: Summation, values: np.ndarray) -> np.ndarray:
    scaled = np.round(values * summation.encoding.scale).astype(np.int64)
    return (scaled % 2**32).astype(np.uint32)


def outcomes(summation: Summation, length: int, seed: int = 0) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    encoding, like = summation.encoding, {"a": np.zeros(length)}
    changes = [rng.normal(0.0, HONEST_STD, size=length) for _ in range(CLIENTS - 1)]
    honest = sum(encoding.encode(summation.to_vector({"a": c}, HONEST_EXAMPLES, 0.5), rng)
                 for c in changes)
    plain = sum(changes) / len(changes)  # the honest clients' own average
    weight = (CLIENTS - 1) * (HONEST_EXAMPLES / summation.max_examples if summation.weighted
                              else 1.0)
    result: dict[str, object] = {}
    for name, values in attacks(summation, weight, length).items():
        total = encoding.decode((honest + ring(summation, values)).astype(np.uint32))
        try:
            change, _ = summation.average(total, like, CLIENTS)
        except ImpossibleSum as error:
            result[name] = {"dropped": True, "why": str(error).split(": ", 1)[1]}
            continue
        moved = change["a"] - plain
        result[name] = {"dropped": False, "largest_move": float(np.abs(moved).max()),
                        "l2_move": float(np.linalg.norm(moved))}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 values")
    args = parser.parse_args()
    length = 1_000 if args.quick else MINILM_ADAPTER
    honest_norm = HONEST_STD * np.sqrt(length)
    cases = {}
    for weighted in (True, False):
        for norm_label, norm in (("default max_update_norm 1000", 1000.0),
                                 ("max_update_norm 2 x honest norm", 2 * honest_norm)):
            summation = Summation(CLIENTS, bound=1.0, max_examples=100_000, weighted=weighted,
                                  norm=norm)
            label = f"{'example-weighted' if weighted else 'unit weights'}, {norm_label}"
            cases[label] = outcomes(summation, length)
            print(label, json.dumps(cases[label]), flush=True)
    from benchmarks.record import save

    save("secagg_influence", {"clients": CLIENTS, "values": length, "bound": 1.0,
                              "honest_std": HONEST_STD, "honest_norm": honest_norm,
                              "cases": cases}, quick=args.quick)


if __name__ == "__main__":
    main()
