"""What every entry point shares: the config arguments (--preset, --config, KEY=VALUE) and their errors."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

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
        if debugging():
            raise
        print(f"{prog}: {err}", file=sys.stderr)
        return None


# ---------------------------------------------------------------------------------------------------- errors
DEBUG_HINT = "(run again with --debug for the traceback)"


def debugging() -> bool:
    """--debug was given (run_main sets RETAIN_ASD_DEBUG=1): errors show their traceback."""
    import os

    return os.environ.get("RETAIN_ASD_DEBUG") == "1"


def fail(prog: str, err: BaseException, code: int = 2) -> int:
    """Inside an ``except`` block: print ``prog: err`` on one line and return `code`; with --debug raise it
    again, so the traceback shows (every command, the same way)."""
    if debugging():
        raise err
    print(f"{prog}: {' '.join(str(err).split())}", file=sys.stderr)
    return code


def user_error(err: BaseException) -> BaseException | None:
    """The user error inside ``err`` (itself, its cause, or one a Ray worker raised), else None.

    User errors are wrong input and files (ValueError: ConfigError, CorruptFileError, AudioError, ...; OSError:
    missing or unreadable paths; a bad BEATs checkpoint): one line is enough. Anything else is a bug and keeps
    its traceback.
    """
    from retain_asd.models.beats import BEATsCheckpointError

    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        inner = getattr(e, "cause", None)  # RayTaskError: the worker's own exception, without the remote traceback
        if isinstance(inner, BaseException):
            todo.insert(0, inner)
            continue
        if isinstance(e, ValueError | OSError | BEATsCheckpointError):
            return e
        todo.append(e.__cause__)  # `raise ... from err`
        todo += list((getattr(e, "worker_failures", None) or {}).values())  # Ray Train worker-group errors
    return None


def report_user_error(prog: str, err: BaseException) -> int:
    """An entry point's own handling of ``err``: a user error is one line plus the --debug hint (exit code 2);
    with --debug / RETAIN_ASD_DEBUG=1, or for anything that is not a user error, it is raised again."""
    import os

    found = user_error(err)
    if found is None or os.environ.get("RETAIN_ASD_DEBUG") == "1":
        raise err
    message = " ".join(str(found).split()) or type(found).__name__
    print(f"{prog}: error: {message}\n{DEBUG_HINT}", file=sys.stderr)
    return 2


def run_main(main, argv: Sequence[str] | None = None, prog: str = "retain-asd") -> int:
    """Run an entry point's ``main(argv)``: a user error is one line on stderr and exit code 2 (``--debug``
    anywhere in argv, or RETAIN_ASD_DEBUG=1, shows the traceback instead); the embedded Ray the command
    started is stopped and its session folder cleaned."""
    import os

    from retain_asd.runtime import finish_local_ray

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("RETAIN_ASD_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    debug_before = os.environ.get("RETAIN_ASD_DEBUG")
    if debug:  # entry points that report their own user errors (report_user_error) re-raise them too
        os.environ["RETAIN_ASD_DEBUG"] = "1"
    ray = sys.modules.get("ray")
    ray_before = ray is not None and ray.is_initialized()  # a caller's Ray (tests, a notebook) is left alone
    code = 1
    try:
        code = int(main(argv) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        code = 130
    except Exception as err:
        found = user_error(err)
        if debug or found is None:
            raise
        message = " ".join(str(found).split()) or type(found).__name__
        print(f"{prog}: error: {message}\n{DEBUG_HINT}", file=sys.stderr)
        code = 2
    finally:
        if debug_before is None:
            os.environ.pop("RETAIN_ASD_DEBUG", None)
        else:
            os.environ["RETAIN_ASD_DEBUG"] = debug_before
        # A user error (exit code 2) is said in one line: its Ray logs explain nothing more, so they go too.
        note = None if ray_before else finish_local_ray(ok=code in (0, 2))
        if note:
            print(note, file=sys.stderr)
    return code


# ---------------------------------------------------------------------------------------------------- console
@contextlib.contextmanager
def quiet_run(log_path, verbose: bool = False, *, address: str | None = None, start_ray: bool = True):
    """The console of a long command: one `Console` for its own lines; Ray's and MLflow's logs, warnings and
    progress of Ray Data go to `log_path` unless `verbose`. Starts Ray (quiet) when `start_ray`, and stops the
    embedded Ray it started inside the block, so its shutdown messages go to the log too."""
    import ray

    from retain_asd.runtime import finish_local_ray, init_ray, limit_torch_threads, quiet_console, set_data_progress

    limit_torch_threads()
    ray_before = ray.is_initialized()  # a caller's Ray (tests, a notebook) is left running
    with quiet_console(None if verbose else log_path, verbose) as console:
        if not verbose:
            console.say(f"logs of Ray and MLflow: {log_path}  (--verbose: on the console)")
        ok = False
        try:
            if start_ray:
                init_ray(address, quiet=not verbose)
                set_data_progress(verbose)
            yield console
            ok = True
        except Exception as err:
            ok = user_error(err) is not None  # one line says it all (run_main): no logs to keep
            raise
        finally:
            if start_ray and not ray_before:
                finish_local_ray(ok=ok)


def protocol_guard(cfg: Config, prog: str) -> bool:
    """The leakage guard of an entry point, before any Ray work (paper Sec. 4.1: two non-overlapping corpora).

    Compares the raw pre-training corpus (data.*) with the evaluation corpus (eval.*) by content hash. False
    after printing the error (the overlapping files and the fix; the caller returns exit code 2).
    """
    from retain_asd.corpus.ingest import check_protocol
    from retain_asd.corpus.protocol import CorpusOverlapError

    try:
        report = check_protocol(cfg)
    except CorpusOverlapError as err:
        if debugging():
            raise
        print(f"{prog}: {err}", file=sys.stderr)
        return False
    if report:
        print(f"{prog}: data.add_eval_references: true: pre-training adds the evaluation references and noise on "
              f"purpose (Table 5, '+ eval-reference data'); {report.describe(limit=1)}", file=sys.stderr)
    return True


# ---------------------------------------------------------------------------------------------------- analyses
def run_analysis(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None, build) -> int:
    """The main() of an analysis command (`table3`, `layers`): the config, its --checkpoint values resolved
    (`retain_asd.experiments.resolve_checkpoints`), then `build(cfg, checkpoints, args) -> (table text, paths)`;
    prints the table and the files written. A bad checkpoint, layer or tree is one line (exit code 2). Ray's and
    MLflow's own logs go to <out>/<command>.log (--verbose: on the console), as for the long commands."""
    import logging

    name = prog.split()[-1]
    parser.add_argument("--verbose", action="store_true", help="Ray's and MLflow's own logs and warnings on the "
                        f"console (default: in <out>/{name}.log)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    cfg = config_from_args(args, prog)
    if cfg is None:
        return 2
    from retain_asd.experiments import resolve_checkpoints

    try:
        with quiet_run(Path(args.out) / f"{name}.log", args.verbose, start_ray=False):
            text, paths = build(cfg, resolve_checkpoints(cfg, args.checkpoint, args.out), args)
    except Exception as err:  # one line (--debug for the traceback)
        return report_user_error(prog, err)
    print(text)
    print("written: " + ", ".join(str(p) for p in paths))
    return 0
