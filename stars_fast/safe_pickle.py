"""Unpickling that cannot execute code: `restricted_load`.

A pickle names the callables that rebuild its objects (`find_class`), and a plain `pickle.load`
imports and calls whatever it names, so any file can run a command when it is read. The unpickler
here resolves only the names in an allow-list -- builtin containers and scalars, numpy arrays,
dtypes and scalars, and (with ``tensors=True``) the helpers a torch tensor is pickled with
(`torch._utils._rebuild_tensor_v2` / `_rebuild_parameter`, and the storage, which `pickle.dump`
writes as `torch.save` bytes that are read back here with ``torch.load(weights_only=True)``).
Every other name raises `pickle.UnpicklingError` naming it, before anything is called.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
from typing import BinaryIO, Callable, Dict, Tuple, Union

import numpy as np

__all__ = ["restricted_load"]


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes (always with 'latin1'); other codecs refused."""
    if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "utf8"):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode(encoding)


def _numpy_globals() -> Dict[Tuple[str, str], Callable]:
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:
        from numpy.core import multiarray, numeric

    names = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):  # old pickles (CIFAR's) name numpy.core, numpy 2 numpy._core
        names[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        names[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        names[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return names


# the builtins that pickles name as globals (protocol 2 writes sets, b'' and complex numbers this way)
_BUILTIN_GLOBALS: Dict[Tuple[str, str], Callable] = {("builtins", kind.__name__): kind for kind in (
    set, frozenset, bytes, bytearray, complex, slice, range)}
_BUILTIN_GLOBALS.update({("collections", "OrderedDict"): collections.OrderedDict,
                         ("_codecs", "encode"): _latin1_encode, ("codecs", "encode"): _latin1_encode})


def _storage_from_bytes(data: bytes):
    """What `torch.storage._load_from_bytes` does, but through torch's weights-only unpickler, on the CPU."""
    import torch

    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError(f"a pickled torch storage must be bytes, got {type(data).__name__}")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _tensor_globals() -> Dict[Tuple[str, str], Callable]:
    import torch._utils

    return {("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
            ("torch.storage", "_load_from_bytes"): _storage_from_bytes}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, allowed: Dict[Tuple[str, str], Callable]):
        super().__init__(file, encoding="latin1")  # latin1: Python 2 pickles (CIFAR) keep numpy's raw bytes
        self._allowed = allowed

    def find_class(self, module: str, name: str):
        # Python 2 names (__builtin__.set, ...) mapped as pickle.Unpickler.find_class maps them
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}: only builtin containers, "
                                         f"numpy arrays and torch tensors may appear in this file") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"refused persistent id {pid!r}")


def restricted_load(file_or_path: Union[str, os.PathLike, BinaryIO], *, tensors: bool = False) -> object:
    """Unpickle `file_or_path` admitting only builtin containers/scalars, numpy arrays/dtypes/scalars and,
    with `tensors=True`, CPU torch tensors. Raises `pickle.UnpicklingError` for a refused global (named in the
    message) and for a file that is not a valid pickle; nothing from the file is ever executed."""
    allowed = dict(_BUILTIN_GLOBALS)
    allowed.update(_numpy_globals())
    if tensors:
        allowed.update(_tensor_globals())
    if isinstance(file_or_path, (str, os.PathLike)):
        with open(file_or_path, "rb") as f:
            return _load(f, allowed, os.fspath(file_or_path))
    return _load(file_or_path, allowed, getattr(file_or_path, "name", "<stream>"))


def _load(f: BinaryIO, allowed, where: str) -> object:
    try:
        return _RestrictedUnpickler(f, allowed).load()
    except pickle.UnpicklingError:
        raise
    except Exception as error:  # truncated or garbage bytes raise EOFError, ValueError, KeyError, ...
        raise pickle.UnpicklingError(f"{where} is not a valid pickle ({type(error).__name__}: {error})") from None
