"""Export one of torchvision's ImageNet ResNets to ONNX for avp.

    python weights/export_onnx.py                        # resnet50.onnx, IMAGENET1K_V1 (the lesson's network)
    python weights/export_onnx.py --arch resnet18 --out resnet18.onnx
    python weights/export_onnx.py --weights none         # random weights, offline (to try the importer)

torchvision downloads the state dict into torch.hub's cache (checking the
SHA-256 prefix in its file name). The graph is exported with the TorchScript
exporter, BatchNorm folded (torch.onnx's default in eval mode), a dynamic
batch dimension, and can be used directly:

    cargo run --example inspect_weights -- resnet50.onnx
    cargo run --example alien_vs_predator -- --weights resnet50.onnx

An ONNX file has no normalization of its own: avp assumes torchvision's
ImageNet statistics for it (RGB, 0..1, mean/std), which is right for these
exports, and says so (`inspect_weights` prints the normalization and where
it came from).
"""

import argparse

import torch
import torchvision

ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=ARCHS, default="resnet50")
    ap.add_argument("--weights", default="IMAGENET1K_V1", help="torchvision weights name, or 'none' for random weights")
    ap.add_argument("--out", help="output file (default: ARCH.onnx)")
    ap.add_argument("--opset", type=int, default=17)
    args = ap.parse_args()
    weights = None if args.weights.lower() == "none" else args.weights
    model = getattr(torchvision.models, args.arch)(weights=weights).eval()
    out = args.out or f"{args.arch}.onnx"
    torch.onnx.export(
        model,
        (torch.randn(1, 3, 224, 224),),
        out,
        dynamo=False,
        opset_version=args.opset,
        do_constant_folding=True,
        keep_initializers_as_inputs=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    print(f"wrote {out} ({args.arch}, weights {weights or 'random'}, opset {args.opset})")


if __name__ == "__main__":
    main()
