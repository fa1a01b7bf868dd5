"""The inference engine: a verified bundle, ONNX Runtime sessions, and the bundle's decision rule.

This is the code the agent runs on every frame and the code `lineside-export evaluate` scores, so
evaluation figures describe exactly what the device does.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lineside.agent.bundle.loader import LoadedBundle, load_bundle
from lineside.agent.bundle.manifest import BundleManifest, ModelSpec
from lineside.agent.bundle.schema import Preprocessing
from lineside.agent.errors import BundleError, InferenceError
from lineside.agent.imaging import read_image
from lineside.agent.inference.preprocess import BatchBuilder, Layout, layout_for, windowed
from lineside.agent.inference.providers import GPU_PROVIDERS, ProviderEntry, resolve_providers
from lineside.agent.inference.settings import SessionSettings
from lineside.agent.inference.types import Detection, ModelOutputs, Prediction
from lineside.agent.models import MODEL_KINDS, KindOutput, KindThresholds, ModelKind, calibrated_score

logger = logging.getLogger(__name__)


class _Runner:
    """One ONNX Runtime session; with `io_binding`, outputs land in reused preallocated buffers."""

    def __init__(
        self, spec: ModelSpec, path: Path, providers: list[ProviderEntry], options: ort.SessionOptions
    ) -> None:
        self.spec = spec
        try:
            # The providers were resolved to ones that work (providers.py); no fallback banner on stdout.
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers, enable_fallback=0)
        except Exception as err:  # onnxruntime raises its own exception types
            raise InferenceError(f"{path}: ONNX Runtime cannot load the {spec.kind} model ({err})") from err
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        expected = [o.name for o in spec.outputs]
        if inputs != [spec.input.name] or outputs != expected:
            raise BundleError(
                f"{path}: graph has inputs {inputs} / outputs {outputs}, manifest says "
                f"[{spec.input.name!r}] / {expected}"
            )
        self.binding = self.session.io_binding()
        self._outputs: dict[int, list[np.ndarray]] = {}
        self._input_name = spec.input.name
        self.io_binding = True

    def providers(self) -> list[str]:
        return self.session.get_providers()

    def _output_buffers(self, n: int) -> list[np.ndarray]:
        bufs = self._outputs.get(n)
        if bufs is None:
            bufs = []
            for out in self.spec.outputs:
                shape = [n if d == -1 else d for d in out.shape]
                bufs.append(np.empty(shape, dtype=np.dtype(out.dtype)))
            self._outputs[n] = bufs
        return bufs

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run on `batch`; outputs by their manifest names. The arrays may be reused by the next call."""
        names = [o.name for o in self.spec.outputs]
        if not self.io_binding:
            return dict(zip(names, self.session.run(names, {self._input_name: batch}), strict=True))
        bufs = self._output_buffers(batch.shape[0])
        binding = self.binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_cpu_input(self.spec.input.name, batch)
        for out, buf in zip(self.spec.outputs, bufs, strict=True):
            binding.bind_output(out.name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        self.session.run_with_iobinding(binding)
        return dict(zip(names, bufs, strict=True))


class InferenceEngine:
    """Runs a bundle's models on one image at a time and applies its decision rule."""

    def __init__(
        self,
        bundle: LoadedBundle,
        *,
        providers: list[str] | None = None,
        device_id: int = 0,
        require_gpu: bool = False,
        trt_cache_dir: Path | None = None,
        trt_fp16: bool = True,
        session: SessionSettings | None = None,
        skip_unneeded_models: bool = True,
    ) -> None:
        self.bundle = bundle
        self.session_settings = session or SessionSettings()
        self.manifest: BundleManifest = bundle.manifest
        resolved = resolve_providers(providers, device_id=device_id, trt_fp16=trt_fp16, trt_cache_dir=trt_cache_dir)
        if require_gpu and not resolved.has_gpu:
            raise InferenceError(
                f"require_gpu is set but no GPU provider can run here ({'; '.join(resolved.skipped.values())}); "
                "check the NVIDIA driver, CUDA 13 and cuDNN 9 libraries"
            )
        options = self.session_settings.session_options()
        self._runners = {
            kind: _Runner(spec, bundle.path(spec.file), resolved.entries, options)
            for kind, spec in self.manifest.models.items()
        }
        in_use: list[str] = []
        for runner in self._runners.values():
            for p in runner.providers():
                if p not in in_use:
                    in_use.append(p)
        self.providers_in_use = in_use
        if require_gpu and not GPU_PROVIDERS & set(in_use):
            raise InferenceError(f"require_gpu is set but the sessions run on {in_use}")
        self._builders: dict[Preprocessing, BatchBuilder] = {}
        self._kinds: dict[str, ModelKind] = {
            kind: MODEL_KINDS[kind](spec, bundle) for kind, spec in self.manifest.models.items()
        }
        # Operator overrides (set-thresholds): replaced as a whole under the lock, read once per frame.
        self._overrides: dict[str, KindThresholds] = {}
        self._overrides_lock = threading.Lock()
        # Models whose output the decision needs on every frame run first; the others (localisers
        # that only report boxes) run only on frames judged defective, and models in neither list
        # never run in `predict`. `analyze` (calibration, evaluation, golden check) runs every model.
        rule = self.manifest.decision
        self._eager = tuple(k for k in self._runners if not skip_unneeded_models or k in rule.defective_if_any)
        self._deferred = tuple(k for k in self._runners if k not in self._eager and k in rule.report_boxes_from)
        self.warm_up()

    @classmethod
    def load(
        cls,
        bundle: Path,
        *,
        providers: list[str] | None = None,
        device_id: int = 0,
        require_gpu: bool = False,
        trt_cache_dir: Path | None = None,
        trt_fp16: bool = True,
        verify_golden: bool = True,
        session: SessionSettings | None = None,
        skip_unneeded_models: bool = True,
    ) -> InferenceEngine:
        """Verify a bundle (sha256 of every file), create sessions, warm up, check golden images."""
        loaded = load_bundle(Path(bundle))
        try:
            engine = cls(
                loaded,
                providers=providers,
                device_id=device_id,
                require_gpu=require_gpu,
                trt_cache_dir=trt_cache_dir,
                trt_fp16=trt_fp16,
                session=session,
                skip_unneeded_models=skip_unneeded_models,
            )
            if verify_golden:
                engine.check_golden()
        except BaseException:
            loaded.close()
            raise
        logger.info(
            "bundle %s version %s ready on %s",
            engine.manifest.bundle_id,
            engine.manifest.version,
            ", ".join(engine.providers_in_use),
        )
        return engine

    @property
    def io_binding(self) -> bool:
        """Whether outputs land in preallocated buffers (True, the default) or come from `session.run`."""
        return all(r.io_binding for r in self._runners.values())

    @io_binding.setter
    def io_binding(self, on: bool) -> None:
        for runner in self._runners.values():
            runner.io_binding = on

    def close(self) -> None:
        """Release the sessions (and an extracted archive's folder); the engine must not be used afterwards."""
        self._runners.clear()
        self.bundle.close()

    # -- per frame -------------------------------------------------------------------------------

    def _builder(self, prep: Preprocessing) -> BatchBuilder:
        builder = self._builders.get(prep)
        if builder is None:
            builder = self._builders[prep] = BatchBuilder(prep)
        return builder

    def analyze(self, image: np.ndarray, bits_stored: int | None = None) -> ModelOutputs:
        """Run every model; threshold-free outputs per kind (what calibration and evaluation sweep over)."""
        return self._run(_FrameInputs(self, image, bits_stored), tuple(self._runners))

    def model_inputs(
        self, image: np.ndarray, kinds: tuple[str, ...] | None = None, bits_stored: int | None = None
    ) -> dict[str, np.ndarray]:
        """Per model kind (default: all), the input batch (tiles) its graph gets for this image; copies."""
        frame = _FrameInputs(self, image, bits_stored)
        return {
            kind: frame.batch_for(self._runners[kind].spec.preprocessing)[0].copy()
            for kind in (kinds or tuple(self._runners))
        }

    def run_model(self, kind: str, batch: np.ndarray) -> dict[str, np.ndarray]:
        """One model's raw graph outputs on a batch from `model_inputs`, by output name; copies."""
        return {name: value.copy() for name, value in self._runners[kind].run(batch).items()}

    def _run(self, frame: _FrameInputs, kinds: tuple[str, ...]) -> ModelOutputs:
        """Run `kinds` on one frame; timings add up over calls on the same frame."""
        t0 = time.perf_counter()
        timings = frame.timings
        h, w = frame.image.shape
        for kind in kinds:
            runner = self._runners[kind]
            tp = time.perf_counter()
            batch, layout, unit = frame.batch_for(runner.spec.preprocessing)
            tr = time.perf_counter()
            timings["preprocess"] = timings.get("preprocess", 0.0) + (tr - tp) * 1000
            try:
                tensors = runner.run(batch)
            except Exception as err:
                raise InferenceError(f"{kind} model failed on a {w}x{h} image: {err}") from err
            tq = time.perf_counter()
            frame.models[kind] = self._kinds[kind].outputs(tensors, unit, layout)
            te = time.perf_counter()
            timings[kind] = (tq - tr) * 1000
            timings[f"{kind}_post"] = (te - tq) * 1000
        timings.setdefault("preprocess", 0.0)
        timings["models_total"] = timings.get("models_total", 0.0) + (time.perf_counter() - t0) * 1000
        return ModelOutputs(height=h, width=w, models=dict(frame.models), timings_ms=dict(timings))

    def thresholds(self) -> dict[str, KindThresholds]:
        """The bundle's calibrated thresholds, per model kind."""
        return {kind: spec.thresholds for kind, spec in self.manifest.models.items()}

    def threshold_overrides(self) -> dict[str, KindThresholds]:
        """The operator's overrides in force (kind -> full thresholds), applied by `predict`."""
        with self._overrides_lock:
            return dict(self._overrides)

    def effective_thresholds(self) -> dict[str, KindThresholds]:
        """What `predict` decides with: the bundle's thresholds with the overrides on top."""
        return {**self.thresholds(), **self.threshold_overrides()}

    def set_threshold_overrides(self, overrides: dict[str, KindThresholds]) -> None:
        """Replace the overrides (from the next frame on); {} = the bundle's thresholds again.

        Each must be the kind's own thresholds class and within its bounds (the caller validates with
        `KindThresholds.bounds()`; checked again here so no path skips it). Thread-safe.
        """
        bundle = self.thresholds()
        for kind, value in overrides.items():
            if kind not in bundle:
                raise ValueError(f"the bundle has no {kind!r} model; it has {sorted(bundle)}")
            if type(value) is not type(bundle[kind]):
                raise ValueError(f"{kind}: expected {type(bundle[kind]).__name__}, got {type(value).__name__}")
            for field, (low, high) in bundle[kind].bounds().items():
                if not low <= getattr(value, field) <= high:
                    raise ValueError(f"{kind}.{field} = {getattr(value, field)} is outside [{low:g}, {high:g}]")
            fixed = set(type(value).model_fields) - set(bundle[kind].bounds()) - {"kind"}
            changed = [f for f in fixed if getattr(value, f) != getattr(bundle[kind], f)]
            if changed:
                raise ValueError(f"{kind}: {sorted(changed)} cannot be changed at run time")
        with self._overrides_lock:
            self._overrides = dict(overrides)

    def decide(
        self, out: ModelOutputs, thresholds: dict[str, KindThresholds] | None = None, *, boxes: bool = True
    ) -> Prediction:
        """Apply thresholds (default: the bundle's) and the decision rule to raw outputs.

        `boxes=False` leaves the localisers' boxes out (their outputs may be missing): verdict and score only.
        """
        t0 = time.perf_counter()
        th = {**self.thresholds(), **(thresholds or {})}
        rule = self.manifest.decision
        scores = {kind: o.score for kind, o in out.models.items()}
        calibrated = {kind: calibrated_score(score, th[kind].image) for kind, score in scores.items()}
        members = [k for k in rule.defective_if_any if k in calibrated]
        fired = tuple(k for k in members if calibrated[k] >= 0.5)
        score = max((calibrated[k] for k in members), default=0.0)
        found_boxes: list[Detection] = []
        if fired and boxes:
            # Boxes only for defective images: a verdict of "good" never comes with boxes.
            for kind in rule.report_boxes_from:
                found, box_scores = self._kinds[kind].boxes(out.models[kind], th[kind])
                found_boxes += [
                    Detection(float(b[0]), float(b[1]), float(b[2]), float(b[3]), float(s), kind)
                    for b, s in zip(found, box_scores, strict=True)
                ]
        timings = dict(out.timings_ms)
        timings["decide"] = (time.perf_counter() - t0) * 1000
        return Prediction(
            is_defective=bool(fired),
            score=float(score),
            boxes=tuple(found_boxes),
            model_scores=scores,
            fired=fired,
            timings_ms=timings,
        )

    def predict(self, image: np.ndarray, bits_stored: int | None = None) -> Prediction:
        """Inspect one 2-D uint8/uint16 image (with the operator's threshold overrides, if any).

        Verdict, score and boxes are those of running every model; models the decision rule does
        not need for this frame are skipped (see `skip_unneeded_models`), so `model_scores` lists
        the models that ran.
        """
        overrides = self.threshold_overrides()
        frame = _FrameInputs(self, image, bits_stored)
        prediction = self.decide(self._run(frame, self._eager), overrides, boxes=not self._deferred)
        if prediction.is_defective and self._deferred:
            # Boxes are reported only for defective frames: run the localisers now, then decide on all.
            prediction = self.decide(self._run(frame, self._deferred), overrides)
        return prediction

    # -- start-up --------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Run each model once so first-frame latency does not include lazy initialisation."""
        h, w = 0, 0
        for spec in self.manifest.models.values():
            th, tw = spec.preprocessing.input_size
            h, w = max(h, th), max(w, tw)
        self.analyze(np.zeros((h, w), np.uint8))

    def check_golden(self, tolerance_scale: float = 1.0) -> None:
        """Prove the bundle reproduces its recorded outputs on its golden images."""
        problems: list[str] = []
        for golden in self.manifest.golden:
            image = read_image(self.bundle.path(golden.file))
            prediction = self.decide(self.analyze(image))  # the bundle's own thresholds, never overrides
            for kind, expected in golden.expected_scores.items():
                actual = prediction.model_scores.get(kind)
                tol = golden.score_tolerance * tolerance_scale * max(1.0, abs(expected))
                if actual is None or abs(actual - expected) > tol:
                    problems.append(f"{golden.file.path}: {kind} score {actual} != expected {expected} ± {tol:g}")
            # A verdict flip counts unless the score sits within tolerance of the boundary (numeric noise).
            boundary = abs(prediction.score - 0.5) <= golden.score_tolerance * tolerance_scale
            if prediction.is_defective != golden.expected_is_defective and not boundary:
                problems.append(
                    f"{golden.file.path}: decision {prediction.is_defective} != {golden.expected_is_defective}"
                )
        if problems:
            raise BundleError("golden-image check failed: " + "; ".join(problems))


class _FrameInputs:
    """One frame's windowed images and model batches, shared by the models (and calls) that need them."""

    def __init__(self, engine: InferenceEngine, image: np.ndarray, bits_stored: int | None) -> None:
        if image.ndim != 2:
            raise InferenceError(f"expected a 2-D grey image, got shape {image.shape}")
        self.engine = engine
        self.image = image
        self.bits_stored = bits_stored
        self.units: dict[tuple[float, float], np.ndarray] = {}
        self.batches: dict[Preprocessing, tuple[np.ndarray, Layout, np.ndarray]] = {}
        self.models: dict[str, KindOutput] = {}
        self.timings: dict[str, float] = {}

    def batch_for(self, prep: Preprocessing) -> tuple[np.ndarray, Layout, np.ndarray]:
        """(batch, layout, windowed image) for `prep`; the batch lives in the engine's reused buffer."""
        cached = self.batches.get(prep)
        if cached is None:
            unit = self.units.get(prep.window)
            if unit is None:
                unit = self.units[prep.window] = windowed(self.image, prep, self.bits_stored)
            layout = layout_for(self.image.shape, prep)
            cached = self.batches[prep] = (self.engine._builder(prep).build(unit, layout), layout, unit)
        return cached
