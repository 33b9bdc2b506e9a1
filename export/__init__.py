"""Export a bundle version for fast inference: ONNX with a parity check, TensorRT engines.

    export.onnx       export_onnx(bundle, version) -> model.onnx + export.json (parity numbers);
                      check_onnx(vdir) for consumers that must only load a verified file
    export.parity     the check images, the PyTorch reference and the floors
    export.tensorrt   engine build and cache (keyed by ONNX sha256, TensorRT, GPU, precision, shapes)

The modules import torch/onnx/tensorrt; this file imports nothing, so `import mas3_edge.export.tensorrt`
on a machine without ONNX Runtime, or the CLI's --help, stays cheap.
"""
