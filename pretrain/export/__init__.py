"""Formats other tools load: timm's and open_clip's `local-dir:` folders (written by `pretrain consolidate`) and ONNX
(`pretrain export onnx`)."""
from pretrain.export.folders import write_tool_folders
from pretrain.export.onnx import export_onnx
from pretrain.export.open_clip_folder import write_open_clip_folder
from pretrain.export.timm_folder import load_timm_folder, timm_config, write_timm_folder

__all__ = ["export_onnx", "load_timm_folder", "timm_config", "write_open_clip_folder", "write_timm_folder",
           "write_tool_folders"]
