"""Input checks shared by the statistics modules, and their error class."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ml.errors import OncopacsError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class StatsError(OncopacsError):
    """Data handed to an evaluation statistic cannot give a defined result."""


def binary_outcome(y: npt.ArrayLike, name: str = "y", *, both_classes: bool = True) -> IntArray:
    """Return ``y`` as a 1-D int64 array of 0/1 outcomes.

    Parameters
    ----------
    y : array_like
        Outcomes; booleans or the integers 0 and 1.
    name : str
        Name used in error messages.
    both_classes : bool
        Require at least one event and one non-event.

    Returns
    -------
    numpy.ndarray
        The outcomes as int64.

    Raises
    ------
    StatsError
        If ``y`` is not 1-D, is empty, holds values other than 0/1, or (with
        ``both_classes``) holds one class only.
    """
    arr = np.asarray(y)
    if arr.ndim != 1 or arr.size == 0:
        raise StatsError(f"outcome {name!r} must be a non-empty 1-D array, got shape {arr.shape}")
    if arr.dtype == bool:
        out = arr.astype(np.int64)
    else:
        if not np.issubdtype(arr.dtype, np.number):
            raise StatsError(f"outcome {name!r} has dtype {arr.dtype}, expected 0/1 numbers")
        bad = np.flatnonzero((arr != 0) & (arr != 1))
        if bad.size:
            raise StatsError(f"outcome {name!r} has {bad.size} values other than 0/1 "
                             f"(first {arr[bad[0]]!r} at index {bad[0]})")
        out = arr.astype(np.int64)
    if both_classes:
        n_pos = int(out.sum())
        if n_pos in (0, out.size):
            raise StatsError(f"outcome {name!r} has {n_pos} events out of {out.size}: "
                             "both classes are needed")
    return out


def finite_scores(score: npt.ArrayLike, n: int, name: str = "score") -> FloatArray:
    """Return ``score`` as a 1-D float64 array of ``n`` finite values.

    Parameters
    ----------
    score : array_like
        Model outputs, one per case.
    n : int
        Number of cases the scores must cover.
    name : str
        Name used in error messages.

    Returns
    -------
    numpy.ndarray
        The scores as float64.

    Raises
    ------
    StatsError
        If the shape is not ``(n,)`` or a value is NaN or infinite.
    """
    arr = np.asarray(score, dtype=np.float64)
    if arr.shape != (n,):
        raise StatsError(f"{name!r} has shape {arr.shape}, expected ({n},) to match the outcomes")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise StatsError(f"{name!r} has {bad.size} non-finite values (first at index {bad[0]})")
    return arr


def probabilities(prob: npt.ArrayLike, n: int, name: str = "prob") -> FloatArray:
    """Return ``prob`` as finite float64 values in [0, 1].

    Parameters
    ----------
    prob : array_like
        Predicted probabilities, one per case.
    n : int
        Number of cases.
    name : str
        Name used in error messages.

    Returns
    -------
    numpy.ndarray
        The probabilities as float64.

    Raises
    ------
    StatsError
        If the shape is wrong, a value is not finite, or a value lies outside [0, 1].
    """
    arr = finite_scores(prob, n, name)
    bad = np.flatnonzero((arr < 0.0) | (arr > 1.0))
    if bad.size:
        raise StatsError(f"{name!r} has {bad.size} values outside [0, 1] "
                         f"(first {arr[bad[0]]!r} at index {bad[0]})")
    return arr
