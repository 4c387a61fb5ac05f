"""Stand-ins for Sa2VA's codebase v2 (bytedance/Sa2VA ``projects/sa2va``), for the tests: a training
model shaped like v2's ``Sa2VAModel`` with an ``mllm`` wrapper per family, and remote code of our own
that names its classes and behaves as the official v2 HF code does where an export depends on it."""
