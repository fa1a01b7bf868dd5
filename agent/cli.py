"""`lineside-agent`: check a config, run the daemon, inspect images, predict a batch, or benchmark a bundle.

Exit codes: 0 success; 1 runtime failure (bundle, engine, source, store); 2 usage error (argparse);
3 some images could not be inspected (inspect/predict; their error results are still written);
78 invalid configuration (EX_CONFIG, so systemd does not restart-loop on it); 128+N (143, 130) a second
SIGTERM/SIGINT during the stop, which exits at once.

stdout carries results only (`inspect`, a jsonl sink on '-'); everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lineside.agent.config import AgentConfig, load_config
from lineside.agent.errors import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_IMAGE_ERRORS,
    EXIT_OK,
    BundleError,
    ConfigError,
    InferenceError,
    LinesideError,
)

if TYPE_CHECKING:
    from lineside.agent.inference.engine import InferenceEngine

logger = logging.getLogger(__name__)


# syslog priorities, which journald reads from a "<N>" prefix on each line of a service's stderr.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """`<N>` before every line (tracebacks included), so journald keeps each line's priority."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 3 if record.levelno > logging.ERROR else 6)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).split("\n"))


def stderr_is_journal() -> bool:
    """True when stderr is the journal stream systemd connected (`$JOURNAL_STREAM` = its device:inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def configure_logging(level: str = "INFO") -> None:
    """Log to stderr. Under systemd no timestamps (journald adds its own); on the journal stream, `<N>`
    priority prefixes instead of level names, so `journalctl -p warning` finds the problems."""
    under_systemd = bool(os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM"))
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        fmt = "%(levelname)s %(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(fmt if under_systemd else "%(asctime)s " + fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _print_problems(message: str, problems: list[str]) -> None:
    print(f"error: {message}", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)


def _config_or_none(path: Path) -> AgentConfig | None:
    """The validated config, or None after printing every schema problem with its key."""
    try:
        return load_config(path)
    except ConfigError as err:
        _print_problems(str(err), err.problems)
        return None


def _summary(config: AgentConfig) -> str:
    source = config.source
    where = getattr(source, "path", None) or getattr(source, "uri", "")
    sinks = ", ".join(s.kind for s in config.sinks) or "none"
    return (
        f"station {config.station}: {source.kind} source {where}, bundle {config.bundle.path}, "
        f"providers {','.join(config.inference.providers)}, queue {config.queue.capacity} "
        f"{config.queue_policy()}, sinks {sinks}"
    )


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a config file, then the paths it names on this machine; print every problem with its key path.

    A file with errors exits 78. Path problems (a bundle not copied yet, a hot folder not made yet) are
    warnings, so a sample copied to a machine still validates; `--strict` makes them errors, as before
    starting the service (install.sh does that).
    """
    config = _config_or_none(args.file)
    if config is None:
        return EXIT_CONFIG
    problems = [] if args.no_paths else config.problems()
    if problems and args.strict:
        _print_problems(f"{args.file}: {len(problems)} problem(s) with the paths it names", problems)
        return EXIT_CONFIG
    if problems:
        print(
            f"warning: {args.file}: {len(problems)} path(s) not usable on this machine yet "
            "(run as the service user with --strict before starting the service):",
            file=sys.stderr,
        )
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
    print(f"ok: {_summary(config)}" + (f" ({len(problems)} path warning(s))" if problems else ""))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT (or until a finite source is exhausted)."""
    from lineside.agent.runtime import Agent

    config = _config_or_none(args.config)  # run reports path problems as it meets them
    if config is None:
        return EXIT_CONFIG
    configure_logging(args.log_level or config.log_level)
    logger.info("starting: %s", _summary(config))
    _tell_systemd(f"STATUS=loading and verifying bundle {config.bundle.path}", enabled=config.notify.enabled)
    return Agent(config).run()


def _tell_systemd(message: str, *, enabled: bool) -> None:
    """One sd_notify message when systemd listens (before the notify service exists: bundle loading)."""
    from lineside.agent.services.notify import Notifier

    notifier = Notifier.from_environment() if enabled else None
    if notifier is not None:
        notifier.send(message)
        notifier.close()


def _providers(text: str | None) -> list[str] | None:
    return [p.strip() for p in text.split(",") if p.strip()] if text else None


def _engine_for_command(args: argparse.Namespace) -> InferenceEngine | None:
    """The engine for `inspect`/`predict`, or None after printing why it could not load."""
    from lineside.agent.inference.engine import InferenceEngine

    try:
        return InferenceEngine.load(args.bundle, providers=_providers(args.providers))
    except (BundleError, InferenceError) as err:
        print(f"error: cannot load bundle {args.bundle}: {err}", file=sys.stderr)
        return None


def cmd_inspect(args: argparse.Namespace) -> int:
    """Inspect image files; one JSON result per image on stdout."""
    from lineside.agent.batch import inspect_files
    from lineside.agent.sinks.annotate import AnnotateSink
    from lineside.agent.sinks.base import Sink
    from lineside.agent.sinks.jsonl import JsonlSink

    configure_logging(args.log_level or "WARNING")
    engine = _engine_for_command(args)
    if engine is None:
        return EXIT_FAILURE
    sinks: list[Sink] = [JsonlSink("-")] + ([AnnotateSink(args.annotate)] if args.annotate else [])
    try:
        errors = inspect_files(engine, [Path(p) for p in args.images], sinks)
    finally:
        for sink in sinks:
            sink.close()
        engine.close()
    return EXIT_IMAGE_ERRORS if errors else EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    """Batch prediction from a folder or S3 prefix into a folder or S3 prefix."""
    from lineside.agent.batch import predict_batch
    from lineside.agent.storage import is_s3_error, open_store

    configure_logging(args.log_level or "INFO")
    engine = _engine_for_command(args)
    if engine is None:
        return EXIT_FAILURE
    try:
        _, errors = predict_batch(
            engine, open_store(args.input), open_store(args.output), annotate=not args.no_annotate
        )
    except (LinesideError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as err:
        if is_s3_error(err):
            print(f"error: S3: {err}", file=sys.stderr)
            return EXIT_FAILURE
        raise
    finally:
        engine.close()
    return EXIT_IMAGE_ERRORS if errors else EXIT_OK


def _counts(text: str) -> list[int]:
    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected thread counts like 1,2,4; got {text!r}") from err
    if not counts or min(counts) < 0:
        raise argparse.ArgumentTypeError(f"expected thread counts like 1,2,4 (0 = auto); got {text!r}")
    return counts


def cmd_bench(args: argparse.Namespace) -> int:
    """Latency and throughput of a bundle here, against a bare ONNX Runtime loop (lineside.agent.bench)."""
    import json

    from lineside.agent.bench import BenchOptions, format_report, run_bench
    from lineside.agent.inference.settings import SessionSettings

    configure_logging(args.log_level or "WARNING")
    threads = args.threads or [0]
    opts = BenchOptions(
        bundle=args.bundle,
        images=args.images,
        frames=args.frames,
        warmup=args.warmup,
        rounds=args.rounds,
        providers=_providers(args.providers) or ["cpu"],
        settings=SessionSettings(
            intra_op_threads=threads[0],
            allow_spinning=args.allow_spinning,
            graph_optimization=args.graph_optimization,
        ),
        skip_unneeded_models=not args.run_all_models,
        thread_counts=threads if len(threads) > 1 else [],
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    try:
        report = run_bench(opts)
    except (BundleError, InferenceError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    report["command"] = " ".join(["lineside-agent", *(args.argv or [])])
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its subcommands."""
    parser = argparse.ArgumentParser(prog="lineside-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="Override the log level.")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check-config", help="Validate a config file and exit (78 when invalid).")
    check.add_argument("file", type=Path, help="YAML config file.")
    check.add_argument(
        "--no-paths", action="store_true", help="Check the file only, not the folders and files it names."
    )
    check.add_argument(
        "--strict",
        action="store_true",
        help="Paths that are missing or not usable by this user are errors (exit 78), not warnings.",
    )
    check.set_defaults(func=cmd_check_config)

    run = sub.add_parser("run", help="Run the inspection daemon.")
    run.add_argument("--config", type=Path, required=True, help="YAML config file.")
    run.set_defaults(func=cmd_run)

    inspect = sub.add_parser("inspect", help="Inspect image files; one JSON result per line on stdout.")
    inspect.add_argument("--bundle", type=Path, required=True, help="Model bundle folder or .tar.gz.")
    inspect.add_argument("--annotate", type=Path, help="Also write annotated JPEGs into this folder.")
    inspect.add_argument("--providers", help="Comma-separated providers in order, e.g. cuda,cpu.")
    inspect.add_argument("images", nargs="+", help="Image files (PNG, TIFF, JPEG).")
    inspect.set_defaults(func=cmd_inspect)

    predict = sub.add_parser("predict", help="Batch prediction: results.jsonl + annotated images.")
    predict.add_argument("--bundle", type=Path, required=True, help="Model bundle folder or .tar.gz.")
    predict.add_argument("--input", required=True, help="Folder or s3://bucket/prefix of images.")
    predict.add_argument("--output", required=True, help="Folder or s3://bucket/prefix for the outputs.")
    predict.add_argument("--providers", help="Comma-separated providers in order, e.g. cuda,cpu.")
    predict.add_argument("--no-annotate", action="store_true", help="Skip the annotated images.")
    predict.set_defaults(func=cmd_predict)

    bench = sub.add_parser("bench", help="Per-stage latency, frames/s and memory of a bundle vs bare ONNX Runtime.")
    bench.add_argument("--bundle", type=Path, required=True, help="Model bundle folder or .tar.gz.")
    bench.add_argument(
        "--images",
        type=Path,
        help="Folder of images (*.png, *.tif), recursive; default: golden images tiled to 768x572.",
    )
    bench.add_argument("--frames", type=int, default=100, help="Frames per measurement (default 100).")
    bench.add_argument("--warmup", type=int, default=5, help="Warm-up frames, not measured (default 5).")
    bench.add_argument("--rounds", type=int, default=6, help="Alternating pipeline/bare rounds (default 6).")
    bench.add_argument("--providers", help="Comma-separated providers in order (default cpu), e.g. cuda,cpu.")
    bench.add_argument(
        "--threads",
        type=_counts,
        help="Intra-op threads (0 = auto); several (e.g. 1,2,4) also compare predict() across them, interleaved.",
    )
    bench.add_argument("--allow-spinning", action="store_true", help="Let idle ONNX Runtime threads busy-wait.")
    bench.add_argument(
        "--graph-optimization", choices=["disable", "basic", "extended", "all"], default="all", help="Default all."
    )
    bench.add_argument(
        "--run-all-models", action="store_true", help="Run every model on every frame (skip_unneeded_models off)."
    )
    bench.add_argument("--json", type=Path, help="Also write the figures as JSON here.")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `lineside-agent`; returns the process exit code."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
