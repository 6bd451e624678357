"""The yardstick for `bench.compare_reference`: an inference service written the way most are.

FastAPI, a pydantic model for the JSON body, one onnxruntime session with one intra-op thread,
and nothing else: no binary tensors, no access log of its own, uvicorn's defaults. It is not part
of bnfold's service; it stands for what bnfold's is measured against, and ships inside the
package so that the comparison runs from an installed wheel. It needs FastAPI (the `compare`
extra: `pip install 'bnfold[compare]'`).

    BNFOLD_REF_MODEL=model.onnx uvicorn --factory bnfold.bench.reference_service:create_app --port 8100

`POST /predict` with `{"data": [784 floats]}` answers `{"logits": [10 floats]}` (one sample; the
model's free dimensions are taken as 1).
"""
# No `from __future__ import annotations`: FastAPI reads the endpoint's annotations at run time,
# and PredictRequest is local to create_app, out of reach of a string annotation.
import os
from typing import Any

MODEL_ENV = "BNFOLD_REF_MODEL"


def create_app(model_path: str | os.PathLike | None = None) -> Any:
    """The FastAPI app serving the ONNX file at `model_path` (default: `$BNFOLD_REF_MODEL`)."""
    import numpy as np
    import onnxruntime as ort
    from fastapi import FastAPI
    from pydantic import BaseModel

    path = model_path if model_path is not None else os.environ.get(MODEL_ENV)
    if not path:
        raise RuntimeError(f"set {MODEL_ENV} to the ONNX file the reference service should load")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    first = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in first.shape]

    class PredictRequest(BaseModel):
        data: list[float]

    app = FastAPI(title="reference service (FastAPI + pydantic + onnxruntime)")

    @app.post("/predict")
    def predict(request: PredictRequest) -> dict[str, list[float]]:   # plain def: FastAPI runs it in a thread
        x = np.asarray(request.data, dtype=np.float32).reshape(shape)
        logits = session.run(None, {first.name: x})[0]
        return {"logits": logits[0].tolist()}

    return app


__all__ = ["create_app", "MODEL_ENV"]
