"""Gluon block -> ONNX file with stable tensor names, a dynamic batch axis, and a parity check.

After `mx.onnx.export_model` the graph is cleaned: initializers are taken out of the graph inputs
(ONNX Runtime cannot constant-fold them otherwise), the input and outputs get the names the manifest
records, shapes are inferred and `onnx.checker` must pass.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import mxnet as mx
import numpy as np
import onnx
import onnxruntime as ort
from onnx import shape_inference

from lineside.agent.bundle.manifest import ParityReport, TensorSpec
from lineside.agent.errors import ExportError, ParityError

logger = logging.getLogger(__name__)


def _rename(model: onnx.ModelProto, old: str, new: str) -> None:
    for node in model.graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        if value.name == old:
            value.name = new


def clean_graph(path: Path, input_name: str, output_names: list[str]) -> list[TensorSpec]:
    """Fix names, drop initializers from the inputs, infer shapes, check. Returns the output specs."""
    model = onnx.load(str(path))
    init_names = {i.name for i in model.graph.initializer}
    real_inputs = [i for i in model.graph.input if i.name not in init_names]
    del model.graph.input[:]
    model.graph.input.extend(real_inputs)
    # Initializers no node reads (MXNet leaves e.g. a softmax constant behind) make ONNX Runtime warn.
    used = {name for node in model.graph.node for name in node.input}
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)
    if len(real_inputs) != 1:
        raise ExportError(f"{path}: expected one graph input, found {[i.name for i in real_inputs]}")
    _rename(model, real_inputs[0].name, input_name)
    if len(model.graph.output) != len(output_names):
        raise ExportError(
            f"{path}: graph has {len(model.graph.output)} outputs, expected {len(output_names)} ({output_names})"
        )
    for out, name in zip(list(model.graph.output), output_names, strict=True):
        _rename(model, out.name, name)
    # Drop stale intermediate shapes (exported for batch 1), then infer them again.
    del model.graph.value_info[:]
    model = shape_inference.infer_shapes(model)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"{path}: onnx.checker rejected the exported graph: {err}") from err
    onnx.save(model, str(path))
    specs = []
    for out in model.graph.output:
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in out.type.tensor_type.shape.dim]
        specs.append(TensorSpec(name=out.name, shape=dims, dtype="float32"))
    return specs


def export_block(
    block: mx.gluon.HybridBlock,
    input_shape: tuple[int, int, int, int],
    out_path: Path,
    input_name: str,
    output_names: list[str],
) -> tuple[TensorSpec, list[TensorSpec]]:
    """Export `block` (hybridizable, on CPU) to `out_path` with a dynamic batch axis."""
    block.hybridize()
    block(mx.nd.zeros(input_shape))
    with tempfile.TemporaryDirectory(prefix="lineside-export-") as tmp:
        prefix = str(Path(tmp) / "model")
        block.export(prefix)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mx.onnx.export_model(
                f"{prefix}-symbol.json",
                f"{prefix}-0000.params",
                in_shapes=[input_shape],
                in_types=[np.float32],
                onnx_file_path=str(out_path),
                dynamic=True,
                dynamic_input_shapes=[(None, *input_shape[1:])],
            )
    outputs = clean_graph(out_path, input_name, output_names)
    outputs = [o.model_copy(update={"shape": [-1, *o.shape[1:]]}) for o in outputs]
    return TensorSpec(name=input_name, shape=[-1, *input_shape[1:]], dtype="float32"), outputs


def check_parity(
    block: mx.gluon.HybridBlock,
    onnx_path: Path,
    input_name: str,
    batches: list[np.ndarray],
    tolerance: dict[str, float],
) -> ParityReport:
    """Compare MXNet and ONNX Runtime outputs on real (calibration) batches; raise ParityError on failure."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    worst = dict.fromkeys(names, 0.0)
    images = 0
    for batch in batches:
        ours = block(mx.nd.array(batch))
        ours = [ours] if isinstance(ours, mx.nd.NDArray) else list(ours)
        theirs = session.run(None, {input_name: batch})
        for name, a, b in zip(names, ours, theirs, strict=True):
            a = a.asnumpy()
            # NaN compares false with everything, so a NaN difference would pass any tolerance: refuse it.
            for runtime, values in (("MXNet", a), ("ONNX Runtime", b)):
                if not np.isfinite(values).all():
                    raise ParityError(
                        f"{onnx_path.name}: {runtime} gives non-finite values (NaN or inf) for {name!r} on "
                        f"calibration tiles: the model is broken (training diverged, or it is barely trained)"
                    )
            worst[name] = max(worst[name], float(np.max(np.abs(a - b))))
        images += batch.shape[0]
    passed = all(worst[n] <= tolerance[n] for n in names)
    report = ParityReport(images=images, max_abs_diff=worst, tolerance=tolerance, passed=passed)
    if not passed:
        detail = ", ".join(f"{n}: {worst[n]:.3g} > {tolerance[n]:.3g}" for n in names if worst[n] > tolerance[n])
        raise ParityError(f"{onnx_path.name}: ONNX Runtime differs from MXNet beyond tolerance ({detail})")
    logger.info("parity %s: %s over %d tiles", onnx_path.name, worst, images)
    return report
