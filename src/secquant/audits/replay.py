"""Replay check: is the noise of a DP release secret, or can anyone holding the data run it again?

A DP guarantee assumes the mechanism's noise is unknown to the attacker. If the recorded recipe and
settings (seed included) reproduce the released tensors bit for bit, an attacker who holds every record but
one replays the run with and without that record and sees which output was released: membership is
certain, whatever epsilon the ledger states. So the mechanism is run again with the recorded settings
(at least twice) and the audit fails when any replay equals the release, or the replays equal each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def released_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a released module holds (its state dict: integer codes, scales, ranges, float tensors)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Bitwise comparison of two releases: identical?, how many tensors differ, largest absolute difference."""
    if a.keys() != b.keys():
        return {"identical": False, "tensors": len(a), "differing_tensors": len(a.keys() ^ b.keys()),
                "max_abs_diff": None, "note": "the releases hold different tensors"}
    differing, worst = 0, 0.0
    for k in a:
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
            differing += 1
            if x.shape == y.shape:
                worst = max(worst, float((x.double() - y.double()).abs().max()))
    return {"identical": differing == 0, "tensors": len(a), "differing_tensors": differing, "max_abs_diff": worst}


def replay_check(replay: Callable[[], nn.Module], released: nn.Module | None = None, runs: int = 2
                 ) -> dict[str, Any]:
    """Run `replay` (the mechanism with the recorded settings) `runs` times; "fail" if any run equals
    `released` bitwise (when given: the data must then be the data it was made from) or two runs are equal."""
    if runs < 2:
        raise ValueError("a replay check needs at least 2 runs")
    outs = [released_tensors(replay()) for _ in range(runs)]
    between = [compare(outs[i], outs[j]) for i in range(runs) for j in range(i + 1, runs)]
    against = [compare(o, released_tensors(released)) for o in outs] if released is not None else []
    replayable = any(c["identical"] for c in between + against)
    res: dict[str, Any] = {
        "result": "fail" if replayable else "pass",
        "runs": runs,
        "replays_identical": any(c["identical"] for c in between),
        "identical_to_artifact": None if released is None else any(c["identical"] for c in against),
        "between_replays": between[0],
    }
    if against:
        res["against_artifact"] = against[0]
    res["meaning"] = ("replayable: the noise is not secret (the recorded settings reproduce the release)"
                      if replayable else "each replay with the recorded settings released different tensors: "
                                         "the noise is drawn afresh")
    return res
