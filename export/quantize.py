"""`lineside-export quantize`: a bundle's models in INT8 (ONNX Runtime's static quantisation), as a new bundle.

Why: on a CPU box with VNNI (AVX512-VNNI / AVX-VNNI) an INT8 convolution does about four times the
multiply-adds per instruction of a float32 one (docs/benchmarks.md has what it buys per model).

What it does, per model asked for (default: every model of the bundle):
- calibration tiles: the model's own input tiles, cut by the agent's preprocessing from the bundle's golden
  images and, better, from the line's real radiographs (`--images`), so the activation ranges are those
  the device sees;
- `quant_pre_process` (shape inference, graph clean-up), then `quantize_static`: QDQ format, weights int8
  per output channel, activations uint8 (the u8 x s8 pair VNNI multiplies), ranges by `--calibration`
  (default percentile: clipping rare extreme activations halved the SSD's worst score change of min/max);
- float32 against INT8 on the calibration tiles (max abs difference per output) and on the calibration
  frames through the agent's engine (verdict flips, score differences), recorded per model as
  `quantization` in the manifest; `parity` stays that of the float32 export.

The new bundle keeps the thresholds and decision rule (calibrated on float32: `evaluate` on held-out series
says whether the INT8 bundle stays within tolerance, docs/benchmarks.md), records golden outputs of its own
INT8 models, and is refused when the INT8 models flip a golden image's verdict (the build's clearest cases).

ONNX Runtime's quantisation tools need onnx >= 1.16, MXNet's exporter onnx < 1.15: this runs in the agent
environment with the `quantize` extra (`pip install '.[agent,quantize]'`), never beside MXNet.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lineside.agent import __version__
from lineside.agent.bundle.loader import LoadedBundle, sha256_file, verify_files
from lineside.agent.bundle.manifest import BundleManifest, FileRef, GoldenImage, QuantizationReport
from lineside.agent.errors import ExportError, ImageDecodeError
from lineside.agent.imaging import IMAGE_SUFFIXES, read_image
from lineside.agent.inference.engine import InferenceEngine
from lineside.agent.inference.types import Prediction
from lineside.export.pack import pack_bundle

logger = logging.getLogger(__name__)

Calibration = Literal["minmax", "percentile", "entropy"]
MIN_ONNX = (1, 16)
CHUNK = 16  # tiles per calibration batch
REWRITE_TOLERANCE = 1e-4  # float32 rounding of the phase-convolution rewrite, relative to the output's range
METHOD = "static QDQ: weights int8 per output channel, activations uint8"


@dataclass
class QuantizeOptions:
    bundle: Path
    out: Path
    models: list[str] | None = None  # None: every model of the bundle
    images: list[Path] = field(default_factory=list)  # files or folders of the line's radiographs
    # Per model, drawn at random from all frames' tiles. Percentile and entropy hold every activation of every
    # calibration tile in memory (~20 MB per 256 px SSD tile: 512 tiles took 11 GB), hence the small default.
    max_tiles: int = 64
    # On a GDXray SSD, percentile ranges halved the worst image-score change of min/max ones (docs/benchmarks.md).
    calibration: Calibration = "percentile"
    version: str | None = None  # default: the float32 bundle's version + "-int8"
    force: bool = False
    seed: int = 0
    allow_golden_flips: bool = False  # record a golden verdict that INT8 flips instead of refusing the bundle


def quantization_tools() -> Any:
    """onnxruntime.quantization, or an ExportError saying how to get an environment that has it."""
    try:
        import onnx
    except ImportError:
        raise ExportError(
            "quantize needs the onnx package (>= 1.16) for ONNX Runtime's quantisation tools: "
            "pip install '.[agent,quantize]' (the agent environment, not the MXNet export environment)"
        ) from None
    found = tuple(int(p) for p in onnx.__version__.split(".")[:2])
    if found < MIN_ONNX:
        raise ExportError(
            f"quantize needs onnx >= {'.'.join(map(str, MIN_ONNX))} (ONNX Runtime's quantisation tools), this "
            f"environment has onnx {onnx.__version__}: MXNet's exporter pins onnx < 1.15, so run quantize from "
            "the agent environment with the quantize extra: pip install '.[agent,quantize]'"
        )
    from onnxruntime import quantization

    return quantization


def image_files(paths: list[Path]) -> list[Path]:
    """The image files among `paths` (folders searched recursively); a missing path is an error."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise ExportError(f"--images {path}: no such file or folder")
    if paths and not found:
        raise ExportError(f"--images {', '.join(map(str, paths))}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return found


def _frames(loaded: LoadedBundle, opts: QuantizeOptions) -> tuple[list[np.ndarray], int]:
    """(frames, how many are real): the golden images, then every --images file (decoded by the agent)."""
    frames = [read_image(loaded.path(g.file)) for g in loaded.manifest.golden]
    real = 0
    for path in image_files(opts.images):
        try:
            frames.append(read_image(path))
        except ImageDecodeError as err:
            raise ExportError(f"--images: {err}") from err
        real += 1
    if not frames:
        raise ExportError(f"{opts.bundle}: no golden image and no --images: nothing to calibrate the INT8 ranges on")
    return frames, real


class _Reader:
    """CalibrationDataReader over a fixed tile array, CHUNK tiles per call."""

    def __init__(self, input_name: str, tiles: np.ndarray) -> None:
        self._chunks: Iterator[np.ndarray] = iter(np.array_split(tiles, max(1, len(tiles) // CHUNK)))
        self.input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        chunk = next(self._chunks, None)
        return None if chunk is None else {self.input_name: np.ascontiguousarray(chunk)}


def _tiles(engine: InferenceEngine, frames: list[np.ndarray], kind: str, max_tiles: int, seed: int) -> np.ndarray:
    tiles = np.concatenate([engine.model_inputs(f, (kind,))[kind] for f in frames])
    if len(tiles) > max_tiles:
        pick = np.random.default_rng(seed).choice(len(tiles), max_tiles, replace=False)
        tiles = tiles[np.sort(pick)]
    return tiles


def _quantize_model(tools: Any, src: Path, dst: Path, input_name: str, tiles: np.ndarray, how: Calibration) -> int:
    """Quantise `src` into `dst`; returns how many ConvTranspose layers became phase convolutions first."""
    import onnx
    import onnxruntime as ort

    from lineside.export.phase_convs import deconv_as_phase_convs

    method = {
        "minmax": tools.CalibrationMethod.MinMax,
        "percentile": tools.CalibrationMethod.Percentile,
        "entropy": tools.CalibrationMethod.Entropy,
    }[how]
    with tempfile.TemporaryDirectory(prefix="lineside-quantize-") as work:
        source = src
        model, rewritten = deconv_as_phase_convs(onnx.load(str(src)))
        if rewritten:
            source = Path(work) / "phase.onnx"
            onnx.save(model, str(source))
            _check_same_function(ort, src, source, input_name, tiles[:CHUNK])
        pre = Path(work) / "pre.onnx"
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(source), str(pre))
        except Exception as err:  # shape inference can fail on unusual graphs; quantisation works without it
            logger.warning("quantize: pre-processing %s failed (%s); quantising the graph as exported", src.name, err)
            shutil.copy2(source, pre)
        tools.quantize_static(
            str(pre),
            str(dst),
            _Reader(input_name, tiles),
            quant_format=tools.QuantFormat.QDQ,
            per_channel=True,
            activation_type=tools.QuantType.QUInt8,
            weight_type=tools.QuantType.QInt8,
            calibrate_method=method,
        )
    return rewritten


def _check_same_function(ort: Any, original: Path, rewritten: Path, input_name: str, tiles: np.ndarray) -> None:
    """The rewritten float32 graph must compute what the exported one does (only rounding may differ)."""
    a = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"]).run(None, {input_name: tiles})
    b = ort.InferenceSession(str(rewritten), providers=["CPUExecutionProvider"]).run(None, {input_name: tiles})
    for x, y in zip(a, b, strict=True):
        worst = float(np.max(np.abs(x - y)))
        if worst > REWRITE_TOLERANCE * max(1.0, float(np.max(np.abs(x)))):
            raise ExportError(f"{original.name}: the phase-convolution rewrite differs by {worst:g} in float32 (a bug)")


def _max_abs_diff(fp32: InferenceEngine, int8: InferenceEngine, kind: str, tiles: np.ndarray) -> dict[str, float]:
    worst: dict[str, float] = {}
    for chunk in np.array_split(tiles, max(1, len(tiles) // CHUNK)):
        a, b = fp32.run_model(kind, chunk), int8.run_model(kind, chunk)
        for name, value in a.items():
            worst[name] = max(worst.get(name, 0.0), float(np.max(np.abs(value - b[name]))))
    return worst


def _golden(
    loaded: LoadedBundle, judged: list[tuple[Prediction, Prediction]], allow_flips: bool
) -> tuple[list[GoldenImage], list[str]]:
    """The golden images with what the INT8 models say, and the flipped verdicts (refused unless allowed).

    `judged` holds (float32, INT8) predictions for the golden images, in the manifest's order.
    """
    out, flips = [], []
    for golden, (fp32, int8) in zip(loaded.manifest.golden, judged, strict=True):
        # As the agent's golden check: a verdict that sits within tolerance of the boundary in float32 is
        # numeric noise either way (a model that scores every image alike is calibrated right at it).
        flipped = int8.is_defective != fp32.is_defective
        if flipped and abs(fp32.score - 0.5) <= golden.score_tolerance:
            logger.info("quantize: %s: on the decision boundary (score %.4f), not a flip", golden.file.path, fp32.score)
        elif flipped:
            flips.append(
                f"{golden.file.path}: float32 says {'defective' if fp32.is_defective else 'good'} "
                f"(score {fp32.score:.3f}), INT8 {int8.score:.3f}"
            )
        out.append(
            golden.model_copy(
                update={
                    "expected_scores": int8.model_scores,
                    "expected_is_defective": int8.is_defective,
                    "expected_boxes": len(int8.boxes),
                }
            )
        )
    if flips and not allow_flips:
        raise ExportError(
            "INT8 models flip the verdict on golden images (refused; --allow-golden-flips writes the bundle "
            "anyway, for `evaluate` to judge on real images): " + "; ".join(flips)
        )
    for flip in flips:
        logger.warning("quantize: golden verdict flipped (allowed): %s", flip)
    return out, flips


def quantize_bundle(opts: QuantizeOptions) -> dict[str, Any]:
    """Write the INT8 bundle to `opts.out` (+ .tar.gz); returns a summary (also recorded in its manifest)."""
    tools = quantization_tools()
    import onnx
    import onnxruntime

    out = Path(opts.out)
    if out.exists() and not opts.force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    if opts.max_tiles < 1:
        raise ExportError(f"--max-tiles must be at least 1, got {opts.max_tiles}")
    fp32 = InferenceEngine.load(Path(opts.bundle), providers=["cpu"])  # sha256 of every file, golden images
    loaded = fp32.bundle
    try:
        manifest = loaded.manifest
        kinds = opts.models or list(manifest.models)
        unknown = sorted(set(kinds) - set(manifest.models))
        if unknown:
            raise ExportError(f"--models names {unknown}; the bundle has {sorted(manifest.models)}")
        already = [k for k in kinds if manifest.models[k].quantization is not None]
        if already:
            raise ExportError(f"{opts.bundle}: {already} are INT8 already; quantize the float32 bundle")
        frames, real = _frames(loaded, opts)
        if not real:
            logger.warning(
                "quantize: ranges from the %d synthetic golden images only; give --images with the line's "
                "radiographs for ranges that fit real frames",
                len(frames),
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            summary = _write(
                tools,
                fp32,
                loaded,
                kinds,
                frames,
                real,
                tmp,
                opts,
                f"onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}",
            )
            pack_bundle(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        fp32.close()
    logger.info("INT8 bundle %s written to %s", summary["version"], out)
    return summary


def _write(
    tools: Any,
    fp32: InferenceEngine,
    loaded: LoadedBundle,
    kinds: list[str],
    frames: list[np.ndarray],
    real: int,
    tmp: Path,
    opts: QuantizeOptions,
    tool: str,
) -> dict[str, Any]:
    manifest = loaded.manifest
    # Every file the float32 bundle names, except the graphs that are replaced.
    replaced = {manifest.models[k].file.path for k in kinds}
    for ref in manifest.files():
        if ref.path not in replaced:
            target = tmp / ref.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(loaded.path(ref), target)
    tiles: dict[str, np.ndarray] = {}
    phase: dict[str, int] = {}
    models = dict(manifest.models)
    for kind in kinds:
        spec = manifest.models[kind]
        tiles[kind] = _tiles(fp32, frames, kind, opts.max_tiles, opts.seed)
        dst = tmp / f"{kind}.int8.onnx"
        logger.info(
            "quantize: %s on %d tiles from %d frames (%s)", kind, len(tiles[kind]), len(frames), opts.calibration
        )
        phase[kind] = _quantize_model(
            tools, loaded.path(spec.file), dst, spec.input.name, tiles[kind], opts.calibration
        )
        models[kind] = spec.model_copy(
            update={
                "file": FileRef(path=dst.name, sha256=sha256_file(dst)),
                "architecture": f"{spec.architecture} (int8)",
            }
        )
    draft = manifest.model_copy(
        update={
            "bundle_id": str(uuid.uuid4()),
            "version": opts.version or f"{manifest.version}-int8",
            "created_at": datetime.now(UTC),
            "models": models,
            "exporter": {**manifest.exporter, "quantized_by": f"lineside {__version__}, {tool}"},
        }
    )
    draft.dump(tmp)
    int8 = InferenceEngine(LoadedBundle(tmp, draft), providers=["cpu"])
    # Both bundles on every calibration frame (the golden images first: `_frames`): verdicts and image scores.
    judged = [(fp32.decide(fp32.analyze(f)), int8.decide(int8.analyze(f))) for f in frames]
    golden, golden_flips = _golden(loaded, judged[: len(manifest.golden)], opts.allow_golden_flips)
    flips = sum(a.is_defective != b.is_defective for a, b in judged)
    score_diff = {k: max(abs(a.model_scores[k] - b.model_scores[k]) for a, b in judged) for k in kinds}
    for kind in kinds:
        models[kind] = models[kind].model_copy(
            update={
                "quantization": QuantizationReport(
                    method=METHOD,
                    phase_convs=phase[kind],
                    calibration=opts.calibration,
                    tiles=len(tiles[kind]),
                    frames=len(frames),
                    real_frames=real,
                    fp32_sha256=manifest.models[kind].file.sha256,
                    tool=tool,
                    max_abs_diff=_max_abs_diff(fp32, int8, kind, tiles[kind]),
                    verdict_flips=int(flips),
                    golden_flips=len(golden_flips),
                    max_score_diff=score_diff[kind],
                )
            }
        )
    final = BundleManifest.model_validate(draft.model_copy(update={"models": models, "golden": golden}).model_dump())
    final.dump(tmp)
    verify_files(tmp, final)
    InferenceEngine(LoadedBundle(tmp, final), providers=["cpu"]).check_golden()
    return {
        "version": final.version,
        "bundle_id": final.bundle_id,
        "from_version": manifest.version,
        "frames": len(frames),
        "real_frames": real,
        "verdict_flips": int(flips),
        "golden_flips": golden_flips,
        "models": {k: final.models[k].quantization.model_dump() for k in kinds},  # type: ignore[union-attr]
    }
