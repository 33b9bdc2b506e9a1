"""ONNX graph passes applied after the torch export; export keeps one only if parity holds.

- `simplify_graph`: onnxslim (constant folding, dead code, fusions), when it is installed.
- `classes_last`: softmax/max/argmax over the last axis (3x faster on ONNX Runtime CPU).
- `uint8_via_float`: uint8 touched only by float casts at the graph's edges (TensorRT's rule).
- `normalise_as_conv`: the input normalisation as one grouped 1x1 Conv (for the INT8 graphs).
- `classes_only`: the class map alone, without the softmax that only the confidence needs.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)
INPUT = "images"  # mirrors export.onnx (not imported from there: that module imports this one)


def candidates(raw: onnx.ModelProto, size: tuple[int, int], simplify: bool) -> list[tuple[str, onnx.ModelProto]]:
    """Graphs to try, most optimised first; the raw export is always the last resort."""
    out = []
    slim = simplify_graph(raw) if simplify else None
    for label, base in (("onnxslim", slim), ("raw", raw)):
        if base is None:
            continue
        fast = classes_last(base, size)
        if fast is not None:
            out.append((f"{label}+classes-last", fast))
    if slim is not None:
        out.append(("onnxslim", slim))
    out.append(("raw", raw))
    return [(label, uint8_via_float(m)) for label, m in out]


def uint8_via_float(model: onnx.ModelProto) -> onnx.ModelProto:
    """Touch uint8 only in float <-> uint8 casts at the graph's edges, the one form TensorRT's
    documentation promises (its uint8 tensors may only be converted from/to float32/float16).

    The trace gives Transpose(uint8) -> Cast(float) at the input, swapped here to cast first,
    and ArgMax(int64) -> Cast(uint8) at the output, routed through float (ids < 256 are exact).
    """
    m = onnx.ModelProto.FromString(model.SerializeToString())
    nodes = list(m.graph.node)
    first = [n for n in nodes if INPUT in n.input]
    if len(first) == 1 and first[0].op_type == "Transpose":
        cast = [n for n in nodes if first[0].output[0] in n.input]
        if len(cast) == 1 and cast[0].op_type == "Cast" and attr(cast[0], "to") == onnx.TensorProto.FLOAT:
            tr, ca = first[0], cast[0]
            tr_out, ca_out = tr.output[0], ca.output[0]
            ca.input[0], ca.output[0] = INPUT, tr_out  # Cast(images) -> float NHWC ...
            tr.input[0], tr.output[0] = tr_out, ca_out  # ... -> Transpose -> what the cast fed before
            i, j = nodes.index(tr), nodes.index(ca)
            nodes[i], nodes[j] = ca, tr
    out = next((n for n in nodes if "classes" in n.output), None)
    if out is not None and out.op_type == "Cast":
        via = helper.make_node("Cast", [out.input[0]], ["classes_float"], to=onnx.TensorProto.FLOAT,
                               name="classes_via_float")
        out.input[0] = "classes_float"
        nodes.insert(nodes.index(out), via)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    del m.graph.value_info[:]  # recorded types/shapes of the rewired tensors are stale; ORT re-infers
    return m


def simplify_graph(model: onnx.ModelProto) -> onnx.ModelProto | None:
    try:
        import onnxslim
    except ImportError:
        log.info("onnxslim is not installed; the graph is not simplified")
        return None
    try:
        return onnxslim.slim(onnx.ModelProto.FromString(model.SerializeToString()))
    except Exception as e:  # a failed simplification only costs speed: ship the raw graph
        log.warning("onnxslim failed (%s); keeping the unsimplified graph", str(e).splitlines()[0])
        return None


def classes_last(model: onnx.ModelProto, size: tuple[int, int]) -> onnx.ModelProto | None:
    """Move the class axis last before the upsample, or None if the graph has no such tail.

    Deployed upsamples NCHW logits and takes softmax/max/argmax over axis 1. ONNX Runtime's CPU
    Softmax on a non-last axis transposes the full-size tensor on every call (~350 ms of a
    ~550 ms frame at 512x1024 on 2 cores). Transposing the low-resolution logits to NHWC before
    the upsample makes every full-size reduction run over the last axis; the maths is unchanged
    (same softmax, same argmax over the probabilities).
    """
    m = onnx.ModelProto.FromString(model.SerializeToString())
    nodes = list(m.graph.node)
    users = lambda t: [n for n in nodes if t in n.input]  # noqa: E731
    soft = [n for n in nodes if n.op_type == "Softmax" and attr(n, "axis") == 1]
    if len(soft) != 1:
        return None
    soft = soft[0]
    resize = next((n for n in nodes if soft.input[0] in n.output and n.op_type == "Resize"), None)
    tail = users(soft.output[0])
    if resize is None or len(users(resize.output[0])) != 1 or sorted(n.op_type for n in tail) != ["ArgMax", "ReduceMax"]:
        return None
    if not all(attr(n, "keepdims") == 0 for n in tail) or attr(resize, "mode") != b"linear":
        return None
    scales = _upsample_scales(m, resize.input[0], size)
    if scales is None:
        return None
    m.graph.initializer.append(numpy_helper.from_array(np.array(scales, np.float32), "classes_last_scales"))
    nhwc = resize.input[0] + "_nhwc"
    transpose = helper.make_node("Transpose", [resize.input[0]], [nhwc], perm=[0, 2, 3, 1], name="classes_last")
    del resize.input[:]
    resize.input.extend([nhwc, "", "classes_last_scales"])
    _set_axis(m, soft, 3)
    for n in tail:
        _set_axis(m, n, 3)
    del m.graph.node[:]
    m.graph.node.extend(_insert_before(nodes, resize, transpose))
    del m.graph.value_info[:]  # the upsampled tensor is NHWC now: its recorded shape is stale
    _prune(m)
    return m


def _upsample_scales(model: onnx.ModelProto, tensor: str, size: tuple[int, int]) -> list[float] | None:
    """NHWC Resize scales that take `tensor` (B, K, h, w) to `size`, from shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    vi = next((v for v in inferred.graph.value_info if v.name == tensor), None)
    dims = [d.dim_value for d in vi.type.tensor_type.shape.dim] if vi is not None else []
    if len(dims) != 4 or not dims[2] or not dims[3] or size[0] % dims[2] or size[1] % dims[3]:
        return None  # only exact integer upsampling: then scales and sizes give identical pixels
    return [1.0, size[0] / dims[2], size[1] / dims[3], 1.0]


NORM_CONV = "input_normalisation"


def normalise_as_conv(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The input normalisation, Sub(mean) then Div(std) per channel of an NCHW tensor, as one grouped
    1x1 Conv named NORM_CONV (weights 1/std, bias -mean/std: the same values to float rounding);
    None where the graph has no such pair. For the INT8 graphs, which leave this node fp32: ONNX
    Runtime runs their Sub and Div in its NHWC layout, broadcasting 3 values along the last axis
    (4 of 38 ms per frame for `edge` at 256x512, docs/results/int8.md); the Conv takes a fraction
    of a millisecond."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    nodes = list(m.graph.node)
    sub = next((n for n in nodes if n.op_type == "Sub"), None)
    div = next((n for n in nodes if sub is not None and n.op_type == "Div" and n.input[0] == sub.output[0]), None)
    if sub is None or div is None or sum(sub.output[0] in n.input for n in nodes) != 1:
        return None
    mean, std = _constant(m, sub.input[1]), _constant(m, div.input[1])
    if mean is None or std is None or mean.shape != std.shape or mean.ndim not in (3, 4) \
            or mean.shape[-2:] != (1, 1) or (mean.ndim == 4 and mean.shape[0] != 1):
        return None
    c = mean.size
    m.graph.initializer.extend([numpy_helper.from_array((1 / std).reshape(c, 1, 1, 1).astype(np.float32), f"{NORM_CONV}_w"),
                                numpy_helper.from_array((-mean / std).reshape(c).astype(np.float32), f"{NORM_CONV}_b")])
    conv = helper.make_node("Conv", [sub.input[0], f"{NORM_CONV}_w", f"{NORM_CONV}_b"], [div.output[0]],
                            name=NORM_CONV, group=c, kernel_shape=[1, 1])
    nodes = [conv if n is sub else n for n in nodes if n is not div]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    _prune(m)
    return m


def classes_only(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The graph without its `confidence` output: ArgMax over the logits instead of over their
    softmax (the same class, softmax keeps the order), the Softmax and its ReduceMax gone. For a
    service that does not send the confidence map: ONNX Runtime runs every node of a graph whatever
    outputs are asked for, and the full-size Softmax is a fifth of an INT8 frame on a CPU
    (docs/results/int8.md). None where the graph has no such tail."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    nodes = list(m.graph.node)
    soft = [n for n in nodes if n.op_type == "Softmax"]
    users = [n for n in nodes if soft and soft[0].output[0] in n.input]
    if len(soft) != 1 or sorted(n.op_type for n in users) != ["ArgMax", "ReduceMax"] \
            or next(n for n in users if n.op_type == "ReduceMax").output[0] != "confidence" \
            or attr(next(n for n in users if n.op_type == "ArgMax"), "axis") != attr(soft[0], "axis"):
        return None
    argmax = next(n for n in users if n.op_type == "ArgMax")
    argmax.input[0] = soft[0].input[0]
    outputs = [o for o in m.graph.output if o.name != "confidence"]
    del m.graph.output[:]
    m.graph.output.extend(outputs)
    _prune(m)
    return m


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """An initializer's or a Constant node's value, or None."""
    for i in model.graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    node = next((n for n in model.graph.node if n.op_type == "Constant" and n.output[0] == name), None)
    return None if node is None else numpy_helper.to_array(attr(node, "value"))


def attr(node: onnx.NodeProto, name: str):
    """An attribute's value, or None."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _set_axis(model: onnx.ModelProto, node: onnx.NodeProto, axis: int) -> None:
    """Point Softmax/ArgMax (attribute `axis`) or ReduceMax (`axes` attribute or input) at `axis`."""
    for a in node.attribute:
        if a.name == "axis":
            a.i = axis
        elif a.name == "axes":
            del a.ints[:]
            a.ints.append(axis)
    if node.op_type == "ReduceMax" and len(node.input) > 1:  # opset >= 18: axes is an input
        name = f"{node.name or node.output[0]}_axes_last"
        model.graph.initializer.append(numpy_helper.from_array(np.array([axis], np.int64), name))
        node.input[1] = name


def _insert_before(nodes: list, anchor: onnx.NodeProto, new: onnx.NodeProto) -> list:
    i = next(i for i, n in enumerate(nodes) if n is anchor)
    return nodes[:i] + [new] + nodes[i:]


def _prune(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers no graph output depends on (the old sizes computation)."""
    needed = {o.name for o in model.graph.output}
    keep = []
    for n in reversed(model.graph.node):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    del model.graph.node[:]
    model.graph.node.extend(reversed(keep))
    inits = [i for i in model.graph.initializer if i.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
