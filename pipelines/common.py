"""What every entry point shares: the config arguments (--preset, --config, KEY=VALUE) and their errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from retain_asd.config import Config, ConfigError, list_presets, load_config


def add_config_args(p: argparse.ArgumentParser, default_preset: str | None = None) -> None:
    default = f" (default: {default_preset})" if default_preset else ""
    p.add_argument("--preset", default=default_preset, help=f"named config: {', '.join(list_presets())}{default}")
    p.add_argument("--config", help="YAML config merged over the preset (e.g. the config.yaml of an earlier run)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=3e-4")


def config_from_args(args: argparse.Namespace, prog: str, first: Sequence[str] = ()) -> Config | None:
    """The resolved config, or None after printing the error (the caller returns exit code 2)."""
    try:
        return load_config(args.preset, args.config, [*first, *args.overrides])
    except ConfigError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return None
