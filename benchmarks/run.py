"""Run every benchmark in turn: `python -m benchmarks.run [--quick]`.

`--quick` shrinks each to a smoke run (results go to `*-quick.json`, never over the real figures);
CI runs it so no benchmark rots.
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ("benchmarks.dp_overhead", "benchmarks.secagg_cost", "benchmarks.communication",
              "benchmarks.throughput", "benchmarks.scale", "benchmarks.utility",
              "benchmarks.audit")


def main() -> int:
    extra = sys.argv[1:]
    for module in BENCHMARKS:
        print(f"== {module} {' '.join(extra)}", flush=True)
        done = subprocess.run([sys.executable, "-m", module, *extra], check=False)
        if done.returncode != 0:
            print(f"{module} failed with exit code {done.returncode}", file=sys.stderr)
            return done.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
