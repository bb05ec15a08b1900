"""Elementwise operators: add, mul, neg, relu, exp, tensor-by-scalar mul/div, and the
broadcasting add of a bias or an additive attention mask."""
from __future__ import annotations

import operator

import torch

from ..errors import ShapeError
from . import onnx_spellings as ox
from . import spellings as sp
from .base import FxForm, OnnxForm, OpDef, numel_int, register, same_shape

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

def _badd_infer(shapes, dtypes, attrs):
    x, b = shapes
    if len(b) > len(x):
        raise ShapeError(f"badd: the addend has rank {len(b)} > {len(x)}")
    for dx, db in zip(reversed(x), reversed(b)):
        if db != dx and not (db.is_const and db.const == 1):
            raise ShapeError(f"badd: the addend's shape {tuple(b)} does not broadcast to {tuple(x)}")
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

smul = register(OpDef(
    name="smul", arity=2, algebraic=True, scalar_operand=1,
    doc="Tensor times a scalar (a 0-d tensor).",
    infer=_by_scalar("smul"),
    compute=lambda dom, x, a: [dom.mod(x[0] * x[1])],
    lower=lambda t, a: [t[0] * t[1]],
    flops=_elementwise_flops(1),
    enum_attrs=lambda shapes: [{}],
    fx=(FxForm((operator.mul, torch.mul, "method:mul", aten.mul.Tensor), sp.tensor_by_scalar(True)),),
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
                aten.div.Tensor), sp.tensor_by_scalar(False)),),
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
