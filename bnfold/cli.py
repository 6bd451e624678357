"""The `bnfold` command: parses arguments into one typed config per command and calls the library.

This is the top floor of the project, with `bnfold.pipeline`: the modules that reach every
package. Each command's options become its config (`TrainConfig`, `ExportConfig`, ...) through
`bnfold.options.from_args`; the config holds the defaults (the parsers read them from it) and the
checks. An option several commands take is defined once, in `bnfold.options.SHARED`. Each
handler imports what it needs when it runs, so `bnfold --help` stays fast and a command never
pays for another's dependencies (uvicorn, matplotlib, torchvision).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from bnfold import options
from bnfold.errors import BnfoldError
from bnfold.options import ConfigOptions, deprecated, from_args

if TYPE_CHECKING:
    from bnfold.models.loader import LoadedModel
    from bnfold.models.spec_options import SpecOptions


_MODEL_HELP = ("the model: a bnfold checkpoint (from `bnfold train`), a state_dict (with --model-class), "
               "a torch.save'd module (with --trust-pickle), a TorchScript file, a torch.export .pt2, an "
               "ONNX file, or torchvision:NAME / timm:NAME (with --weights FILE)")


def _add_model_options(opts: ConfigOptions, input_shape: bool = True) -> None:
    """The options of models.load_model, shared by every command that takes a model."""
    opts.add("--model-class", metavar="FILE.py:Class",
             help="the architecture of a state_dict: FILE.py:Class, package.module:Class, "
                  "torchvision:NAME or timm:NAME")
    opts.add("--model-args", metavar="JSON",
             help="arguments for --model-class as JSON: an object of keyword arguments, e.g. "
                  "'{\"num_classes\": 10}', or a list of positional ones")
    opts.add("--weights", metavar="FILE", help="a state_dict file for a torchvision:NAME or timm:NAME model")
    opts.shared("--trust-pickle")
    if input_shape:
        opts.shared("--input-shape")


def _add_spec_options(p: argparse.ArgumentParser) -> None:
    """--labels/--mean/--std/--input-size/--grayscale: a spec for a model that came without one."""
    from bnfold.models.spec_options import SpecOptions

    opts = ConfigOptions(p.add_argument_group("spec", "preprocessing and labels for a model that has no spec"),
                         SpecOptions)
    opts.add("--labels", type=options.labels, metavar="FILE|a,b,c",
             help="class names: a file with one per line (or a JSON list), or a,b,c; default 0..N-1")
    opts.add("--mean", type=options.floats("--mean"), metavar="M[,M,M]",
             help="per-channel mean subtracted after scaling pixels to [0, 1] (default 0; ImageNet's "
                  "for torchvision/timm)")
    opts.add("--std", type=options.floats("--std"), metavar="S[,S,S]", help="per-channel std divided by (default 1)")
    opts.shared("--input-size")
    opts.add("--grayscale", action="store_true", help="the model takes one grey channel")


def _spec_options(args: argparse.Namespace) -> "SpecOptions":
    from bnfold.models.spec_options import SpecOptions

    return from_args(SpecOptions, args)


def _load_model(config: Any, source: str) -> "LoadedModel":
    """models.load_model with the command's options; says on stderr what the file turned out to be."""
    from bnfold.models.loader import load_model

    loaded = load_model(source, model_class=config.model_class, model_args=config.model_args,
                        weights=config.weights, trust_pickle=config.trust_pickle,
                        input_shape=getattr(config, "input_shape", None))
    print(f"model: {loaded}", file=sys.stderr, flush=True)
    return loaded


# ---------------------------------------------------------------------------------------------
# Handlers: each turns parsed arguments into its config, makes one library call, prints the result.


def _cmd_fold(args: argparse.Namespace) -> int:
    from bnfold.fold_config import FoldConfig
    from bnfold.fold_files import fold_and_save
    from bnfold.models.loader import load_batchnorms

    config = from_args(FoldConfig, args)
    loaded = _load_model(config, config.model)
    model = loaded.require_module("fold")
    print(fold_and_save(model, config.out, input_shape=loaded.require_shape(), rtol=config.tolerance,
                        samples=config.samples, batchnorms=load_batchnorms(config.batchnorm)))
    return 0


def _cmd_fold_onnx(args: argparse.Namespace) -> int:
    from bnfold.fold_config import FoldOnnxConfig
    from bnfold.fold_files import fold_onnx_file

    if args.out is None:
        if args.old_output is None:
            raise BnfoldError("--out is required: the ONNX file to write")
        args.out = args.old_output
    config = from_args(FoldOnnxConfig, args, spec_options=_spec_options(args))
    print(fold_onnx_file(config.model, config.out, input_shape=config.input_shape, rtol=config.tolerance,
                         samples=config.samples))
    if config.spec_options.given():  # a spec, so that `bnfold serve` answers /predictions for the folded file
        from bnfold.export.onnx_file import stamp_spec
        from bnfold.models.loader import load_model

        spec = load_model(config.out, input_shape=config.input_shape).spec_with(config.spec_options)
        stamp_spec(config.out, spec)
        print(f"spec: {len(spec.labels)} labels, input {'x'.join(map(str, spec.input_shape))}, "
              f"mean {spec.preprocess.mean}, std {spec.preprocess.std} (in the file's metadata)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from bnfold import models
    from bnfold.models.train_config import TrainConfig

    result = models.train(from_args(TrainConfig, args))
    if result.history:  # only rank 0 has one under torchrun
        print(models.train_summary(result))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from bnfold.export.config import DEFAULT_FORMATS, ExportConfig, Int8Config

    if getattr(args, "fp16_format", None):   # the deprecated --fp16: the fp16 format added
        args.formats = [*(args.formats or DEFAULT_FORMATS), "fp16"]
    config = from_args(ExportConfig, args, spec_options=_spec_options(args), int8=from_args(Int8Config, args))
    from bnfold.export import export_model

    print(export_model(config))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from bnfold.export.config import EvaluateConfig

    config = from_args(EvaluateConfig, args)
    from bnfold.export.evaluate import evaluate_artifacts

    report = evaluate_artifacts(config.artifacts, checkpoint=config.checkpoint, dataset=config.dataset,
                                data_root=config.data_root, batch_size=config.batch_size, threads=config.threads,
                                trust_pickle=config.trust_pickle, model_class=config.model_class,
                                model_args=config.model_args, weights=config.weights, eval_data=config.eval_data)
    print(json.dumps(report.to_dict(), indent=2) if config.json else report)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from bnfold.serve.config import from_args as serve_config
    from bnfold.serve.launch import serve

    config = serve_config(args)
    for model in config.model if isinstance(config.model, (list, tuple)) else [config.model]:
        _refuse_pytorch_file(str(model))
    return serve(config)


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
    from bnfold.bench.loadtest import LoadtestConfig, run_loadtest

    config = from_args(LoadtestConfig, args)
    result = run_loadtest(config.url, config.name, concurrency=config.concurrency, requests=config.requests,
                          binary=config.tensors == "binary", reference=config.reference,
                          input_shape=config.input_shape, protocol=config.protocol, replicas=config.replica_urls)
    print(result)
    return 0 if result.errors == 0 else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from bnfold.bench.report import summary_lines, write_report
    from bnfold.bench.run import BenchConfig, require_some_device, run_bench

    config = from_args(BenchConfig, args)
    require_some_device(config.devices)
    result = run_bench(config)
    files = write_report(result, config.out)
    print("\n".join(summary_lines(result)))
    print(f"wrote {files.json}, {files.markdown}, " + ", ".join(str(c) for c in files.charts))
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from bnfold.pipeline import PipelineConfig, run_pipeline

    run_pipeline(from_args(PipelineConfig, args))
    return 0


# ---------------------------------------------------------------------------------------------
# Parsers


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show an option's default only where it says something (not for None, empty lists or on/off flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and options.ARCHITECTURES_PLACEHOLDER in action.help:
            from bnfold.models import list_models   # the registry (imports torch): only when help is shown

            action.help = action.help.replace(options.ARCHITECTURES_PLACEHOLDER, ", ".join(list_models()))
        if action.default is None or isinstance(action.default, bool) or action.default is argparse.SUPPRESS \
                or action.default in ((), []):
            return action.help
        if isinstance(action.default, (list, tuple)) and action.help:
            # Written the way it is typed: --devices cpu,cuda
            return f"{action.help} (default: {','.join(map(str, action.default))})"
        return super()._get_help_string(action)


def _add(sub: argparse._SubParsersAction, name: str, handler: Callable[[argparse.Namespace], int],
         help: str, description: str | None = None) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=description or help,
                            formatter_class=_HelpFormatter)
    parser.set_defaults(handler=handler)
    return parser


def _fold_parser(sub: argparse._SubParsersAction) -> None:
    from bnfold.fold_config import FoldConfig, FoldOnnxConfig

    p = _add(sub, "fold", _cmd_fold, "fold every eval-mode BatchNorm of a model and check parity",
             "Fold a PyTorch model (a bnfold checkpoint, a state_dict with --model-class, a torch.save'd "
             "module with --trust-pickle, ...), print the fold report and the parity against the "
             "original, and save the folded module. Nothing is written when parity fails. A whole "
             "pickled module is loaded with torch.load(weights_only=False), which runs code from the "
             "file: fold only files you trust.")
    opts = ConfigOptions(p, FoldConfig)
    opts.add("model", help=_MODEL_HELP)
    opts.shared("--out", required=True, help="the file to torch.save the folded module to")
    _add_model_options(opts)
    opts.shared("--batchnorm")
    opts.shared("--rtol")
    opts.shared("--samples")

    p = _add(sub, "fold-onnx", _cmd_fold_onnx, "fold BatchNormalization nodes of any ONNX file",
             "Fold inference-mode BatchNormalization after Conv, ConvTranspose, Gemm and MatMul(+Add) "
             "in an ONNX file, check the result with onnx.checker and onnxruntime, then write it to --out.")
    opts = ConfigOptions(p, FoldOnnxConfig)
    opts.add("model", metavar="input", help="ONNX file to read")
    # `bnfold fold-onnx IN OUT` was the first spelling; --out is every other command's.
    p.add_argument("old_output", nargs="?", default=None, metavar="output", action=_OldOutput,
                   help="(deprecated: use --out) ONNX file to write")
    opts.shared("--out", help="the ONNX file to write")
    opts.shared("--input-shape")
    _add_spec_options(p)
    opts.shared("--rtol")
    opts.shared("--samples")


class _OldOutput(argparse.Action):
    """fold-onnx's positional OUTPUT: still read, with a warning pointing at --out."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if values is not None:
            print(f"{parser.prog}: warning: the positional output is deprecated, use --out {values}",
                  file=sys.stderr)
        setattr(namespace, self.dest, values)


def _train_parser(sub: argparse._SubParsersAction) -> None:
    from bnfold.models.train_config import NORMS, OPTIMIZERS, SCHEDULES, TrainConfig

    p = _add(sub, "train", _cmd_train, "train a model with BatchNorm into a self-describing checkpoint")
    opts = ConfigOptions(p, TrainConfig)
    opts.shared("--model")
    opts.shared("--dataset")
    opts.shared("--data-root")
    opts.add("--download", action="store_true",
             help="allow torchvision to download mnist/fashion-mnist/cifar10 into --data-root")
    opts.shared("--epochs")
    opts.shared("--batch-size", help="samples per step (per process under torchrun)")
    opts.add("--lr", type=float, help="learning rate; default 3e-3 for adamw, 0.1 for sgd")
    opts.add("--optimizer", metavar="|".join(OPTIMIZERS),
             help="sgd: momentum 0.9, Nesterov; no weight decay on BN and biases either way")
    opts.add("--schedule", metavar="|".join(SCHEDULES),
             help="learning-rate schedule per epoch; step: x0.1 at 1/2 and 3/4 of the epochs")
    opts.add("--weight-decay", type=float, help="default 1e-2 for adamw, 5e-4 for sgd")
    opts.add("--norm", metavar="|".join(NORMS), help="BatchNorm or no normalization")
    opts.add("--activation", help="lenet: relu (its default) or sigmoid (the classic)")
    opts.add("--bn-momentum", type=float, help="BatchNorm running-statistics momentum")
    opts.add("--bn-eps", type=float, help="BatchNorm epsilon (kept in the spec)")
    opts.add("--sync-bn", action="store_true",
             help="under torchrun: convert BatchNorm to SyncBatchNorm for training (CUDA only); "
                  "the checkpoint holds plain BatchNorm")
    opts.shared("--seed")
    opts.shared("--device")
    opts.add("--workers", type=int, help="DataLoader worker processes")
    opts.shared("--out", required=True, help="run folder: best.pt, last.pt, metrics.jsonl, curves.png")
    opts.add("--resume", action="store_true", help="continue from OUT/last.pt")
    opts.shared("--force")
    opts.shared("--input-size")
    opts.add("--steps-per-epoch", type=int, help="cap optimizer steps per epoch (smoke runs)")
    opts.shared("--no-progress")
    opts.shared("--threads")


def _export_parser(sub: argparse._SubParsersAction) -> None:
    from bnfold.export.config import CALIBRATIONS, DEFAULT_FORMATS, TRITON_DEVICES, ExportConfig, Int8Config
    from bnfold.export.writers import format_help

    p = _add(sub, "export", _cmd_export, "export a model to verified ONNX / TorchScript / torch.export files",
             "Fold and export a model, each file verified against it before it is written. An ONNX file "
             "from elsewhere is folded and stamped with a spec (--labels, --mean, --std, ...) so that "
             "`bnfold serve` answers /predictions for it.")
    opts = ConfigOptions(p, ExportConfig)
    opts.add("source", metavar="model", help=_MODEL_HELP)
    _add_model_options(opts)
    opts.shared("--batchnorm")
    _add_spec_options(p)
    opts.add("--format", dest="formats", type=options.csv,
             help=f"comma-separated formats, default {','.join(DEFAULT_FORMATS)} (onnx alone for an ONNX "
                  f"file): {format_help()}")
    opts.shared("--out", required=True, help="output folder")
    opts.add("--no-fold", dest="fold", action="store_false", help="export without folding BatchNorm first")
    opts.add("--opset", type=int,
             help="ONNX opset: 18-23 with the default exporter, 9-20 with --legacy-onnx "
                  "(default: the exporter's own)")
    opts.add("--legacy-onnx", action="store_true", help="use the TorchScript-based ONNX exporter")
    opts.add("--static-batch", dest="dynamic_batch", action="store_false",
             help="fix the batch dimension instead of a dynamic axis")
    # FP16 is one format (model.fp16.onnx, float16 weights, float32 edges): --fp16 was a second way.
    deprecated(p, "--fp16", "--format ...,fp16 (model.fp16.onnx beside the float32 files)", "fp16_format",
               flag=True, value=True)
    opts.shared("--rtol")
    opts.add("--triton-repo", metavar="DIR", help="also write a Triton model repository here")
    opts.shared("--data-root")
    opts.shared("--force")
    opts.add("--triton-device", metavar="|".join(TRITON_DEVICES),
             help="instance_group kind in the Triton config.pbtxt (KIND_CPU or KIND_GPU)")
    opts.add("--triton-name", help="model name in the Triton repository (default: the architecture's name)")
    opts.shared("--no-progress")
    opts.add("--verbose", action="store_true", help="show the exporters' own output and warnings")
    int8 = ConfigOptions(p.add_argument_group("int8", "calibration and the gate of --format int8"),
                         Int8Config)
    int8.add("--calibration", metavar="|".join(CALIBRATIONS),
             help="how activation ranges are calibrated (percentile: 99.999th)")
    int8.add("--calibration-samples", type=int,
             help="training-split samples for calibration (the eval split is never used)")
    int8.add("--calibration-data", metavar="PATH",
             help="inputs to calibrate on instead of the training split (any model): a folder of images, read "
                  "with the model's preprocessing, or a .npy/.npz of preprocessed inputs (N, C, H, W)")
    int8.add("--eval-data", metavar="PATH",
             help="what the gate measures on instead of the dataset's eval split: PATH/<label>/ folders of "
                  "images (accuracy drop, --max-accuracy-drop), or unlabelled images / .npy / .npz (agreement "
                  "with FP32, --min-agreement and --max-output-error); with neither this nor a dataset, a "
                  "quarter of the calibration inputs is held out for the agreement gate")
    int8.add("--max-accuracy-drop", type=float,
             help="largest drop of eval accuracy (or IoU) against FP32 ONNX, in points; beyond it the INT8 "
                  "file is not written (the other formats are) and the command exits 2")
    int8.add("--min-agreement", type=float,
             help="agreement gate: the fraction of inputs on which INT8's top-1 class must equal FP32's")
    int8.add("--max-output-error", type=float,
             help="agreement gate: largest ||INT8 - FP32|| / ||FP32|| over all outputs on the gate's inputs "
                  "(0.1 is a signal-to-quantization-noise ratio of 20 dB)")
    int8.add("--per-tensor", dest="per_channel", action="store_false",
             help="one scale per weight tensor instead of one per output channel")


def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
    from bnfold.export.config import EvaluateConfig

    p = _add(sub, "evaluate", _cmd_evaluate, "accuracy (or IoU) of any artifact on its eval split, as one table",
             "Score checkpoints, folded modules, ONNX files (FP32, FP16, INT8), TorchScript and torch.export "
             "files on the whole eval split of their dataset: top-1 accuracy for classifiers, foreground "
             "IoU for the U-Net. The spec (dataset, preprocessing) comes from --checkpoint, else from the "
             "file (a checkpoint, ONNX metadata) or the export.json beside it.")
    opts = ConfigOptions(p, EvaluateConfig)
    opts.add("artifacts", nargs="+", metavar="artifact", help="files to evaluate, in table order")
    opts.add("--checkpoint", help="the checkpoint the artifacts came from: its spec is used for all of them")
    opts.shared("--dataset", help="evaluate on this dataset instead of the spec's")
    opts.add("--eval-data", metavar="PATH",
             help="your own data instead of a dataset (export --format int8 takes the same): PATH/<label>/ folders "
                  "of images give each artifact's accuracy; unlabelled images, .npy or .npz give each one's top-1 "
                  "agreement with the first artifact and its output error (||out - first|| / ||first||)")
    opts.shared("--data-root")
    opts.shared("--batch-size", help="inputs per run (the figure does not depend on it)")
    opts.shared("--threads")
    _add_model_options(opts, input_shape=False)  # a state_dict (--model-class), a pickled module, torchvision:NAME
    opts.shared("--json")


def _loadtest_parser(sub: argparse._SubParsersAction) -> None:
    from bnfold.bench.loadtest import PROTOCOLS, TENSOR_ENCODINGS, LoadtestConfig

    p = _add(sub, "loadtest", _cmd_loadtest, "drive a running server and report latency and throughput")
    opts = ConfigOptions(p, LoadtestConfig)
    opts.add("url", help="server base URL, e.g. http://127.0.0.1:8000")
    opts.shared("--name", help="the model's name on the server (required unless --reference; POST "
                               "/v2/repository/index lists them, and so does loadtest without --name)")
    deprecated(p, "--model", "--name", "name")
    opts.shared("--concurrency")
    opts.add("--requests", type=int, help="total requests over all connections")
    opts.add("--tensors", metavar="|".join(TENSOR_ENCODINGS),
             help="how tensors travel: binary (the binary tensor extension) or json")
    deprecated(p, "--binary", "--tensors binary", "tensors", flag=True, value="binary")
    opts.add("--reference", action="store_true",
             help="drive the reference FastAPI service's POST /predict {\"data\": [...]} instead of /v2 "
                  "(--name is then ignored)")
    opts.shared("--input-shape", help="input shape, batch included (default: from the model's metadata; "
                                      "1,1,28,28 with --reference)")
    opts.add("--protocol", metavar="|".join(PROTOCOLS),
             help="http, or grpc: ModelInfer calls with raw tensor contents to the address "
                  "`bnfold serve --grpc-port` listens on (URL then host:port, e.g. 127.0.0.1:8001)")
    opts.add("--replica-urls", type=options.csv, metavar="URL,URL",
             help="more base URLs serving the same model, such as the replica URLs `bnfold serve --ray` "
                  "prints under Ray's direct ingress: connection i goes to [URL, *these][i mod n]")


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    from bnfold.bench.backends import REQUESTABLE  # the table; no torch import
    from bnfold.bench.run import BenchConfig

    p = _add(sub, "bench", _cmd_bench, "measure batch-1 latency of eager, folded, TorchScript, torch.export, onnxruntime, HTTP and gRPC")
    opts = ConfigOptions(p, BenchConfig)
    opts.add("source", metavar="model", help=_MODEL_HELP + "; an ONNX file gets the onnxruntime and HTTP rows only")
    _add_model_options(opts)
    opts.shared("--devices")
    deprecated(p, "--device", "--devices", "devices", convert=options.csv)
    opts.add("--backends", type=options.csv,
             help=f"comma-separated: {', '.join(REQUESTABLE)}; http also adds an 8-connection row and a "
                  "gRPC row (the same server's --grpc-port), and on cuda ort adds IO-binding and "
                  "CUDA-graph rows")
    opts.add("--batch-sizes", type=options.int_list,
             help="comma-separated batch sizes: 1 is the latency headline, larger ones give "
                  "throughput (HTTP rows run at 1 only)")
    opts.shared("--threads", help=options.SHARED["--threads"]["help"] + " (for every backend; on a busy "
                                  "machine all CPUs make p90 many times p50: pass 1 for a small model)")
    opts.add("--seconds", type=float, help="measuring time per backend and batch size")
    opts.add("--min-iterations", type=int,
             help="calls per row at least, however long --seconds is (a ratio from a few calls is noise)")
    opts.add("--export-dir", metavar="DIR",
             help="reuse model.onnx / model.ts / model.pt2 from this folder (as `bnfold export` "
                  "writes it); missing files are exported into a temporary folder")
    opts.shared("--out", required=True, help="folder for report.json, report.md and charts")


def _pipeline_parser(sub: argparse._SubParsersAction) -> None:
    from bnfold.pipeline import PipelineConfig

    p = _add(sub, "pipeline", _cmd_pipeline, "train -> fold -> export -> verify -> bench, on the bundled digits by default")
    opts = ConfigOptions(p, PipelineConfig)
    opts.shared("--model")
    opts.shared("--dataset", help="digits (bundled, no download), or a dataset already under --data-root")
    opts.shared("--data-root")
    opts.shared("--epochs")
    opts.add("--bench-seconds", type=float, help="measuring time per backend in the bench")
    opts.shared("--devices")
    deprecated(p, "--device", "--devices", "devices", convert=options.csv)
    opts.shared("--threads", help=options.SHARED["--threads"]["help"] + " (for every benchmarked backend)")
    opts.shared("--out", help="run folder: train/, export/, bench/ and REPORT.md")
    opts.shared("--force")
    opts.add("--no-int8", dest="int8", action="store_false",
             help="skip model.int8.onnx (calibrated on the training split, refused when it loses more "
                  "than 1 point of eval accuracy) and its ort-int8 bench row")
    opts.shared("--no-progress")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnfold",
        description="Fold BatchNorm into Conv/Linear weights, export verified ONNX/TorchScript/"
                    "torch.export files, serve them, and benchmark CPU against GPU.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _fold_parser(sub)
    _train_parser(sub)
    _export_parser(sub)
    _evaluate_parser(sub)

    p = _add(sub, "serve", _cmd_serve, "serve ONNX models over the Open Inference Protocol v2 (HTTP; gRPC too with --grpc-port)")
    from bnfold.serve.config import add_arguments as add_serve_arguments   # shared with `python -m bnfold.serve`
    add_serve_arguments(p)

    _loadtest_parser(sub)
    _bench_parser(sub)
    _pipeline_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's own parser ("bnfold serve: error: ..."), with what to do
        command = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
        several = [a.metavar or a.dest for a in command._actions if not a.option_strings and a.nargs in ("+", "*")]
        stray = all(not a.startswith("-") for a in extra)
        command.error(f"unrecognized arguments: {' '.join(extra)}" + (
            f" (the {several[0]} arguments must come together: put them all before the options)"
            if several and stray else ""))
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
