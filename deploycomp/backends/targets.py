"""Every target module; importing this registers them all (``base.get_backend`` does it lazily).

Each module imports its runtime (onnxruntime, openvino, tensorrt) only when a backend is built,
so registering a target whose runtime is not installed costs nothing.
"""

from . import openvino, ort, tensorrt  # noqa: F401
