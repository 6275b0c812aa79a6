"""Independent references in float64 (NumPy), inputs exact in every element type, poisoning,
and bf16 bit conversions (NumPy has no bf16: it travels as uint16 bits)."""

from __future__ import annotations

import numpy as np

import symmcomm as sc

#: NumPy types of the element types (bf16 as its uint16 bits).
NP = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16, "i32": np.int32, "u8": np.uint8}
FLOATS = ("f32", "f16", "bf16")


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float64 values (exact in bf16) as bf16 bit patterns (round to nearest even)."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32).astype(
        np.float64
    )


def as_f64(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bf16":
        return from_bf16_bits(a)
    return np.asarray(a, dtype=np.float64)


def from_f64(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bf16":
        return to_bf16_bits(x)
    return np.asarray(x).astype(NP[dtype])


def values(rng: np.random.Generator, shape, dtype: str) -> np.ndarray:
    """Random float64 values exact in `dtype` (small multiples of 1/8 for floats, so sums over a
    few ranks stay exact; never all zero)."""
    if dtype in FLOATS:
        return rng.integers(-64, 65, size=shape).astype(np.float64) / 8.0
    if dtype == "u8":
        return rng.integers(0, 256, size=shape).astype(np.float64)
    return rng.integers(-(2**20), 2**20, size=shape).astype(np.float64)


def poison(a: np.ndarray, dtype: str) -> None:
    """Fill an output so that any element a collective leaves unwritten fails the comparison."""
    if dtype in ("f32", "f16"):
        a[...] = np.nan
    elif dtype == "bf16":
        a[...] = 0x7FC0  # NaN
    else:
        a[...] = np.iinfo(a.dtype).max // 3 + 7


def reduce_ref(stack: np.ndarray, op: str) -> np.ndarray:
    """`op` over axis 0 in float64."""
    if op == "sum":
        return stack.sum(axis=0)
    if op == "avg":
        return stack.mean(axis=0)
    if op == "max":
        return stack.max(axis=0)
    if op == "min":
        return stack.min(axis=0)
    raise ValueError(op)


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """`x` rounded to `dtype` and back to float64 (the reference as the output holds it)."""
    return as_f64(from_f64(x, dtype), dtype)


def assert_close(got: np.ndarray, want: np.ndarray, dtype: str, terms: int = 1) -> None:
    """Equal up to the rounding of `terms` partial results to `dtype` (exact inputs: sums of a
    few small multiples of 1/8 are exact in every type but avg's division)."""
    eps = {"f32": 2.0**-23, "f16": 2.0**-10, "bf16": 2.0**-7}.get(dtype, 0.0)
    tol = (terms + 1) * eps * np.maximum(np.abs(want), 1.0)
    assert got.shape == want.shape, (got.shape, want.shape)
    bad = ~(np.abs(got - want) <= tol)
    if bad.any():
        i = np.flatnonzero(bad.reshape(-1))[0]
        raise AssertionError(
            f"{bad.sum()} of {bad.size} elements differ; first at {i}: got "
            f"{got.reshape(-1)[i]}, want {want.reshape(-1)[i]}"
        )


def array(group, shape, dtype: str, where: str) -> np.ndarray:
    """An array of `dtype` in `group`'s windows (``symm``) or plain NumPy memory (``plain``)."""
    if where == "symm":
        a = sc.empty(group, shape, dtype)
        assert group.lookup(a.__array_interface__["data"][0]) is not None
        return a
    return np.empty(shape, dtype=NP[dtype])


def add_rmsnorm_ref(inputs, residual: np.ndarray, weight: np.ndarray, eps: float, dtype: str,
                    first_row: int = 0):
    """The collective + residual add + RMSNorm in float64, rounded where the library rounds:
    every rank's `inputs` ``[T, H]`` summed and rounded to `dtype` (the collective's result),
    rows ``first_row ..`` of it added to `residual` and rounded (the new residual), then each
    row divided by its root mean square (``sqrt(mean(r**2) + eps)``) and scaled by `weight`.
    Returns ``(residual_out, normed)`` in float64 (normed not rounded: the comparison's
    tolerance holds its one rounding)."""
    rows = residual.shape[0]
    total = rounded(np.sum(inputs, axis=0)[first_row : first_row + rows], dtype)
    r = rounded(residual + total, dtype)
    rms = np.sqrt(np.mean(r * r, axis=-1, keepdims=True) + float(np.float32(eps)))
    return r, r / rms * weight


def assert_norm_close(got: np.ndarray, want: np.ndarray, dtype: str, terms: int = 1) -> None:
    """Equal to the RMSNorm reference up to `terms` roundings to `dtype`, relative to each
    element (a wrong scale of a row fails even where its values are small)."""
    eps = {"f32": 2.0**-23, "f16": 2.0**-10, "bf16": 2.0**-7}[dtype]
    tol = (terms + 1) * eps * np.abs(want) + 2.0**-24
    assert got.shape == want.shape, (got.shape, want.shape)
    bad = ~(np.abs(got - want) <= tol)
    if bad.any():
        i = np.flatnonzero(bad.reshape(-1))[0]
        raise AssertionError(
            f"{bad.sum()} of {bad.size} elements differ; first at {i}: got "
            f"{got.reshape(-1)[i]}, want {want.reshape(-1)[i]}"
        )
