"""`pretrain export onnx EXPORT_DIR --out FILE.onnx [--image-size N] [--stages]`: the model `pretrain consolidate`
wrote (EXPORT_DIR/timm) to ONNX, checked in onnxruntime; prints one JSON line (file, opset, outputs, error)."""


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="export_command", required=True, metavar="FORMAT")
    onnx = sub.add_parser("onnx", help="ONNX with a dynamic batch; DCNv3 as standard GridSample ops",
                          description="Export the consolidated model to ONNX (fp32, dynamic batch, DCNv3 decomposed "
                                      "into GridSample), then run it in onnxruntime on random batches of 1 and 3 against "
                                      "PyTorch. Exit 1 if they differ by more than --tolerance, 2 if the export "
                                      "folder is not there.")
    onnx.add_argument("export_dir", help="the output folder of `pretrain consolidate` (it holds timm/)")
    onnx.add_argument("--out", required=True, help="the .onnx file to write")
    onnx.add_argument("--image-size", type=int, help="input height and width (default: the stage's image size)")
    onnx.add_argument("--stages", action="store_true",
                      help="output the four stage maps a detector or segmenter takes, not the head's output")
    onnx.add_argument("--tolerance", type=float, default=1e-4,
                      help="largest relative difference onnxruntime vs PyTorch accepted")


def main(args) -> int:
    import json
    import sys
    from pathlib import Path

    import onnxruntime
    import torch

    from pretrain.export.onnx import OPSET, export_onnx, relative_error
    from pretrain.export.timm_folder import load_timm_folder

    try:
        model = load_timm_folder(Path(args.export_dir) / "timm")
    except FileNotFoundError as error:
        print(f"pretrain export onnx: {error}", file=sys.stderr)
        return 2
    size = args.image_size or model.pretrained_cfg["input_size"][-1]
    names = export_onnx(model, args.out, size, stages=args.stages)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 3, size, size, generator=generator) for n in (1, 3)]  # the batch is dynamic
    error = relative_error(model, args.out, batches, stages=args.stages)
    print(json.dumps({"onnx": args.out, "opset": OPSET, "onnxruntime": onnxruntime.__version__, "image_size": size,
                      "outputs": names, "relative_error": error}))
    return 0 if error <= args.tolerance else 1
