"""Triton python-backend model: one ONNX graph through onnxruntime (``cleanplate export triton --backend python``).

For Triton servers without the onnxruntime or TensorRT backends (the ``nvidia-pytriton`` wheel's server,
for one). Requests that the dynamic batcher hands over together are concatenated along the batch axis,
run as one ``InferenceSession.run`` and split back. Inputs or outputs of rank 1 in the graph (timestep,
score) are (B, 1) on the Triton side, as in the onnxruntime/TensorRT configs with ``reshape``.

Config parameters: ``onnx_file`` (default model.onnx), ``intra_op_threads`` (0 = onnxruntime's choice).
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = os.path.join(args["model_repository"], args["model_version"], params.get("onnx_file", "model.onnx"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}))
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.input_rank = {i.name: len(i.shape) for i in self.session.get_inputs()}
        self.output_names = [o["name"] for o in config["output"]]
        self.output_rank = {o.name: len(o.shape) for o in self.session.get_outputs()}

    def execute(self, requests):
        feeds, sizes = {}, []
        for request in requests:
            for name in self.input_rank:
                value = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                feeds.setdefault(name, []).append(value)
            sizes.append(len(feeds[next(iter(self.input_rank))][-1]))
        batch = {}
        for name, parts in feeds.items():
            value = np.concatenate(parts)
            if self.input_rank[name] == 1:
                value = value.reshape(-1)
            batch[name] = np.ascontiguousarray(value)
        outputs = self.session.run(self.output_names, batch)
        responses, start = [], 0
        for size in sizes:
            tensors = []
            for name, value in zip(self.output_names, outputs, strict=True):
                part = value[start:start + size]
                if self.output_rank[name] == 1:
                    part = part.reshape(-1, 1)
                tensors.append(pb_utils.Tensor(name, np.ascontiguousarray(part)))
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
