"""The package's vocabulary: every file name, dtype table, size constant and the pickle allowlists'
table of global names has its home here, and nowhere else. Plain strings and ints (no torch), so that
reading a manifest or a sidecar needs no torch; modules that work on tensors build their
``torch.dtype`` tables from these names."""
from __future__ import annotations

from types import MappingProxyType

# -- file names --------------------------------------------------------------------------------
MANIFEST_FILE = "export_manifest.json"  # the proof inside every snapshot
SINGLE_FILE = "model.safetensors"  # a snapshot of one shard (transformers' name)
INDEX_FILE = "model.safetensors.index.json"  # a sharded snapshot's weight map (transformers' name)
SIDECAR_SUFFIX = ".fingerprints.json"  # FingerprintHook's record beside a checkpoint: <checkpoint><suffix>

# -- digests ---------------------------------------------------------------------------------------
# the first tensor digest version: what a record that names no algorithm was made with (the current
# version and its chunk size live in core/fingerprint.py)
DIGEST_V1 = "xxh3_128(name,dtype,shape,bytes);v1"

# -- safetensors ---------------------------------------------------------------------------------
SHARD_METADATA = MappingProxyType({"format": "pt"})  # what transformers writes and expects in a header
# torch's dtype names (``str(dtype)`` without "torch.") -> safetensors' dtype codes (the format's spec):
# the dtypes the writer can store
SAFETENSORS_CODES = MappingProxyType({
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"})
STORABLE_DTYPES = frozenset(SAFETENSORS_CODES)

# -- export dtypes ---------------------------------------------------------------------------------
# the spellings ``dtype=`` accepts -> torch's dtype name; "auto"/"none"/"keep" keep the in-memory dtype
EXPORT_DTYPES = MappingProxyType({"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
                                  "half": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16"})
KEEP_DTYPE = ("auto", "none", "keep")
SHORT_DTYPE_NAMES = MappingProxyType({"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"})

# -- sizes -------------------------------------------------------------------------------------------
CHUNK_ELEMENTS = 1 << 24  # fp64 working copies (statistics, checks, norms) stay at 128 MiB for any tensor
FLUSH_EVERY_BYTES = 256 << 20  # a shard writer hands its bytes to the kernel (and to a background fsync) this often

# -- dependencies ------------------------------------------------------------------------------------
# setup.py's ``deepspeed`` extra: 0.19 removed deepspeed.runtime.fp16.onebit, which mmengine 0.10.x imports
DEEPSPEED_REQUIREMENT = "deepspeed>=0.18.9,<0.19"

# -- pickle allowlists -------------------------------------------------------------------------------
# What an mmengine (+ DeepSpeed) checkpoint pickles besides tensors, by global name (``module.name``, as a
# pickle names it). One table for the two allowlists, which must agree: torch's ``weights_only`` safe globals
# (``compat.py``, for resume) resolve these names to the real classes; our restricted unpickler
# (``offline/restricted_pickle.py``, for conversion) resolves the bookkeeping classes to placeholders that
# run none of their code. Every entry is a plain data holder.
MMENGINE_PICKLE_GLOBALS = ("mmengine.logging.history_buffer.HistoryBuffer",  # message_hub's logged scalars
                           "mmengine.config.config.ConfigDict")  # the DeepSpeed config in the client state
# DeepSpeed's loss scaler, fragment addresses and ZeRO stage (optional: DeepSpeed need not be installed)
DEEPSPEED_PICKLE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                            "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                            "deepspeed.runtime.zero.config.ZeroStageEnum",
                            "deepspeed.utils.tensor_fragment.fragment_address")
# numpy's arrays and scalars (HistoryBuffer's buffers); the rebuilders live in ``multiarray``, which is
# ``numpy._core.multiarray`` from numpy 2 and ``numpy.core.multiarray`` before
NUMPY_PICKLE_GLOBALS = ("numpy.ndarray", "numpy.dtype")
MULTIARRAY_PICKLE_NAMES = ("_reconstruct", "scalar")
MULTIARRAY_MODULES = ("numpy._core.multiarray", "numpy.core.multiarray")
# numpy 2 pickles a dtype through its concrete class (``numpy.dtypes.Float64DType``...): these types' classes
NUMPY_PICKLE_DTYPES = ("float64", "float32", "float16", "int64", "int32", "bool")
# numpy scalars pickle their bytes through ``codecs.encode`` (a pure text-to-bytes function; ``_codecs`` is
# where it lives, ``codecs`` where older pickles name it)
CODECS_ENCODE_GLOBALS = ("_codecs.encode", "codecs.encode")
# HistoryBuffer pickles its statistics methods as ``getattr(HistoryBuffer, "min")``: the name must resolve,
# but both allowlists resolve it to a restricted stand-in, never to the builtin (which reaches ``eval``)
GETATTR_GLOBAL = "builtins.getattr"
