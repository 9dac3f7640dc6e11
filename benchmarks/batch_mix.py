"""Year counts of every global batch at TiC-xlarge shape, simulated from the sampler's own layout.

tic_xlarge's last cumulative-exp step (the new year and a buffer of D/2, D/4, ... of the six
older years) on 256 streams (32 ranks x 8 workers), global batch 90112: for each optimizer step,
each year's count in the global batch against weight x 90112. Printed for the sampler as it is
(every stream starts the cycle at its own rotation) and for the same cycle without rotations
(every stream at the same slot: the order before the rotations), for micro-batch 352 (8
accumulation steps: the workers divide them) and 256 (11: they do not).

    python benchmarks/batch_mix.py [--steps 300]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import load_config  # noqa: E402
from trainer.data.rehearsal import RehearsalSampler, _Layout  # noqa: E402
from trainer.data.shards import YearShards  # noqa: E402
from trainer.plan import apportion, make_plan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
YEARS = [str(y) for y in range(2014, 2023)]  # TiC-DataComp: 2014-2016 first, then 6 more steps


def last_step_weights() -> dict[str, int]:
    cfg = load_config(REPO / "configs" / "tic_xlarge.yaml", ["plan.strategy=cumulative-exp"])
    plan = make_plan(cfg, {y: 10**9 for y in YEARS})
    return dict(plan.steps[-1].quotas)


def window_counts(lay: _Layout, s: int, start: int, stop: int, rotate: bool) -> np.ndarray:
    if rotate:
        return lay.counts(s, stop) - lay.counts(s, start)
    return np.bincount(lay.cycle[start:stop], minlength=len(lay.base))


def simulate(weights: dict[str, int], steps: int, world: int, workers: int, micro: int) -> dict[str, float]:
    global_batch = 90112
    accum = global_batch // (micro * world)
    streams = world * workers
    # The trainer needs whole micro-batches per stream: steps x accum a multiple of the workers.
    steps -= steps % (workers // np.gcd(accum, workers))
    quotas = apportion(steps * global_batch, weights, multiple=streams)
    years = {y: YearShards("mem/", ["0.tar"], np.array([10**9])) for y in quotas}
    sampler = RehearsalSampler(years, quotas, seed=0, world=world, workers=workers, micro=micro, accum=accum)
    lay = sampler._layout
    share = np.array([quotas[y] for y in sampler.names]) / sum(quotas.values()) * global_batch
    out = {}
    for rotate in (True, False):
        worst = 0.0
        for t in range(steps):
            counts = np.zeros(len(share))
            for rank in range(world):
                batches = range(t * accum, (t + 1) * accum)
                for w in range(workers):
                    mine = [b // workers for b in batches if b % workers == w]
                    if mine:
                        s = rank * workers + w
                        counts += window_counts(lay, s, mine[0] * micro, (mine[-1] + 1) * micro, rotate)
            worst = max(worst, float(np.abs(counts - share).max()))
        out["rotated" if rotate else "unrotated"] = worst
    # Independent draws at the same weights: one standard deviation of the largest year's count.
    out["iid_sd"] = float(np.sqrt(share * (1 - share / global_batch)).max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    weights = last_step_weights()
    total = sum(weights.values())
    print(
        "last cumulative-exp step, samples per global batch of 90112:",
        {y: round(q / total * 90112, 1) for y, q in weights.items()},
    )
    print("| streams | micro x accum | max |count - weight x batch|, rotated | same, unrotated | i.i.d. 1 sd |")
    print("| --- | --- | --- | --- | --- |")
    for micro in (352, 256):
        got = simulate(weights, args.steps, 32, 8, micro)
        accum = 90112 // (micro * 32)
        print(
            f"| 32 ranks x 8 workers | {micro} x {accum} | {got['rotated']:.2f} | "
            f"{got['unrotated']:.2f} | {got['iid_sd']:.1f} |"
        )


if __name__ == "__main__":
    main()
