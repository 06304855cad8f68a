"""Deployment: export to safetensors and ONNX, the integer inference engine, ONNX Runtime,
`bitvit.evaluate` of run folders and exported files, and the memory/compute/energy profile.

Layer 3. May import `bitvit.files`, `bitvit.nn`, `bitvit.data` and `bitvit.training`; never
`bitvit.studies` or the command line.
"""
