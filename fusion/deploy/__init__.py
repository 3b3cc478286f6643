"""Deployment of a trained FusionDetector off PyTorch: ONNX export and onnxruntime inference with parity checks.

- `spec`: `ExportSpec`, the fixed input configuration written into the ONNX file, and `check_exportable`, which
  refuses what cannot be exported faithfully (spconv LiDAR, temporal fusion, unknown branch types).
- `graph`: `ExportableDetector`, the model as one tensor-in / tensor-out module in standard ONNX operators (the
  voxelization and the pillar / camera BEV pooling re-expressed without data-dependent Python; the trained
  sub-modules are reused as they are).
- `segments`: the graph's segment reductions (sort-grouped sums and maxima), exact and thread-safe in onnxruntime;
  `segment_benchmark`: their micro-benchmark against ScatterElements / ScatterND.
- `inputs`: the shared pre- and post-processing of both runtimes: Batch -> graph inputs, graph outputs -> HeadOutput
  -> `fusion.heads.decode.decode_boxes` -> `fusion.heads.finish.finish_boxes`.
- `export`: `export_onnx`, torch.onnx (TorchScript exporter) plus the spec as metadata.
- `runtime`: `OnnxDetector`, an onnxruntime session with the replay engine's `predict(batch)` interface.
- `parity`: box-by-box comparison of two runtimes' detections.
"""
