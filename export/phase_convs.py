"""Rewrite stride-2 transposed convolutions as four phase convolutions, exactly, for the INT8 path.

ONNX Runtime's CPU provider has no INT8 kernel for ConvTranspose: in a quantised VAE the decoder's four
ConvTranspose layers stay float32 between Dequantize/Quantize pairs and take most of the time. A
ConvTranspose with kernel 4, stride 2, padding 1 is the same function as four 2x2 convolutions, one per
output phase (row parity ry, column parity rx), interleaved by DepthToSpace:

    out[o, 2m + ry, 2n + rx] = sum_{i, a, c} x[i, m + a - 1 + ry, n + c - 1 + rx] * W[i, o, T[ry][a], T[rx][c]]

with T = ((3, 1), (2, 0)): the kernel taps that reach each phase. Convolutions quantise (QLinearConv).
A BatchNormalization that alone reads the ConvTranspose is folded into the phase convolutions (it acts
per output channel, which DepthToSpace keeps). Only float arithmetic changes order: `quantize` checks
the rewritten float32 graph against the original before quantising it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

TAPS = ((3, 1), (2, 0))  # kernel rows (columns) feeding output row (column) parity 0 and 1
PADS = ((1, 0), (0, 1))  # (before, after) padding of each phase's 2x2 convolution


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _rewritable(node: Any, inits: dict[str, Any]) -> bool:
    a = _attrs(node)
    return (
        node.op_type == "ConvTranspose"
        and list(a.get("kernel_shape", [])) == [4, 4]
        and list(a.get("strides", [])) == [2, 2]
        and list(a.get("pads", [0, 0, 0, 0])) == [1, 1, 1, 1]
        and a.get("group", 1) == 1
        and list(a.get("dilations", [1, 1])) == [1, 1]
        and list(a.get("output_padding", [0, 0])) == [0, 0]
        and not a.get("output_shape")
        and node.input[1] in inits
        and (len(node.input) < 3 or not node.input[2] or node.input[2] in inits)
    )


def _folded_bn(node: Any, consumers: dict[str, list[Any]], inits: dict[str, Any], outputs: set[str]) -> Any | None:
    """The BatchNormalization to fold into `node`: its only reader, with constant parameters."""
    users = consumers.get(node.output[0], [])
    if node.output[0] in outputs or len(users) != 1 or users[0].op_type != "BatchNormalization":
        return None
    bn = users[0]
    return bn if all(name in inits for name in bn.input[1:5]) and len(bn.output) == 1 else None


def deconv_as_phase_convs(model: Any) -> tuple[Any, int]:
    """(rewritten copy of the onnx ModelProto, number of ConvTranspose layers rewritten)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    folded: set[int] = set()
    unused: set[str] = set()
    nodes, added = [], []
    rewritten = 0
    for node in graph.node:
        if id(node) in folded:
            continue
        if not _rewritable(node, inits):
            if node.op_type == "ConvTranspose":
                logger.info("ConvTranspose %s is not kernel 4 / stride 2 / pad 1: left as is", node.output[0])
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)  # (C_in, C_out, 4, 4)
        cout = weight.shape[1]
        bias = np.zeros(cout)
        if len(node.input) > 2 and node.input[2]:
            bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
            unused.add(node.input[2])
        scale, shift, out = np.ones(cout), np.zeros(cout), node.output[0]
        bn = _folded_bn(node, consumers, inits, outputs)
        if bn is not None:
            gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
            scale = gamma / np.sqrt(var + float(_attrs(bn).get("epsilon", 1e-5)))
            shift = beta - mean * scale
            folded.add(id(bn))
            unused.update(bn.input[1:5])
            out = bn.output[0]
        unused.add(node.input[1])
        base = node.output[0]
        phases = []
        for ry in (0, 1):
            for rx in (0, 1):
                kernel = weight[:, :, list(TAPS[ry]), :][:, :, :, list(TAPS[rx])]  # (C_in, C_out, 2, 2)
                kernel = np.transpose(kernel, (1, 0, 2, 3)) * scale[:, None, None, None]
                w_name, b_name, o_name = f"{base}_phase{ry}{rx}_w", f"{base}_phase{ry}{rx}_b", f"{base}_phase{ry}{rx}"
                added += [
                    numpy_helper.from_array(kernel.astype(np.float32), w_name),
                    numpy_helper.from_array((bias * scale + shift).astype(np.float32), b_name),
                ]
                pads = [PADS[ry][0], PADS[rx][0], PADS[ry][1], PADS[rx][1]]
                nodes.append(
                    helper.make_node(
                        "Conv", [node.input[0], w_name, b_name], [o_name], name=o_name, kernel_shape=[2, 2], pads=pads
                    )
                )
                phases.append(o_name)
        nodes.append(helper.make_node("Concat", phases, [f"{base}_phases"], name=f"{base}_phases", axis=1))
        nodes.append(
            helper.make_node("DepthToSpace", [f"{base}_phases"], [out], name=f"{base}_d2s", blocksize=2, mode="DCR")
        )
        rewritten += 1
    still_read = {name for node in nodes for name in node.input}
    keep = [i for i in graph.initializer if i.name not in unused or i.name in still_read]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend([*keep, *added])
    gone = {i.name for i in graph.input} & (unused - still_read)
    if gone:
        kept_inputs = [i for i in graph.input if i.name not in gone]
        del graph.input[:]
        graph.input.extend(kept_inputs)
    onnx.checker.check_model(model)
    return model, rewritten
