"""`OnnxDetector`: an exported graph in onnxruntime, with the replay engine's `Detector` interface
(`predict(batch) -> (boxes per sample, FusionAttention)`) and the same pre- and post-processing as PyTorch
(fusion.deploy.inputs)."""
from __future__ import annotations

from pathlib import Path

import torch

from fusion.deploy import inputs as shared
from fusion.deploy.spec import METADATA_KEY, ExportSpec
from fusion.fuser import FusionAttention
from fusion.heads.centerpoint import HeadOutput
from fusion.types import Batch, Boxes


class OnnxDetector:
    """An onnxruntime session over a file written by `fusion.deploy.export.export_onnx`.

    providers: onnxruntime execution providers in order of preference (default: CPU only; e.g.
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"] on a GPU machine).
    threads: intra-op threads (None: onnxruntime's default). profile: write onnxruntime's per-node profile.
    score_threshold: decoding threshold (None: the exported model's).
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 profile: bool = False, score_threshold: float | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.enable_profiling = profile
        self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        metadata = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in metadata:
            raise ValueError(f"{path}: no {METADATA_KEY} metadata; export it with tools/export.py")
        try:
            self.spec = ExportSpec.from_json(metadata[METADATA_KEY])
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        self.grid = self.spec.bev_grid
        self.modalities = tuple(self.spec.modalities)
        self.score_threshold = score_threshold

    def run(self, batch: Batch) -> tuple[HeadOutput, FusionAttention]:
        """Batch of one sample -> (raw head maps, attention) as torch tensors on the CPU."""
        feeds = shared.graph_inputs(batch, self.spec)
        values = self.session.run(self.spec.outputs, {name: tensor.numpy() for name, tensor in feeds.items()})
        outputs = {name: torch.from_numpy(value) for name, value in zip(self.spec.outputs, values)}
        return shared.head_output(outputs), shared.attention(outputs, self.spec, feeds["present"])

    def predict(self, batch: Batch, score_threshold: float | None = None) -> tuple[list[Boxes], FusionAttention]:
        """(detections of the one sample (ego frame, best first), the fuser's attention weights)."""
        output, attention = self.run(batch)
        threshold = score_threshold if score_threshold is not None else self.score_threshold
        return shared.decode(output, self.spec, threshold, batch), attention

    def predict_boxes(self, batch: Batch, score_threshold: float | None = None) -> list[Boxes]:
        return self.predict(batch, score_threshold)[0]

    def end_profiling(self) -> str:
        """The path of onnxruntime's JSON profile (sessions made with profile=True)."""
        return self.session.end_profiling()
