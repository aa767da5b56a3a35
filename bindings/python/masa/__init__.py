"""masa: Python binding of libmasa (Matrix Atom Sharing in Attention).

Pure Python over ctypes; the shared library is found and loaded on first use
(see masa._lib for the lookup order). ``import masa`` needs only numpy;
``import masa.torch`` adds the PyTorch modules.

    import numpy as np, masa
    ctx = masa.Context()
    atoms = masa.Dictionary(ctx, 2, 64, 64).init_uniform(seed=1)
    coef = masa.Coefficients(ctx, 6, 2).init_cyclic()
    layer = masa.Layer(ctx, d_model=64, n_heads=4, causal=True)
    for p in "qkvo":
        layer.set_masa(p, atoms, coef, layer_index=0)
    y, reserve = layer.forward(np.random.rand(2, 8, 64).astype(np.float32), training=True)
    dx, grads = layer.backward(np.ones_like(y), reserve)
"""

from ._lib import EXPECTED_MAJOR, EXPECTED_MINOR, MAX_POSITION
from .core import (
    Coefficients,
    Context,
    Dictionary,
    Projection,
    blis_arch,
    default_context,
    last_error,
    library_path,
    status_string,
    version,
    version_number,
)
from .errors import (
    BadShapeError,
    BadStructSizeError,
    BufferTooSmallError,
    BadFormatError,
    ClosedHandleError,
    FileIOError,
    HandleInUseError,
    InternalError,
    InvalidArgumentError,
    LibraryError,
    LibraryNotFoundError,
    LibraryVersionError,
    MasaError,
    NotFoundError,
    NotReadyError,
    NullArgumentError,
    OutOfMemoryError,
    OutOfRangeError,
    SizeOverflowError,
    ThreadError,
)
from .decode import KVCache
from .layer import Layer, Reserve, WeightPolicy

__version__ = "0.2.0"
# The C API version this binding was written for.
__c_api_version__ = f"{EXPECTED_MAJOR}.{EXPECTED_MINOR}"

Q, K, V, O = Projection.Q, Projection.K, Projection.V, Projection.O

__all__ = [
    "BadShapeError", "BadStructSizeError", "BufferTooSmallError", "ClosedHandleError",
    "Coefficients", "Context", "Dictionary", "HandleInUseError", "InternalError",
    "InvalidArgumentError", "KVCache", "Layer", "LibraryError", "LibraryNotFoundError",
    "LibraryVersionError", "MAX_POSITION", "MasaError", "BadFormatError", "FileIOError",
    "NotFoundError",
    "NotReadyError", "NullArgumentError", "O", "OutOfMemoryError", "OutOfRangeError",
    "Projection", "Q", "K", "Reserve", "SizeOverflowError", "ThreadError", "V",
    "blis_arch", "default_context", "last_error", "library_path", "status_string",
    "version", "version_number", "WeightPolicy",
]
