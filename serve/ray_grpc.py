"""What Ray Serve's gRPC proxy imports for `bnfold serve --ray --grpc-port`: the service's registration.

tritonclient's generated messages name their modules as their .proto files do (`grpc_service_pb2`,
`model_config_pb2`), which are not importable under those names; Ray pickles every request and
response between its proxy and the replicas, and pickle finds a class through its module. Importing
this module (Ray's proxy does, through `grpc_servicer_functions`; the replicas do, through
serve.ray_app) makes those names point at tritonclient's modules.
"""
from __future__ import annotations

import sys

from tritonclient.grpc import model_config_pb2, service_pb2
from tritonclient.grpc.service_pb2_grpc import add_GRPCInferenceServiceServicer_to_server

sys.modules.setdefault(service_pb2.ServerLiveRequest.__module__, service_pb2)
sys.modules.setdefault(model_config_pb2.ModelConfig.__module__, model_config_pb2)

SERVICER_FUNCTION = f"{__name__}.add_GRPCInferenceServiceServicer_to_server"

__all__ = ["SERVICER_FUNCTION", "add_GRPCInferenceServiceServicer_to_server"]
