"""The `bnfold` command: parses arguments and calls library functions, nothing more.

This is the top floor of the project, the one module that reaches every package. Each
command's handler imports what it needs when it runs, so `bnfold --help` stays fast and a
command never pays for another's dependencies (uvicorn, matplotlib, torchvision).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from bnfold.errors import BnfoldError

if TYPE_CHECKING:
    from bnfold.models.loader import LoadedModel
    from bnfold.models.spec_options import SpecOptions


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,3,32,32, got {text!r}")
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"every dimension must be positive, got {text!r}")
    return dims


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,8,32, got {text!r}")
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"every value must be positive, got {text!r}")
    return values


# The registry's names (models.list_models), written out: --help should not import torch to list them.
_ARCHITECTURES = "lenet, resnet20, resnet32, resnet56, resnet18, resnet34, resnet50 or unet"
_MODEL_HELP = ("the model: a bnfold checkpoint (from `bnfold train`), a state_dict (with --model-class), "
               "a torch.save'd module (with --trust-pickle), a TorchScript file, a torch.export .pt2, an "
               "ONNX file, or torchvision:NAME / timm:NAME (with --weights FILE)")


def _add_model_options(p: argparse.ArgumentParser, input_shape: bool = True) -> None:
    """The options of models.load_model, shared by every command that takes a model."""
    p.add_argument("--model-class", default=None, metavar="FILE.py:Class",
                   help="the architecture of a state_dict: FILE.py:Class, package.module:Class, "
                        "torchvision:NAME or timm:NAME")
    p.add_argument("--model-args", default=None, metavar="JSON",
                   help="arguments for --model-class as JSON: an object of keyword arguments, e.g. "
                        "'{\"num_classes\": 10}', or a list of positional ones")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="a state_dict file for a torchvision:NAME or timm:NAME model")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a whole module saved with torch.save(model): unpickling runs code "
                        "from the file, so only for files you trust")
    if input_shape:
        p.add_argument("--input-shape", type=_shape, default=None, metavar="N,C,H,W",
                       help="input shape with the batch dimension first, e.g. 1,3,224,224; needed where the "
                            "file does not say it (state_dicts, pickled modules, TorchScript)")


def _add_spec_options(p: argparse.ArgumentParser) -> None:
    """--labels/--mean/--std/--input-size/--grayscale: a spec for a model that came without one."""
    p.add_argument("--labels", default=None, metavar="FILE|a,b,c",
                   help="class names: a file with one per line (or a JSON list), or a,b,c; default 0..N-1")
    p.add_argument("--mean", default=None, metavar="M[,M,M]",
                   help="per-channel mean subtracted after scaling pixels to [0, 1] (default 0; ImageNet's "
                        "for torchvision/timm)")
    p.add_argument("--std", default=None, metavar="S[,S,S]", help="per-channel std divided by (default 1)")
    p.add_argument("--input-size", default=None, metavar="H[,W]",
                   help="image size the model takes, where the file does not fix it (default: from the model)")
    p.add_argument("--grayscale", action="store_true", help="the model takes one grey channel")


def _spec_options(args: argparse.Namespace) -> "SpecOptions":
    from bnfold.models.spec_options import SpecOptions, parse_floats, parse_input_size, parse_labels

    return SpecOptions(
        labels=parse_labels(args.labels) if args.labels is not None else None,
        mean=parse_floats(args.mean, "--mean") if args.mean is not None else None,
        std=parse_floats(args.std, "--std") if args.std is not None else None,
        input_size=parse_input_size(args.input_size) if args.input_size is not None else None,
        grayscale=args.grayscale)


def _load_model(args: argparse.Namespace, source: str) -> "LoadedModel":
    """models.load_model with the command's options; says on stderr what the file turned out to be."""
    from bnfold.models.loader import load_model

    loaded = load_model(source, model_class=args.model_class, model_args=args.model_args,
                        weights=args.weights, trust_pickle=args.trust_pickle,
                        input_shape=getattr(args, "input_shape", None))
    print(f"model: {loaded}", file=sys.stderr, flush=True)
    return loaded


# ---------------------------------------------------------------------------------------------
# Handlers: each turns parsed arguments into one library call and prints its result.


def _cmd_fold(args: argparse.Namespace) -> int:
    from bnfold.fold_files import fold_and_save

    loaded = _load_model(args, args.model)
    model = loaded.require_module("fold")
    print(fold_and_save(model, args.out, input_shape=loaded.require_shape(), rtol=args.rtol,
                        samples=args.samples))
    return 0


def _cmd_fold_onnx(args: argparse.Namespace) -> int:
    from bnfold.fold_files import fold_onnx_file

    options = _spec_options(args)
    print(fold_onnx_file(args.input, args.output, input_shape=args.input_shape, rtol=args.rtol,
                         samples=args.samples))
    if options.given():  # a spec, so that `bnfold serve` answers /predictions for the folded file
        from bnfold.export.onnx_file import stamp_spec
        from bnfold.models.loader import load_model

        spec = load_model(args.output, input_shape=args.input_shape).spec_with(options)
        stamp_spec(args.output, spec)
        print(f"spec: {len(spec.labels)} labels, input {'x'.join(map(str, spec.input_shape))}, "
              f"mean {spec.preprocess.mean}, std {spec.preprocess.std} (in the file's metadata)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from bnfold import models

    config = models.TrainConfig(
        model=args.model, dataset=args.dataset, data_root=args.data_root, download=args.download,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        schedule=args.schedule, weight_decay=args.weight_decay, norm=args.norm, activation=args.activation,
        bn_momentum=args.bn_momentum, bn_eps=args.bn_eps, sync_bn=args.sync_bn, seed=args.seed,
        device=args.device, workers=args.workers, out=args.out, resume=args.resume, force=args.force,
        progress=not args.no_progress, input_size=args.input_size, steps_per_epoch=args.steps_per_epoch,
        threads=args.threads)
    result = models.train(config)
    if result.history:  # only rank 0 has one under torchrun
        print(models.train_summary(result))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from bnfold.export import ExportConfig, export_checkpoint

    formats = args.format
    if formats is None:  # every format the model can go to: an ONNX file only stays ONNX
        from bnfold.export.config import DEFAULT_FORMATS
        from bnfold.models.loader import is_onnx_file

        formats = ["onnx"] if is_onnx_file(args.checkpoint) else list(DEFAULT_FORMATS)
    config = ExportConfig(
        checkpoint=args.checkpoint, out=args.out, formats=formats, fold=not args.no_fold,
        opset=args.opset, static_batch=args.static_batch, fp16=args.fp16, legacy_onnx=args.legacy_onnx,
        triton_repo=args.triton_repo, triton_device=args.triton_device, triton_name=args.triton_name,
        data_root=args.data_root, force=args.force, progress=not args.no_progress, verbose=args.verbose,
        model_class=args.model_class, model_args=args.model_args, weights=args.weights,
        trust_pickle=args.trust_pickle, input_shape=args.input_shape, spec_options=_spec_options(args),
        calibration=args.calibration, calibration_samples=args.calibration_samples,
        calibration_data=args.calibration_data, max_accuracy_drop=args.max_accuracy_drop,
        per_tensor=args.per_tensor)
    print(export_checkpoint(config))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from bnfold.export.evaluate import evaluate_artifacts

    report = evaluate_artifacts(args.artifacts, checkpoint=args.checkpoint, dataset=args.dataset,
                                data_root=args.data_root, batch_size=args.batch_size, threads=args.threads,
                                trust_pickle=args.trust_pickle, model_class=args.model_class,
                                model_args=args.model_args, weights=args.weights)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from bnfold.serve.config import from_args
    from bnfold.serve.launch import serve

    for model in args.model:   # one or more sources
        _refuse_pytorch_file(model)
    return serve(from_args(args))


def _refuse_pytorch_file(model: str) -> None:
    """serve runs ONNX: a PyTorch file gets the command that makes one, not a protobuf parse error."""
    import zipfile
    from pathlib import Path

    path = Path(model)
    if not path.is_file():
        return
    with path.open("rb") as handle:
        head = handle.read(1)
    if zipfile.is_zipfile(path) or head == b"\x80":  # torch.save / TorchScript / .pt2, or a legacy pickle
        raise BnfoldError(f"{model!r} is a PyTorch file; `bnfold serve` runs ONNX: export it first with "
                          f"`bnfold export {model} --format onnx --out DIR` (plus --model-class or --trust-pickle "
                          "if export asks), then serve DIR/model.onnx")


def _cmd_loadtest(args: argparse.Namespace) -> int:
    from bnfold.bench.loadtest import run_loadtest

    result = run_loadtest(args.url, args.model, concurrency=args.concurrency, requests=args.requests,
                          binary=args.binary, reference=args.reference, input_shape=args.input_shape,
                          protocol=args.protocol)
    print(result)
    return 0 if result.errors == 0 else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from bnfold.bench.report import summary_lines, write_report
    from bnfold.bench.run import BenchConfig, require_some_device, run_bench

    require_some_device(args.device)
    config = BenchConfig(args.checkpoint, devices=args.device, backends=args.backends,
                         batch_sizes=args.batch_sizes, threads=args.threads, seconds=args.seconds,
                         export_dir=args.export_dir, min_iterations=args.min_iterations,
                         model_class=args.model_class, model_args=args.model_args, weights=args.weights,
                         trust_pickle=args.trust_pickle, input_shape=args.input_shape)
    result = run_bench(config)
    files = write_report(result, args.out)
    print("\n".join(summary_lines(result)))
    print(f"wrote {files.json}, {files.markdown}, " + ", ".join(str(c) for c in files.charts))
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from bnfold.pipeline import PipelineConfig, run_pipeline

    config = PipelineConfig(model=args.model, dataset=args.dataset, data_root=args.data_root,
                            epochs=args.epochs, bench_seconds=args.bench_seconds, devices=args.device,
                            out=args.out, force=args.force, threads=args.threads or None,
                            int8=not args.no_int8)
    run_pipeline(config)
    return 0


# ---------------------------------------------------------------------------------------------
# Parsers


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show an option's default only where it says something (not for None or on/off flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        if isinstance(action.default, (list, tuple)) and action.help:
            # Written the way it is typed: --device cpu,cuda
            return f"{action.help} (default: {','.join(map(str, action.default))})"
        return super()._get_help_string(action)


def _add(sub: argparse._SubParsersAction, name: str, handler: Callable[[argparse.Namespace], int],
         help: str, description: str | None = None) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=description or help,
                            formatter_class=_HelpFormatter)
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnfold",
        description="Fold BatchNorm into Conv/Linear weights, export verified ONNX/TorchScript/"
                    "torch.export files, serve them, and benchmark CPU against GPU.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _add(sub, "fold", _cmd_fold, "fold every eval-mode BatchNorm of a model and check parity",
             "Fold a PyTorch model (a bnfold checkpoint, a state_dict with --model-class, a torch.save'd "
             "module with --trust-pickle, ...), print the fold report and the parity against the "
             "original, and save the folded module. Nothing is written when parity fails. A whole "
             "pickled module is loaded with torch.load(weights_only=False), which runs code from the "
             "file: fold only files you trust.")
    p.add_argument("model", help=_MODEL_HELP)
    p.add_argument("--out", required=True, help="where to torch.save the folded module")
    _add_model_options(p)
    p.add_argument("--rtol", type=float, default=1e-5, help="largest max-relative-error accepted")
    p.add_argument("--samples", type=int, default=8, help="random inputs in the parity check")

    p = _add(sub, "fold-onnx", _cmd_fold_onnx, "fold BatchNormalization nodes of any ONNX file",
             "Fold inference-mode BatchNormalization after Conv, ConvTranspose, Gemm and MatMul(+Add) "
             "in an ONNX file, check the result with onnx.checker and onnxruntime, then write it.")
    p.add_argument("input", help="ONNX file to read")
    p.add_argument("output", help="ONNX file to write")
    p.add_argument("--input-shape", type=_shape, default=None,
                   help="shape for the parity check when the file's input has symbolic dimensions "
                        "other than the batch, e.g. 1,3,224,224")
    _add_spec_options(p)
    p.add_argument("--rtol", type=float, default=1e-5, help="largest max-relative-error accepted")
    p.add_argument("--samples", type=int, default=8, help="random inputs in the parity check")

    p = _add(sub, "train", _cmd_train, "train a model with BatchNorm into a self-describing checkpoint")
    p.add_argument("--model", default="lenet", help=_ARCHITECTURES)
    p.add_argument("--dataset", default="digits",
                   help="digits (bundled), mnist, fashion-mnist, cifar10, or imagefolder:PATH")
    p.add_argument("--data-root", default="data", help="folder holding torchvision datasets")
    p.add_argument("--download", action="store_true",
                   help="allow torchvision to download mnist/fashion-mnist/cifar10 into --data-root")
    p.add_argument("--epochs", type=int, default=5, help="passes over the training split")
    p.add_argument("--batch-size", type=int, default=64, help="samples per step (per process under torchrun)")
    p.add_argument("--lr", type=float, default=None, help="learning rate; default 3e-3 for adamw, 0.1 for sgd")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="adamw",
                   help="sgd: momentum 0.9, Nesterov; no weight decay on BN and biases either way")
    p.add_argument("--schedule", choices=["cosine", "step", "none"], default="cosine",
                   help="learning-rate schedule per epoch; step: x0.1 at 1/2 and 3/4 of the epochs")
    p.add_argument("--weight-decay", type=float, default=None, help="default 1e-2 for adamw, 5e-4 for sgd")
    p.add_argument("--norm", choices=["bn", "none"], default="bn", help="BatchNorm or no normalization")
    p.add_argument("--activation", default=None, help="lenet: relu (its default) or sigmoid (the classic)")
    p.add_argument("--bn-momentum", type=float, default=0.1, help="BatchNorm running-statistics momentum")
    p.add_argument("--bn-eps", type=float, default=1e-5, help="BatchNorm epsilon (kept in the spec)")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: convert BatchNorm to SyncBatchNorm for training (CUDA only); "
                        "the checkpoint holds plain BatchNorm")
    p.add_argument("--seed", type=int, default=0, help="same seed, same weights (on the same device)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--out", required=True, help="run folder: best.pt, last.pt, metrics.jsonl, curves.png")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--force", action="store_true",
                   help="train afresh into an --out folder that already holds a run (its best.pt, last.pt "
                        "and metrics are replaced); without --resume or --force such a folder is refused")
    p.add_argument("--input-size", type=int, default=None,
                   help="input resolution; default 28 for lenet on grey data, else 32")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="cap optimizer steps per epoch (smoke runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (epoch lines still print)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads; default torch's choice (1 is faster for small models on a busy box)")

    p = _add(sub, "export", _cmd_export, "export a model to verified ONNX / TorchScript / torch.export files",
             "Fold and export a model, each file verified against it before it is written. An ONNX file "
             "from elsewhere is folded and stamped with a spec (--labels, --mean, --std, ...) so that "
             "`bnfold serve` answers /predictions for it.")
    p.add_argument("checkpoint", metavar="model", help=_MODEL_HELP)
    _add_model_options(p)
    _add_spec_options(p)
    p.add_argument("--format", type=_csv, default=None,
                   help="comma-separated: onnx, torchscript, program (or pt2, ts), fp16, int8; default the "
                        "first three, onnx alone for an ONNX file. fp16 writes model.fp16.onnx "
                        "(float16 weights, float32 inputs and outputs); int8 writes model.int8.onnx, calibrated "
                        "on the training split and written only if it passes the accuracy gate")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-fold", action="store_true", help="export without folding BatchNorm first")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset: 18-23 with the default exporter, 9-20 with --legacy-onnx "
                        "(default: the exporter's own)")
    p.add_argument("--legacy-onnx", action="store_true", help="use the TorchScript-based ONNX exporter")
    p.add_argument("--static-batch", action="store_true", help="fix the batch dimension instead of a dynamic axis")
    p.add_argument("--fp16", action="store_true",
                   help="fold in float64, then store weights in float16; inputs and outputs stay "
                        "float32 and the parity tolerance is 1e-2 max relative error (1e-5 otherwise)")
    p.add_argument("--triton-repo", default=None, help="also write a Triton model repository here")
    p.add_argument("--data-root", default="data", help="where the checkpoint's dataset lives, for parity samples")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    p.add_argument("--triton-device", choices=["cpu", "cuda"], default="cpu",
                   help="instance_group kind in the Triton config.pbtxt (KIND_CPU or KIND_GPU)")
    p.add_argument("--triton-name", default=None,
                   help="model name in the Triton repository; None means the architecture's name")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="show the exporters' own output and warnings")
    int8 = p.add_argument_group("int8", "calibration and the accuracy gate of --format int8")
    int8.add_argument("--calibration", choices=["minmax", "percentile", "entropy"], default="minmax",
                      help="how activation ranges are calibrated (percentile: 99.999th)")
    int8.add_argument("--calibration-samples", type=int, default=256,
                      help="training-split samples for calibration (the eval split is never used)")
    int8.add_argument("--calibration-data", default=None,
                      help="a .npy array (N, C, H, W) of preprocessed inputs to calibrate on instead")
    int8.add_argument("--max-accuracy-drop", type=float, default=1.0,
                      help="largest drop of eval-split accuracy (or IoU) against FP32 ONNX, in points; "
                           "beyond it nothing is written and the command exits 2")
    int8.add_argument("--per-tensor", action="store_true",
                      help="one scale per weight tensor instead of one per output channel")

    p = _add(sub, "evaluate", _cmd_evaluate, "accuracy (or IoU) of any artifact on its eval split, as one table",
             "Score checkpoints, folded modules, ONNX files (FP32, FP16, INT8), TorchScript and torch.export "
             "files on the whole eval split of their dataset: top-1 accuracy for classifiers, foreground "
             "IoU for the U-Net. The spec (dataset, preprocessing) comes from --checkpoint, else from the "
             "file (a checkpoint, ONNX metadata) or the export.json beside it.")
    p.add_argument("artifacts", nargs="+", metavar="artifact", help="files to evaluate, in table order")
    p.add_argument("--checkpoint", default=None,
                   help="the checkpoint the artifacts came from: its spec is used for all of them")
    p.add_argument("--dataset", default=None, help="evaluate on this dataset instead of the spec's")
    p.add_argument("--data-root", default="data", help="folder holding torchvision datasets")
    p.add_argument("--batch-size", type=int, default=64, help="inputs per run (the figure does not depend on it)")
    p.add_argument("--threads", type=int, default=None, help="torch / onnxruntime threads (default torch's)")
    _add_model_options(p, input_shape=False)  # a state_dict (--model-class), a pickled module, torchvision:NAME
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")

    p = _add(sub, "serve", _cmd_serve, "serve ONNX models over the Open Inference Protocol v2 (HTTP)")
    from bnfold.serve.config import add_arguments as add_serve_arguments   # shared with `python -m bnfold.serve`
    add_serve_arguments(p)

    p = _add(sub, "loadtest", _cmd_loadtest, "drive a running server and report latency and throughput")
    p.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name on the server (required unless --reference)")
    p.add_argument("--concurrency", type=int, default=8, help="connections sending requests at the same time")
    p.add_argument("--requests", type=int, default=2000, help="total requests over all connections")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http",
                   help="http (default), or grpc: ModelInfer calls with raw tensor contents to the address "
                        "`bnfold serve --grpc-port` listens on (URL then host:port, e.g. 127.0.0.1:8001)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--binary", dest="binary", action="store_true", default=True,
                      help="binary tensor extension (default)")
    mode.add_argument("--json", dest="binary", action="store_false", help="JSON tensors")
    p.add_argument("--reference", action="store_true",
                   help="drive the reference FastAPI service's POST /predict {\"data\": [...]} instead of /v2 "
                        "(--model is then ignored)")
    p.add_argument("--input-shape", type=_shape, default=None,
                   help="input shape, batch included (default: from the model's metadata; 1,1,28,28 with --reference)")

    p = _add(sub, "bench", _cmd_bench, "measure batch-1 latency of eager, folded, TorchScript, torch.export, onnxruntime and HTTP")
    p.add_argument("checkpoint", metavar="model", help=_MODEL_HELP + "; an ONNX file gets the onnxruntime "
                                                                   "and HTTP rows only")
    _add_model_options(p)
    p.add_argument("--device", type=_csv, default=["cpu", "cuda"], help="comma-separated: cpu, cuda")
    from bnfold.bench.backends import DEFAULT_BACKENDS, REQUESTABLE  # the table; no torch import

    p.add_argument("--backends", type=_csv, default=list(DEFAULT_BACKENDS),
                   help=f"comma-separated: {', '.join(REQUESTABLE)}; on cuda, "
                        "ort adds IO-binding and CUDA-graph rows, and http adds an 8-connection row")
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 8, 32],
                   help="comma-separated batch sizes: 1 is the latency headline, larger ones give "
                        "throughput (HTTP rows run at 1 only)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads for every backend; 0 = the CPUs this process may use (on a busy machine "
                        "that makes p90 many times p50)")
    p.add_argument("--seconds", type=float, default=2.0, help="measuring time per backend and batch size")
    p.add_argument("--min-iterations", type=int, default=30,
                   help="calls per row at least, however long --seconds is (a ratio from a few calls is noise)")
    p.add_argument("--export-dir", default=None,
                   help="reuse model.onnx / model.ts / model.pt2 from this folder (as `bnfold export` "
                        "writes it); missing files are exported into a temporary folder")
    p.add_argument("--out", required=True, help="folder for report.json, report.md and charts")

    p = _add(sub, "pipeline", _cmd_pipeline, "train -> fold -> export -> verify -> bench, on the bundled digits by default")
    p.add_argument("--model", default="lenet", help=_ARCHITECTURES)
    p.add_argument("--dataset", default="digits",
                   help="digits (bundled, no download), or a dataset already under --data-root")
    p.add_argument("--data-root", default="data", help="folder holding torchvision datasets")
    p.add_argument("--epochs", type=int, default=5, help="training epochs")
    p.add_argument("--bench-seconds", type=float, default=1.0, help="measuring time per backend in the bench")
    p.add_argument("--device", type=_csv, default=["cpu", "cuda"], help="bench devices (absent ones are reported as skipped)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads for every benchmarked backend; 0 = the CPUs this process may use")
    p.add_argument("--out", default="runs/demo",
                   help="run folder: train/, export/, bench/ and REPORT.md")
    p.add_argument("--force", action="store_true",
                   help="reuse an existing output folder (its train/, export/ and bench/ are overwritten)")
    p.add_argument("--no-int8", action="store_true",
                   help="skip model.int8.onnx (calibrated on the training split, refused when it loses more "
                        "than 1 point of eval accuracy) and its ort-int8 bench row")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except BnfoldError as exc:
        print(f"bnfold {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bnfold {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
