"""KServe's own `ModelServer` serving an ONNX file with onnxruntime: the peer of `compare_kserve`.

Runs in the kserve peer environment (`bench.peers.peer_python("kserve")`), never in bnfold's:
it imports kserve, and nothing of bnfold. This is the model class KServe's documentation has a
user write for a custom v2 runtime: load a session, answer `predict` with an `InferResponse`.
REST (JSON and the binary tensor extension) and gRPC (`inference.GRPCInferenceService`) are
KServe's, with its default settings (uvloop event loop, latency logging on).

    python bench/kserve_model.py --onnx model.onnx --model_name lenet --http_port 8080 --grpc_port 8081
"""
import argparse

import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server

_V2 = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(int64)": "INT64", "tensor(int32)": "INT32"}


class OnnxModel(Model):
    def __init__(self, name: str, path: str, threads: int) -> None:
        super().__init__(name)
        self.path, self.threads = path, threads

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        self.outputs = self.session.get_outputs()
        self.ready = True
        return self.ready

    @staticmethod
    def _types(args) -> list:
        return [{"name": a.name, "datatype": _V2[a.type], "shape": [d if isinstance(d, int) else -1 for d in a.shape]}
                for a in args]

    def get_input_types(self) -> list:
        return self._types([self.input])

    def get_output_types(self) -> list:
        return self._types(self.outputs)

    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        x = payload.inputs[0].as_numpy()
        results = self.session.run(None, {self.input.name: x})
        outputs = []
        for meta, y in zip(self.outputs, results):
            out = InferOutput(name=meta.name, shape=list(y.shape), datatype=_V2[meta.type])
            out.set_data_from_numpy(y, binary_data=payload.use_binary_outputs)
            outputs.append(out)
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=outputs,
                             use_binary_outputs=payload.use_binary_outputs)


def _loopback_only() -> None:
    """KServe listens on every interface (0.0.0.0 and [::], hard-coded); a benchmark listens on 127.0.0.1."""
    import grpc.aio
    import uvicorn

    config_init = uvicorn.Config.__init__

    def config(self, app, *args, **kwargs):
        config_init(self, app, *args, **{**kwargs, "host": "127.0.0.1"})
    uvicorn.Config.__init__ = config
    add_port = grpc.aio._server.Server.add_insecure_port
    grpc.aio._server.Server.add_insecure_port = lambda self, address: add_port(
        self, address.replace("[::]", "127.0.0.1"))


if __name__ == "__main__":
    _loopback_only()
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--onnx", required=True, help="the ONNX file to serve")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args, _ = parser.parse_known_args()
    model = OnnxModel(args.model_name, args.onnx, args.threads)
    model.load()
    ModelServer().start([model])
