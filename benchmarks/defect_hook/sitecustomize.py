"""A deliberate privacy defect for benchmarks/audit.py, never for real runs: with this folder on
PYTHONPATH and FEDTUNE_INJECT_DEFECT=no-noise, every process (Ray's workers too) that imports
client.dp_sgd gets a train_private that drops the DP-SGD noise while the ledger is still charged
for the planned noise. The audit must then report a bound above the ledger's epsilon.
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.machinery
import os
import sys

TARGET = "fedtune.client.dp_sgd"


def _without_noise(module) -> None:
    original = module.train_private

    def train_private(model, loader, optimizer, plan, **kwargs):
        silent = dataclasses.replace(plan, event=dataclasses.replace(plan.event,
                                                                     noise_multiplier=0.0))
        return original(model, loader, optimizer, silent, **kwargs)

    module.train_private = train_private


class _Patch(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        self.inner = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _without_noise(module)


if os.environ.get("FEDTUNE_INJECT_DEFECT") == "no-noise":
    sys.meta_path.insert(0, _Patch())
