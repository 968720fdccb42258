"""Deployment: the study's Pareto front, and bundles (ONNX fp32 + int8, runtime files) for Bluebox 2.0 / RTMaps."""

from dse.deploy.export import export_front, export_trial, write_index
from dse.deploy.front import PICKS, DeployError, filter_front, front_frame, pick
from dse.deploy.onnx import ExportSettings, measure_shape
from dse.deploy.verify import load_bundle_model, verify_bundle

__all__ = [
    "PICKS",
    "DeployError",
    "ExportSettings",
    "export_front",
    "export_trial",
    "filter_front",
    "front_frame",
    "load_bundle_model",
    "measure_shape",
    "pick",
    "verify_bundle",
    "write_index",
]
