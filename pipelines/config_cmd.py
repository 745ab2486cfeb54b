"""`retain-asd config show [PRESET | --preset PRESET] [--config FILE] [KEY=VALUE ...]` and `retain-asd config list`."""

from __future__ import annotations

import argparse
import sys

from pipelines.common import fail
from retain_asd.config import ConfigError, list_presets, load_config, to_yaml


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain-asd config", description=__doc__)
    sub = p.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="print a resolved config as YAML")
    show.add_argument("preset", nargs="?", help=f"one of: {', '.join(list_presets())}")
    show.add_argument("--preset", dest="preset_option", metavar="PRESET",
                      help="the same, as every other command takes it")
    show.add_argument("--config", help="a YAML file merged over the preset")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.lr=3e-4")
    sub.add_parser("list", help="list the presets")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.action == "list":
        print("\n".join(list_presets()))
        return 0
    preset, overrides = args.preset, list(args.overrides)
    if preset is not None and "=" in preset:  # `config show train.lr=1` without a preset
        preset, overrides = None, [preset, *overrides]
    if args.preset_option is not None:
        if preset is not None:
            parser.error(f"two presets: {preset!r} and --preset {args.preset_option!r}; give one")
        preset = args.preset_option
    try:
        print(to_yaml(load_config(preset, args.config, overrides)), end="")
    except ConfigError as err:
        return fail("retain-asd config", err)
    return 0


if __name__ == "__main__":
    from pipelines.common import run_main

    sys.exit(run_main(main, prog="retain-asd config"))
