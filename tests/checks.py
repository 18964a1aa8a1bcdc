"""Checks shared by the tests: closeness that states what it claims, and skips that CI turns into failures.

Two computations of the same quantity in different orders (another batch composition or chunking, another code
path, another CPU's vector width) agree only to float32 accumulation order. Element by element that can be far from
eps: an element that is a small difference of large terms (a gradient entry, a pixel after several sampler steps)
keeps only the digits the cancellation left it. What such code claims is that the *whole* result is the same
quantity, so compare it as one vector: ||actual - expected|| / ||expected|| <= rtol (`assert_relative_close`).
Bit-exact equality (`torch.equal`) stays where the claim is bit-exactness: the same computation run again (same
seed, same batch, same thread count), save/load round trips, a resumed run in the same process.

Skips: on a developer's machine a missing optional part (ComfyUI, Chromium, `datasets`) skips the tests that need
it; with CI set (CI=1, as .ci/run sets it) it fails them (`require_or_skip`), so that CI cannot pass by skipping.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Mapping

import numpy as np
import pytest
import torch


def in_ci() -> bool:
    """True where the environment variable CI is set to anything but '', 0, false or no."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_or_skip(condition: object, reason: str) -> None:
    """Skip the test when `condition` is false, or fail it under CI: CI must have every part the suite tests."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"{reason} [CI is set: a missing part is a failure, not a skip]", pytrace=False)
    pytest.skip(reason)


def import_or_skip(module: str, reason: str):
    """`pytest.importorskip` that fails under CI."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        require_or_skip(False, f"{reason} ({error})")


def _as_vector(value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().to(torch.float64).flatten()
    return torch.as_tensor(np.asarray(value, dtype=np.float64)).flatten()


def _vectors(actual: object, expected: object, what: str) -> tuple[torch.Tensor, torch.Tensor, list[tuple]]:
    """Both sides as float64 vectors (a mapping as the concatenation of its values in key order), checking that the
    shapes (and keys) agree, and the (key, start, end) spans of a mapping's entries."""
    if isinstance(expected, Mapping) or isinstance(actual, Mapping):
        assert isinstance(actual, Mapping) and isinstance(expected, Mapping), f"{what}: a mapping and a non-mapping"
        assert actual.keys() == expected.keys(), f"{what}: keys differ: {sorted(set(actual) ^ set(expected))}"
        spans, parts_actual, parts_expected, start = [], [], [], 0
        for key in sorted(expected):
            a, e = _vectors(actual[key], expected[key], f"{what}[{key}]")[:2]
            spans.append((key, start, start + len(e)))
            start += len(e)
            parts_actual.append(a)
            parts_expected.append(e)
        return torch.cat(parts_actual), torch.cat(parts_expected), spans
    shape_a, shape_e = tuple(np.shape(actual)), tuple(np.shape(expected))
    assert shape_a == shape_e, f"{what}: shapes differ: {shape_a} vs {shape_e}"
    return _as_vector(actual), _as_vector(expected), []


def relative_error(actual: object, expected: object) -> float:
    """||actual - expected|| / ||expected|| (2-norms over all elements, in float64); 0 when both are 0."""
    a, e = _vectors(actual, expected, "relative_error")[:2]
    difference, reference = float(torch.linalg.vector_norm(a - e)), float(torch.linalg.vector_norm(e))
    if reference == 0:
        return 0.0 if difference == 0 else math.inf
    return difference / reference


def assert_relative_close(actual: object, expected: object, rtol: float, what: str) -> None:
    """Assert that `actual` is `expected` as a whole: ||actual - expected|| / ||expected|| <= rtol, the norms over
    every element (a mapping of tensors, e.g. per-parameter gradients, counts as one vector). Tensors, arrays and
    lists of numbers; compared in float64, shapes (and keys) must agree exactly.

    Set GANRM_TOLERANCE_LOG=file to append each check's measured error to that file (JSON lines): how far from
    its tolerance a machine runs."""
    a, e, spans = _vectors(actual, expected, what)
    error = relative_error(a, e)
    if log := os.environ.get("GANRM_TOLERANCE_LOG"):
        with open(log, "a") as stream:
            stream.write(json.dumps({"what": what, "relative_error": error, "rtol": rtol}) + "\n")
    assert not (torch.isnan(a).any() or torch.isnan(e).any()), f"{what}: NaN in the compared values"
    if error <= rtol:
        return
    worst = int((a - e).abs().argmax())
    where = f"element {worst}"
    for key, start, end in spans:
        if start <= worst < end:
            where = f"{key!r} element {worst - start}"
    raise AssertionError(
        f"{what}: relative error {error:.3g} > {rtol:g} (||actual - expected|| = "
        f"{float(torch.linalg.vector_norm(a - e)):.4g}, ||expected|| = {float(torch.linalg.vector_norm(e)):.4g}; "
        f"largest difference at {where}: {float(a[worst]):.6g} vs {float(e[worst]):.6g})"
    )
