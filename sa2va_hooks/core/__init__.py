"""The mmengine-free core: merge, stream, write, fingerprint, manifest, verify.

Nothing under ``sa2va_hooks.core`` imports mmengine; it is plain torch + safetensors code,
testable without a Runner.
"""
