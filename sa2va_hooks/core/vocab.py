"""The package's vocabulary: every file name, dtype table and size constant has its home here, and
nowhere else. Plain strings and ints (no torch), so that reading a manifest or a sidecar needs no
torch; modules that work on tensors build their ``torch.dtype`` tables from these names."""
from __future__ import annotations

from types import MappingProxyType

# -- file names --------------------------------------------------------------------------------
MANIFEST_FILE = "export_manifest.json"  # the proof inside every snapshot
SINGLE_FILE = "model.safetensors"  # a snapshot of one shard (transformers' name)
INDEX_FILE = "model.safetensors.index.json"  # a sharded snapshot's weight map (transformers' name)
SIDECAR_SUFFIX = ".fingerprints.json"  # FingerprintHook's record beside a checkpoint: <checkpoint><suffix>

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
