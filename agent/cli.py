"""`lineside-agent`: check a config, run the daemon, inspect images, or predict a batch.

Exit codes: 0 success; 1 runtime failure (bundle, engine, source, store); 2 usage error (argparse);
3 some images could not be inspected (inspect/predict; their error results are still written);
78 invalid configuration (EX_CONFIG, so systemd does not restart-loop on it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

from lineside.agent.config import EXIT_CONFIG, AgentConfig, load_config
from lineside.agent.errors import BundleError, ConfigError, InferenceError, LinesideError, SourceError
from lineside.agent.imaging import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES
from lineside.agent.results import Frame, FrameError
from lineside.agent.sources.base import error_frame, frame_from_bytes

if TYPE_CHECKING:
    from lineside.agent.inference.engine import InferenceEngine
    from lineside.agent.pipeline import Inspector

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_IMAGE_ERRORS = 3  # not 2: argparse already exits 2 on a usage error


def configure_logging(level: str = "INFO") -> None:
    """Log to stderr; no timestamps under systemd, where journald adds its own."""
    under_systemd = bool(os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not under_systemd:
        fmt = "%(asctime)s " + fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _print_config_problems(err: ConfigError) -> None:
    print(f"error: {err}", file=sys.stderr)
    for problem in err.problems:
        print(f"  {problem}", file=sys.stderr)


def _summary(config: AgentConfig) -> str:
    source = config.source
    where = getattr(source, "path", None) or getattr(source, "uri", "")
    sinks = ", ".join(s.kind for s in config.sinks) or "none"
    return (
        f"station {config.station}: {source.kind} source {where}, bundle {config.bundle.path}, "
        f"providers {','.join(config.inference.providers)}, queue {config.queue.capacity} "
        f"{config.queue_policy()}, sinks {sinks}"
    )


def _load_engine(bundle: Path, **kwargs: Any) -> InferenceEngine:
    # Imported here: onnxruntime is heavy, and check-config must work without it.
    from lineside.agent.inference.engine import InferenceEngine

    return InferenceEngine.load(bundle, **kwargs)


# -- check-config ---------------------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a config file; print every problem with its key path."""
    try:
        config = load_config(args.file)
    except ConfigError as err:
        _print_config_problems(err)
        return EXIT_CONFIG
    print(f"ok: {_summary(config)}")
    return EXIT_OK


# -- run ------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT (or until a finite source is exhausted)."""
    from lineside.agent.pipeline import Pipeline
    from lineside.agent.sinks import create_sink
    from lineside.agent.sources import create_source

    try:
        config = load_config(args.config)
    except ConfigError as err:
        _print_config_problems(err)
        return EXIT_CONFIG
    configure_logging(args.log_level or config.log_level)
    logger.info("starting: %s", _summary(config))
    try:
        engine = _load_engine(
            config.bundle.path,
            providers=list(config.inference.providers),
            device_id=config.inference.device_id,
            require_gpu=config.inference.require_gpu,
            trt_cache_dir=config.inference.trt_cache_dir,
            trt_fp16=config.inference.trt_fp16,
            verify_golden=config.inference.verify_golden,
        )
    except (BundleError, InferenceError) as err:
        logger.error("cannot serve bundle %s: %s", config.bundle.path, err)
        return EXIT_FAILURE

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    pipeline = None
    try:
        source = create_source(config.source)
        sinks = [create_sink(sink_config) for sink_config in config.sinks]
        pipeline = Pipeline(source, engine, sinks, config.queue, policy=config.queue_policy(), stop_event=stop)
        pipeline.start()
        while not stop.is_set() and not pipeline.finished:
            stop.wait(0.5)
    except (SourceError, OSError) as err:
        logger.error("cannot run the pipeline: %s", err)
        return EXIT_FAILURE
    finally:
        if pipeline is not None:
            pipeline.stop()
            logger.info("stopped; counters: %s", json.dumps(pipeline.stats(), sort_keys=True))
        engine.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK if pipeline is None or pipeline.failure is None else EXIT_FAILURE


# -- inspect / predict ----------------------------------------------------------------------------


def frame_for_bytes(
    data: bytes | None, name: str, source: str, *, read_error: str | None = None, file_name: str | None = None
) -> Frame:
    """A Frame for an image given by name and bytes, keyed like the folder source (name + sha256).

    `file_name` (default: `name`) is what annotated copies are named after.
    """
    meta: dict[str, Any] = {"file": file_name or name}
    if data is None:
        error = FrameError("unreadable", f"{name}: cannot read ({read_error})")
        return error_frame(error, name=name, source=source, key=f"{name}:unreadable", meta=meta)
    sha = hashlib.sha256(data).hexdigest()
    return frame_from_bytes(
        data,
        name=name,
        source=source,
        key=f"{name}:{sha}",
        max_pixels=DEFAULT_MAX_PIXELS,
        meta={**meta, "sha256": sha},
    )


def _providers(text: str | None) -> list[str] | None:
    return [p.strip() for p in text.split(",") if p.strip()] if text else None


def _engine_for_command(args: argparse.Namespace) -> Any:
    """The engine for `inspect`/`predict`, or None after printing why it could not load."""
    try:
        return _load_engine(args.bundle, providers=_providers(args.providers))
    except (BundleError, InferenceError) as err:
        print(f"error: cannot load bundle {args.bundle}: {err}", file=sys.stderr)
        return None


def cmd_inspect(args: argparse.Namespace) -> int:
    """Inspect image files; one JSON result per image on stdout."""
    from lineside.agent.pipeline import inspect_frame
    from lineside.agent.sinks.annotate import AnnotateSink
    from lineside.agent.sinks.jsonl import JsonlSink

    configure_logging(args.log_level or "WARNING")
    engine = _engine_for_command(args)
    if engine is None:
        return EXIT_FAILURE
    sinks = [JsonlSink("-")] + ([AnnotateSink(args.annotate)] if args.annotate else [])
    errors = 0
    try:
        for path in args.images:
            file_name = Path(path).name
            try:
                frame = frame_for_bytes(Path(path).read_bytes(), str(path), "inspect", file_name=file_name)
            except OSError as err:
                frame = frame_for_bytes(None, str(path), "inspect", read_error=err.strerror, file_name=file_name)
            result = inspect_frame(engine, frame)
            errors += result.error is not None
            for sink in sinks:
                sink.publish(result, frame)
    finally:
        for sink in sinks:
            sink.close()
        engine.close()
    return EXIT_IMAGE_ERRORS if errors else EXIT_OK


class Store(Protocol):
    """A place images are read from or outputs written to: a local folder or an S3 prefix."""

    def list_images(self) -> list[str]: ...

    def read(self, name: str) -> bytes: ...

    def write(self, name: str, data: bytes) -> None: ...


class LocalStore:
    """A local folder; names are '/'-separated paths relative to it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def list_images(self) -> list[str]:
        if not self.root.is_dir():
            raise SourceError(f"input folder {self.root} does not exist")
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def write(self, name: str, data: bytes) -> None:
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


class S3Store:
    """An S3 prefix; the endpoint comes from AWS_ENDPOINT_URL when set (MinIO, moto, ...)."""

    def __init__(self, bucket: str, prefix: str) -> None:
        import boto3  # lazily: only batch prediction against S3 needs it

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _names(self) -> Iterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        start = f"{self.prefix}/" if self.prefix else ""
        for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
            for item in page.get("Contents", []):
                yield item["Key"][len(start) :]

    def list_images(self) -> list[str]:
        return sorted(
            n for n in self._names() if Path(n).suffix.lower() in IMAGE_SUFFIXES and not Path(n).name.startswith(".")
        )

    def read(self, name: str) -> bytes:
        return self._client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()

    def write(self, name: str, data: bytes) -> None:
        self._client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)


def open_store(uri: str) -> Store:
    """`s3://bucket/prefix` or a local folder."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise SourceError(f"expected s3://bucket/prefix, found {uri!r}")
        return S3Store(bucket, prefix)
    return LocalStore(Path(uri))


def predict_batch(
    inspector: Inspector, input_store: Store, output_store: Store, *, annotate: bool = True
) -> tuple[int, int]:
    """Inspect every image of `input_store`; write results.jsonl and annotated/*.jpg to `output_store`.

    Returns (images, errors). Outputs are staged locally and uploaded at the end for remote stores.
    """
    from lineside.agent.pipeline import inspect_frame
    from lineside.agent.sinks.annotate import AnnotateSink
    from lineside.agent.sinks.base import Sink
    from lineside.agent.sinks.jsonl import JsonlSink

    local = output_store.root if isinstance(output_store, LocalStore) else None
    with tempfile.TemporaryDirectory(prefix="lineside-predict-") as tmp:
        staging = local or Path(tmp)
        sinks: list[Sink] = [JsonlSink(staging / "results.jsonl")]
        if annotate:
            sinks.append(AnnotateSink(staging / "annotated"))
        images = errors = 0
        try:
            for name in input_store.list_images():
                try:
                    frame = frame_for_bytes(input_store.read(name), name, "predict")
                except OSError as err:
                    frame = frame_for_bytes(None, name, "predict", read_error=str(err))
                result = inspect_frame(inspector, frame)
                images += 1
                errors += result.error is not None
                for sink in sinks:
                    sink.publish(result, frame)
        finally:
            for sink in sinks:
                sink.close()
        if local is None:
            for path in sorted(p for p in staging.rglob("*") if p.is_file() and not p.name.startswith(".")):
                output_store.write(path.relative_to(staging).as_posix(), path.read_bytes())
    logger.info("predicted %d images, %d errors", images, errors)
    return images, errors


def cmd_predict(args: argparse.Namespace) -> int:
    """Batch prediction from a folder or S3 prefix into a folder or S3 prefix."""
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
    except Exception as err:  # botocore raises its own hierarchy; boto3 is imported lazily
        if type(err).__module__.startswith(("botocore", "boto3")):
            print(f"error: S3: {err}", file=sys.stderr)
            return EXIT_FAILURE
        raise
    finally:
        engine.close()
    return EXIT_IMAGE_ERRORS if errors else EXIT_OK


# -- entry point ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its subcommands."""
    parser = argparse.ArgumentParser(prog="lineside-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="Override the log level.")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check-config", help="Validate a config file and exit (78 when invalid).")
    check.add_argument("file", type=Path, help="YAML config file.")
    check.set_defaults(func=cmd_check_config)

    run = sub.add_parser("run", help="Run the inspection daemon.")
    run.add_argument("--config", type=Path, required=True, help="YAML config file.")
    run.set_defaults(func=cmd_run)

    inspect = sub.add_parser("inspect", help="Inspect image files; one JSON result per line on stdout.")
    inspect.add_argument("--bundle", type=Path, required=True, help="Model bundle folder.")
    inspect.add_argument("--annotate", type=Path, help="Also write annotated JPEGs into this folder.")
    inspect.add_argument("--providers", help="Comma-separated providers in order, e.g. cuda,cpu.")
    inspect.add_argument("images", nargs="+", help="Image files (PNG, TIFF, JPEG).")
    inspect.set_defaults(func=cmd_inspect)

    predict = sub.add_parser("predict", help="Batch prediction: results.jsonl + annotated images.")
    predict.add_argument("--bundle", type=Path, required=True, help="Model bundle folder.")
    predict.add_argument("--input", required=True, help="Folder or s3://bucket/prefix of images.")
    predict.add_argument("--output", required=True, help="Folder or s3://bucket/prefix for the outputs.")
    predict.add_argument("--providers", help="Comma-separated providers in order, e.g. cuda,cpu.")
    predict.add_argument("--no-annotate", action="store_true", help="Skip the annotated images.")
    predict.set_defaults(func=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `lineside-agent`; returns the process exit code."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
