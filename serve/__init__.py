"""The service only: onnxruntime sessions and the Open Inference Protocol HTTP app (never imports torch).

    runtime = open_session("model.onnx", "cpu")          # one model, warmed up
    models = load_repository("repo/")                     # a file or a Triton-layout folder
    models = load_models(["runs/x/export", "b.onnx"])     # files, export folders, NAME=PATH, repositories
    app = create_app(ServeConfig(model="repo/"))          # the ASGI app, limits set

The public names are imported on first use: `bnfold --help` should not load onnxruntime.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from bnfold.lazy import lazy_attributes

if TYPE_CHECKING:
    from bnfold.serve.app import InferenceApp, create_app
    from bnfold.serve.config import ServeConfig
    from bnfold.serve.errors import ServeError
    from bnfold.serve.repository import load_models, load_repository
    from bnfold.serve.runtime import ModelRuntime, Runtime, open_session

_LAZY = {"create_app": "bnfold.serve.app", "InferenceApp": "bnfold.serve.app", "ServeConfig": "bnfold.serve.config",
         "ServeError": "bnfold.serve.errors", "load_repository": "bnfold.serve.repository",
         "load_models": "bnfold.serve.repository",
         "open_session": "bnfold.serve.runtime", "ModelRuntime": "bnfold.serve.runtime",
         "Runtime": "bnfold.serve.runtime"}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)


__all__ = sorted(_LAZY)
