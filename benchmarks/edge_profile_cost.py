"""What the edge profile costs: the default fit and predict against the same without it.

    python benchmarks/edge_profile_cost.py [--data ../shared/datasets/mvtec_ad/bottle]
                                           [--images 40] [--json out.json]

One process fits without the profile (``scoring.edge_correction=false``), then the default, then
without it again, each on every training image, and predicts ``--images`` test images one at a
time from their files (as `half_scale_cost.py`, whose loop it shares). The profile is learned
from the leave-one-out patch scores of up to 96 images per bank and applied as one elementwise
rescaling of the patch grid, so the fit should pay about a second and predict nothing.
"""

from __future__ import annotations

from half_scale_cost import compare
from timing_data import parse_timing_args

NO_PROFILE = ["detector.scoring.edge_correction=false"]
RUNS = [("no_profile", NO_PROFILE), ("default", []), ("no_profile", NO_PROFILE)]


def main() -> None:
    args, train, tests = parse_timing_args(__doc__.splitlines()[0], images=40)
    compare(args, train, tests, RUNS, "benchmarks/edge_profile_cost.py")


if __name__ == "__main__":
    main()
