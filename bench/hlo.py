"""Reads a compiled program's HLO for weights it materialises: any instruction (copy, slice, fusion, transpose,
convert...) whose result has a weight's shape is a second copy of that weight written every call.

Measured on an H100 (bench/NOTES.md): a layer scan over stacked weights made XLA copy every layer's
weights out of the stack each decode step, ~200 copies per step. Programs must read weights where they live.
"""

from __future__ import annotations

import re

import jax

# `%name = bf16[4096,12288]{1,0} opcode(operands...)...`: array-shaped results only (tuples never match).
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = (\w+)\[([0-9,]*)\](?:\{[^}]*\})? ([\w-]+)\((.*)$", re.M)
# A multi-output fusion: `%name = (bf16[4096,1024]{1,0}, bf16[4096,1024]{1,0}) fusion(operands...)...`.
_TUPLE_FUSION = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = \(([^()]*)\) (fusion)\((.*)$", re.M)
_ELEMENT = re.compile(r"(\w+)\[([0-9,]*)\]")
_OPERAND = re.compile(r"%([\w.-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.-]+) .*\{$", re.M)
_FUSED_BODY = re.compile(r"\bfusion\(.*?calls=%([\w.-]+)")
# Ops that only name an existing buffer: they move no bytes.
_ALIASING = {"parameter", "get-tuple-element", "bitcast", "tuple"}


def weight_shapes(params, min_side: int = 8) -> set[tuple[int, ...]]:
    """Shapes (and, for matrices, transposed shapes) of every parameter with at least two axes, each at least
    ``min_side`` long."""
    shapes = set()
    for leaf in jax.tree_util.tree_leaves(params):
        shape = tuple(leaf.shape)
        if len(shape) >= 2 and min(shape) >= min_side:
            shapes.add(shape)
            if len(shape) == 2:
                shapes.add(shape[::-1])
    return shapes


def computations(hlo_text: str) -> dict[str, list[str]]:
    """Each computation's instruction lines, by name (fused bodies, loop bodies and branches, ENTRY)."""
    found, current = {}, None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = found[header.group(1)] = []
        elif current is not None and line.startswith("  "):
            current.append(line)
    return found


def materialised_weights(hlo_text: str, shapes: set[tuple[int, ...]]) -> list[tuple[str, str, str]]:
    """(instruction name, opcode, dtype[shape]) of every instruction that writes a weight-shaped result (or one
    matrix of a stacked weight) from a weight as it arrived (a program parameter, or a loop-carried or bitcast view of one): a second copy of that
    weight made every call. Weight-shaped values computed from other data (masks, iotas) are not weights."""
    # Instructions inside a fusion's body run within that fusion's kernel: only the fusion writes memory.
    fused = set(_FUSED_BODY.findall(hlo_text))
    bodies = re.split(r"^(?=(?:ENTRY )?%[\w.-]+ .*\{$)", hlo_text, flags=re.M)
    unfused = "\n".join(b for b in bodies if (m := _COMPUTATION.match(b)) is None or m.group(1) not in fused)
    instructions = {}
    for name, dtype, dims, opcode, rest in _INSTRUCTION.findall(unfused):
        shape = tuple(int(d) for d in dims.split(",") if d)
        instructions[name] = (opcode, shape, f"{dtype}[{dims}]", _OPERAND.findall(rest))
    # Each output of a multi-output fusion counts as its own result (XLA's one-row dot rewrite writes x * W for
    # two projections from one such fusion, measured on an H200).
    for name, elements, opcode, rest in _TUPLE_FUSION.findall(unfused):
        for i, (dtype, dims) in enumerate(_ELEMENT.findall(elements)):
            shape = tuple(int(d) for d in dims.split(",") if d)
            instructions[f"{name}#{i}"] = (opcode, shape, f"{dtype}[{dims}]", _OPERAND.findall(rest))

    def arrived_weight(name: str) -> bool:
        opcode, shape, _, _ = instructions.get(name, ("", (), "", []))
        return opcode in _ALIASING and shape in shapes

    # A weight's shape, or one matrix of a stack of them (a scan over stacked layers slices these out).
    matrices = {s[-2:] for s in shapes}
    return [(name, opcode, typed) for name, (opcode, shape, typed, operands) in instructions.items()
            if opcode not in _ALIASING and (shape in shapes or shape[-2:] in matrices)
            and any(arrived_weight(o) for o in operands)]


_SLICE_OP = re.compile(r"stablehlo\.(dynamic_slice|slice|gather)\b.*(tensor<([0-9x]+)x\w+>)\s*$", re.M)


def sliced_weight_matrices(stablehlo_text: str, shapes: set[tuple[int, ...]]) -> list[tuple[str, str]]:
    """(op, result type) of every slice or gather in a lowered (not yet optimised) program whose result is one
    weight matrix: what a scan over stacked layers does to its weights, whatever the backend's compiler later
    fuses on one machine and copies on another."""
    matrices = {s[-2:] for s in shapes}
    found = []
    for op, typed, dims in _SLICE_OP.findall(stablehlo_text):
        shape = tuple(int(d) for d in dims.split("x"))
        if len(shape) >= 2 and shape[-2:] in matrices and all(d == 1 for d in shape[:-2]):
            found.append((op, typed))
    return found
