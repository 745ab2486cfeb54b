"""`retain-asd synth`: write the synthetic machine + noise corpus (DCASE-2023-style tree, noise folders).

Deterministic by seed; a tree already written with the same arguments is reused (use --force to rewrite).
"""

from __future__ import annotations

import argparse
import sys

from retain_asd.corpus.synth import MACHINES, write_synthetic_corpus


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain-asd synth", description=__doc__)
    p.add_argument("--out", default="runs/data/synth", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--machines", nargs="+", default=["fan", "pump", "gearbox"], choices=sorted(MACHINES))
    p.add_argument("--test-per-domain", type=int, default=6, help="normal (and anomalous) test clips per domain")
    p.add_argument("--force", action="store_true", help="rewrite even when an identical tree exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    corpus = write_synthetic_corpus(args.out, seed=args.seed, machines=args.machines,
                                    test_per_domain=args.test_per_domain, force=args.force)
    print(f"machines: {corpus.machine_root}\nnoise:    {corpus.noise_root}")
    return 0


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main, prog="retain-asd synth"))
