"""Elementwise operators: add, mul, neg, relu, exp, tanh, tensor-by-scalar add/mul/div,
integer powers, the broadcasting add of a bias or an additive attention mask, and
the tanh approximation of GELU."""
from __future__ import annotations

import operator

import numpy as np
import torch

from ..dims import Dim
from ..errors import ShapeError
from . import onnx_spellings as ox
from . import spellings as sp
from .base import AttrSpec, FxForm, OnnxForm, OpDef, numel_int, register, same_shape

aten = torch.ops.aten


def _same(name):
    def infer(shapes, dtypes, attrs):
        return [(same_shape(name, shapes), dtypes[0])]
    return infer


def _by_scalar(name):
    def infer(shapes, dtypes, attrs):
        if len(shapes[1]) != 0:
            raise ShapeError(f"{name}: second input must be a scalar (shape ()), got rank {len(shapes[1])}")
        return [(shapes[0], dtypes[0])]
    return infer


def _elementwise_flops(per_element):
    return lambda ins, outs, attrs: per_element * numel_int(outs[0])


add = register(OpDef(
    name="add", arity=2, commutative=True, algebraic=True,
    doc="Elementwise sum of two tensors of the same shape.",
    infer=_same("add"),
    compute=lambda dom, x, a: [dom.mod(x[0] + x[1])],
    lower=lambda t, a: [t[0] + t[1]],
    flops=_elementwise_flops(1),
    enum_attrs=lambda shapes: [{}],
    fx=(FxForm((operator.add, torch.add, "method:add", aten.add.Tensor), sp.binary_tensors),),
    onnx=(OnnxForm("Add", ox.same_shapes),),
    to_onnx=ox.node("Add"),
))

mul = register(OpDef(
    name="mul", arity=2, commutative=True, algebraic=True,
    doc="Elementwise product of two tensors of the same shape.",
    infer=_same("mul"),
    compute=lambda dom, x, a: [dom.mod(x[0] * x[1])],
    lower=lambda t, a: [t[0] * t[1]],
    flops=_elementwise_flops(1),
    enum_attrs=lambda shapes: [{}],
    fx=(FxForm((operator.mul, torch.mul, "method:mul", aten.mul.Tensor), sp.binary_tensors),),
    onnx=(OnnxForm("Mul", ox.same_shapes),),
    to_onnx=ox.node("Mul"),
))

def _onto_first(name):
    """Shape inference of ``x (op) b`` where b broadcasts to x: x's shape."""
    return lambda shapes, dtypes, attrs: _badd_infer(shapes, dtypes, attrs, name)


def _badd_infer(shapes, dtypes, attrs, name="badd"):
    x, b = shapes
    if len(b) > len(x):
        raise ShapeError(f"{name}: the second operand has rank {len(b)} > {len(x)}")
    for dx, db in zip(reversed(x), reversed(b)):
        if db != dx and not (db.is_const and db.const == 1):
            raise ShapeError(f"{name}: the second operand's shape {tuple(b)} does not broadcast to {tuple(x)}")
    return [(x, dtypes[0])]


badd = register(OpDef(
    name="badd", arity=2, algebraic=True,
    doc="x + b where b broadcasts to x's shape (a bias, or an additive attention mask).",
    infer=_badd_infer,
    compute=lambda dom, x, a: [dom.mod(x[0] + x[1])],
    lower=lambda t, a: [t[0] + t[1]],
    flops=_elementwise_flops(1),
    fx=(FxForm((operator.add, torch.add, "method:add", aten.add.Tensor), sp.broadcast_add),
        FxForm((torch.where, "method:where", aten.where.self, aten.where.ScalarOther), sp.where_as_mask),
        FxForm(("method:masked_fill", torch.masked_fill, aten.masked_fill.Scalar, aten.masked_fill.Tensor),
               sp.masked_fill_as_mask)),
    onnx=(OnnxForm("Add", ox.broadcast),),
    to_onnx=ox.node("Add"),
))

bmul = register(OpDef(
    name="bmul", arity=2, algebraic=True,
    doc="x * b where b broadcasts to x's shape (a per-row rescaling of an attention output).  "
        "Not enumerated.",
    infer=_onto_first("bmul"),
    compute=lambda dom, x, a: [dom.mod(x[0] * x[1])],
    lower=lambda t, a: [t[0] * t[1]],
    flops=_elementwise_flops(1),
    fx=(FxForm((operator.mul, torch.mul, "method:mul", aten.mul.Tensor), sp.broadcast_mul),),
    to_onnx=ox.node("Mul"),
))

bsub = register(OpDef(
    name="bsub", arity=2, algebraic=True,
    doc="x - b where b broadcasts to x's shape (the row maximum taken off the scores before a "
        "softmax, a mean taken off in a norm).  Not enumerated.",
    infer=_onto_first("bsub"),
    compute=lambda dom, x, a: [dom.mod(x[0] - x[1])],
    lower=lambda t, a: [t[0] - t[1]],
    flops=_elementwise_flops(1),
    fx=(FxForm((operator.sub, torch.sub, "method:sub", aten.sub.Tensor), sp.broadcast_sub),),
    to_onnx=ox.node("Sub"),
))


def _bcast_infer(shapes, dtypes, attrs):
    a, b = shapes
    out = []
    for k in range(max(len(a), len(b))):
        da = a[len(a) - 1 - k] if k < len(a) else Dim.of(1)
        db = b[len(b) - 1 - k] if k < len(b) else Dim.of(1)
        if da != db and da != 1 and db != 1:
            raise ShapeError(f"bcast_add: shapes {a} and {b} do not broadcast")
        out.append(db if da == 1 else da)
    return [(tuple(reversed(out)), dtypes[0])]


bcast_add = register(OpDef(
    name="bcast_add", arity=2, commutative=True, algebraic=True,
    doc="The sum of two tensors that broadcast against each other (numpy's rule, both ways): "
        "two attention masks (a per-head position bias and a per-query mask) made one.",
    infer=_bcast_infer,
    compute=lambda dom, x, a: [dom.mod(x[0] + x[1])],
    lower=lambda t, a: [t[0] + t[1]],
    flops=_elementwise_flops(1),
    to_onnx=ox.node("Add"),
))

smul = register(OpDef(
    name="smul", arity=2, algebraic=True, scalar_operand=1,
    doc="Tensor times a scalar (a 0-d tensor).",
    infer=_by_scalar("smul"),
    compute=lambda dom, x, a: [dom.mod(x[0] * x[1])],
    lower=lambda t, a: [t[0] * t[1]],
    flops=_elementwise_flops(1),
    enum_attrs=lambda shapes: [{}],
    fx=(FxForm((operator.mul, torch.mul, "method:mul", aten.mul.Tensor, aten.mul.Scalar), sp.tensor_by_scalar(True)),
        FxForm((operator.imul, "method:mul_", aten.mul_.Tensor, aten.mul_.Scalar), sp.in_place_by_scalar(False))),
    onnx=(OnnxForm("Mul", ox.by_scalar(True)),),
    to_onnx=ox.node("Mul"),
))

sdiv = register(OpDef(
    name="sdiv", arity=2, algebraic=True, scalar_operand=1,
    doc="Tensor divided by a scalar (a 0-d tensor).",
    infer=_by_scalar("sdiv"),
    compute=lambda dom, x, a: [dom.mod(x[0] * dom.recip(x[1]))],
    lower=lambda t, a: [t[0] / t[1]],
    flops=_elementwise_flops(1),
    enum_attrs=lambda shapes: [{}],
    fx=(FxForm((operator.truediv, torch.div, torch.true_divide, "method:div", "method:true_divide",
                aten.div.Tensor), sp.tensor_by_scalar(False)),
        FxForm((operator.itruediv, "method:div_", aten.div_.Tensor, aten.div_.Scalar), sp.in_place_by_scalar(False))),
    onnx=(OnnxForm("Div", ox.by_scalar(False)),),
    to_onnx=ox.node("Div"),
))

neg = register(OpDef(
    name="neg", arity=1, algebraic=True,
    doc="Elementwise negation.",
    infer=_same("neg"),
    compute=lambda dom, x, a: [dom.mod(-x[0])],
    lower=lambda t, a: [-t[0]],
    flops=_elementwise_flops(1),
    enum_attrs=lambda shapes: [{}],
    fx=(FxForm((operator.neg, torch.neg, "method:neg", aten.neg.default), sp.unary),),
    onnx=(OnnxForm("Neg", ox.unary),),
    to_onnx=ox.node("Neg"),
))

relu = register(OpDef(
    name="relu", arity=1, algebraic=False,
    doc="Elementwise max(x, 0).  Fingerprint surrogate x(x+1)+1 (TASO).",
    infer=_same("relu"),
    compute=lambda dom, x, a: [dom.relu(x[0])],
    lower=lambda t, a: [torch.relu(t[0])],
    flops=_elementwise_flops(1),
    enum_attrs=lambda shapes: [{}],
    fx=(FxForm((torch.relu, torch.nn.functional.relu, "method:relu", aten.relu.default), sp.unary),),
    onnx=(OnnxForm("Relu", ox.unary),),
    to_onnx=ox.node("Relu"),
))

exp = register(OpDef(
    name="exp", arity=1, algebraic=False,
    doc="Elementwise e**x.  Fingerprint surrogate 3x^2+5x+7.",
    infer=_same("exp"),
    compute=lambda dom, x, a: [dom.exp(x[0])],
    lower=lambda t, a: [torch.exp(t[0])],
    flops=_elementwise_flops(1),
    enum_attrs=lambda shapes: [{}],
    fx=(FxForm((torch.exp, "method:exp", aten.exp.default), sp.unary),),
    onnx=(OnnxForm("Exp", ox.unary),),
    to_onnx=ox.node("Exp"),
))


sadd = register(OpDef(
    name="sadd", arity=2, algebraic=True, scalar_operand=1,
    doc="Tensor plus a scalar (a 0-d tensor).",
    infer=_by_scalar("sadd"),
    compute=lambda dom, x, a: [dom.mod(x[0] + x[1])],
    lower=lambda t, a: [t[0] + t[1]],
    flops=_elementwise_flops(1),
    fx=(FxForm((operator.add, torch.add, "method:add", aten.add.Tensor, aten.add.Scalar),
               sp.tensor_by_scalar(True)),),
    onnx=(OnnxForm("Add", ox.by_scalar(True)),),
    to_onnx=ox.node("Add"),
))


def _smax_compute(dom, x, a):
    """max(x, s) = relu(x - s) + s: exact in the float domain, the relu surrogate elsewhere."""
    if dom.name == "float":
        return [np.maximum(x[0], x[1])]
    return [dom.mod(dom.relu(dom.mod(x[0] - x[1])) + x[1])]


smax = register(OpDef(
    name="smax", arity=2, algebraic=False, scalar_operand=1,
    doc="The larger of each entry and a scalar (``torch.max(x, s)``, ``torch.maximum``): XGLM "
        "clamps its masked scores at the dtype's lowest value.",
    infer=_by_scalar("smax"),
    compute=_smax_compute,
    lower=lambda t, a: [torch.maximum(t[0], t[1])],
    flops=_elementwise_flops(1),
    fx=(FxForm((torch.max, torch.maximum, "method:maximum", aten.maximum.default, aten.max.other),
               sp.tensor_and_scalar_tensor),),
    to_onnx=ox.node("Max"),
))


def _spow_compute(dom, x, a):
    out = x[0]
    for _ in range(a["exponent"] - 1):
        out = dom.mod(out * x[0])
    return [out]


spow = register(OpDef(
    name="spow", arity=1, algebraic=True,
    doc="x ** n for a small integer n >= 2 (x * x * ... exactly).",
    attrs={"exponent": AttrSpec("int", 2)},
    infer=_same("spow"),
    compute=_spow_compute,
    lower=lambda t, a: [torch.pow(t[0], float(a["exponent"]))],
    flops=lambda ins, outs, a: (a["exponent"] - 1) * numel_int(outs[0]),
    fx=(FxForm((torch.pow, operator.pow, "method:pow", aten.pow.Tensor_Scalar), sp.integer_power),),
    onnx=(OnnxForm("Pow", ox.integer_power),),
    to_onnx=ox.emit_pow,
))

tanh = register(OpDef(
    name="tanh", arity=1, algebraic=False,
    doc="Elementwise tanh.  Fingerprint surrogate 5x^2+2x+11.",
    infer=_same("tanh"),
    compute=lambda dom, x, a: [dom.tanh(x[0])],
    lower=lambda t, a: [torch.tanh(t[0])],
    flops=_elementwise_flops(1),
    fx=(FxForm((torch.tanh, "method:tanh", aten.tanh.default), sp.unary),),
    onnx=(OnnxForm("Tanh", ox.unary),),
    to_onnx=ox.node("Tanh"),
))

def _sigmoid_compute(dom, x, a):
    if dom.name == "float":
        with np.errstate(over="ignore"):
            return [1.0 / (1.0 + np.exp(-x[0]))]
    return [dom.mod(dom.recip(dom.mod(1 + dom.exp(dom.mod(-x[0])))))]   # surrogate: 1 / (1 + exp~(-x))


sigmoid = register(OpDef(
    name="sigmoid", arity=1, algebraic=False,
    doc="Elementwise 1 / (1 + e**-x).  Fingerprint: the same through the exp surrogate.",
    infer=_same("sigmoid"),
    compute=_sigmoid_compute,
    lower=lambda t, a: [torch.sigmoid(t[0])],
    flops=_elementwise_flops(4),
    fx=(FxForm((torch.sigmoid, "method:sigmoid", aten.sigmoid.default, torch.nn.functional.sigmoid), sp.unary),),
    onnx=(OnnxForm("Sigmoid", ox.unary),),
    to_onnx=ox.node("Sigmoid"),
))

GELU_A = 0.7978845608028654  # sqrt(2 / pi)
GELU_B = 0.044715


def _gelu_tanh_compute(dom, x, a):
    if dom.name != "float":  # no exact meaning: a surrogate that is neither tanh's nor exp's
        return [dom.mod(dom.tanh(x[0]) * x[0])]
    t = x[0]
    return [0.5 * t * (1.0 + np.tanh(GELU_A * (t + GELU_B * t ** 3)))]


gelu_tanh = register(OpDef(
    name="gelu_tanh", arity=1, algebraic=False,
    doc="GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), one kernel.",
    infer=_same("gelu_tanh"),
    compute=_gelu_tanh_compute,
    lower=lambda t, a: [torch.nn.functional.gelu(t[0], approximate="tanh")],
    flops=_elementwise_flops(8),
    fx=(FxForm((torch.nn.functional.gelu, aten.gelu.default), sp.gelu_tanh),),
    onnx=(OnnxForm("Gelu", ox.gelu_tanh),),
    to_onnx=ox.emit_gelu_tanh,
))
