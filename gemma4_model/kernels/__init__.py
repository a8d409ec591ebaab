"""Triton kernels for the GPU path, each beside its PyTorch twin (the CPU path and its oracle).

On a machine without CUDA the tests run the kernels in Triton's interpreter
(`TRITON_INTERPRET=1`, set by tests/conftest.py before any kernel is defined), and the
`gpu`-marked tests compare them with their twins on the device.
"""
