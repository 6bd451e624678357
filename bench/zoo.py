"""How much of real models bnfold folds: `python -m bnfold.bench.zoo`.

Builds torchvision and (when installed) timm models with random weights (nothing is downloaded),
randomizes the statistics and affine values of every BatchNorm-like module (a fresh BN is the
identity and would prove nothing), then folds each with `bnfold.fold` and with torch.fx's `fuse`
and prints, per model: BatchNorm-like modules, how many each left, how many bnfold left without
a report entry, exceptions, and the max relative error against the unfolded model; then totals
per source. Detection models are built with torchvision's FrozenBatchNorm2d, as torchvision
builds them from pretrained weights, and compared on their backbone (NMS would amplify rounding).

    python -m bnfold.bench.zoo                                  # a modest default list
    python -m bnfold.bench.zoo --models tv:resnet18,timm:efficientnet_b0
    python -m bnfold.bench.zoo --torchvision-all --timm-families --json zoo.json
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.adapters import BatchNormReader
from bnfold.errors import BnfoldError, first_line
from bnfold.fx_fold import count_batchnorm, fold
from bnfold.parity import compare
from bnfold.progress import progress as progress_bar

__all__ = ["ZooRow", "randomize_batchnorm", "run_model", "run_zoo", "summary", "main"]

DEFAULT_MODELS = (
    "tv:resnet18", "tv:mobilenet_v3_small", "tv:efficientnet_b0", "tv:densenet121", "tv:regnet_x_400mf",
    "tv:shufflenet_v2_x0_5", "tv:googlenet", "tv:r3d_18", "tv:fasterrcnn_resnet50_fpn",
    "tv:deeplabv3_mobilenet_v3_large",
    "timm:efficientnet_b0", "timm:mobilenetv3_small_050", "timm:cspresnet50", "timm:tf_efficientnet_b0",
    "timm:mixnet_s", "timm:levit_128s", "timm:regnetx_002", "timm:dla34", "timm:ghostnet_050",
)


@dataclass
class ZooRow:
    """One model's outcome; `*_left` counts BatchNorm-like modules left after each tool.

    `max_rel_error` compares the folded float32 model with the original; `f64_max_rel_error` the
    same fold done on the model in float64, which shows whether the fold is exact; `own_f32_error`
    how far the original float32 model itself is from its float64 self: random statistics make
    some deep networks ill-conditioned, and float32 rounding then reaches the first figure."""

    model: str
    batchnorms: int = 0
    left: int = 0
    unreported: int = 0
    error: str | None = None
    max_rel_error: float | None = None
    f64_max_rel_error: float | None = None
    own_f32_error: float | None = None
    fx_left: int = 0
    fx_error: str | None = None
    fx_max_rel_error: float | None = None
    input_shape: tuple[int, ...] = ()
    seconds: float = 0.0


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running mean/var and gamma/beta in every BatchNorm-like module of `model`, in place:
    torch's BNs, and modules with `running_mean`/`running_var` (+ `weight`/`bias` or `gamma`/`beta`)
    tensors of C values ((C,) or a broadcastable (1, C, 1, 1)). Means in [-1, 1), variances in
    [0.25, 1.75), gammas in [0.5, 1.5), betas in [-1, 1)."""
    g = torch.Generator().manual_seed(seed)

    def draw(n: int, low: float, width: float, like: torch.Tensor) -> torch.Tensor:
        return (torch.rand(n, generator=g) * width + low).to(like.dtype)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(draw(n, -1, 2, m.running_mean))
                    m.running_var.copy_(draw(n, 0.25, 1.5, m.running_var))
                    m.num_batches_tracked.fill_(7)
                if m.affine:
                    m.weight.copy_(draw(n, 0.5, 1, m.weight))
                    m.bias.copy_(draw(n, -1, 2, m.bias))
                continue
            mean, var = _channel_view(m, "running_mean"), _channel_view(m, "running_var")
            if mean is None or var is None or not hasattr(m, "eps"):
                continue
            n = mean.numel()
            mean.copy_(draw(n, -1, 2, mean))
            var.copy_(draw(n, 0.25, 1.5, var))
            for w_name, b_name in (("weight", "bias"), ("gamma", "beta")):
                w, b = _channel_view(m, w_name), _channel_view(m, b_name)
                if w is not None and b is not None:
                    w.copy_(draw(n, 0.5, 1, w))
                    b.copy_(draw(n, -1, 2, b))
                    break
    return model


def _channel_view(m: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(m, name, None)
    ok = isinstance(value, torch.Tensor) and value.dim() >= 1 and sum(d != 1 for d in value.shape) <= 1
    return value.view(-1) if ok else None


# -- building ----------------------------------------------------------------------------------

_VIDEO_SHAPES = {"s3d": (1, 3, 16, 64, 64)}
_IMAGE_SIZES = (64, 224, 299)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d replaced by torchvision's FrozenBatchNorm2d, in place, as torchvision's
    detection builders do when they load pretrained weights (norm_layer=FrozenBatchNorm2d)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, FrozenBatchNorm2d(child.num_features, eps=child.eps))
        else:
            freeze_batchnorm(child)
    return module


def _build(spec: str) -> tuple[nn.Module, nn.Module | None, list[tuple[int, ...]]]:
    """`(model, part compared instead of the whole model or None, input shapes to try)`."""
    source, _, name = spec.partition(":")
    if source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
        size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
        return model, None, [(1, 3, 64, 64), (1, *size)]
    if source != "tv":
        raise BnfoldError(f"model {spec!r}: expected tv:NAME (torchvision) or timm:NAME")
    import torchvision.models as tvm

    if name in tvm.list_models(module=tvm.detection):
        kwargs = {"weights": None, "weights_backbone": None}
        if not name.startswith("ssd"):
            kwargs.update(min_size=64, max_size=64)
        model = freeze_batchnorm(tvm.get_model(name, **kwargs))
        return model, model.backbone, [(1, 3, 64, 64), (1, 3, 320, 320)]
    if name in tvm.list_models(module=tvm.video):
        return tvm.get_model(name, weights=None), None, [_VIDEO_SHAPES.get(name, (1, 3, 4, 32, 32)), (1, 3, 16, 112, 112)]
    kwargs = {"weights": None}
    if name in tvm.list_models(module=tvm.segmentation):
        kwargs["weights_backbone"] = None
    return tvm.get_model(name, **kwargs), None, [(1, 3, s, s) for s in _IMAGE_SIZES]


def _inputs(model: nn.Module, shapes: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """The first of `shapes` the model runs on."""
    generator = torch.Generator().manual_seed(0)
    errors = []
    for shape in shapes:
        x = torch.randn(shape, generator=generator)
        try:
            with torch.no_grad():
                model(x)
            return x
        except Exception as exc:  # the wrong input size for this model: try the next
            errors.append(f"{list(shape)}: {first_line(exc, with_type=True, limit=200)}")
    raise BnfoldError("the model runs on none of the input shapes tried (" + "; ".join(errors) + ")")


def _bn_calls(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), _BatchNorm))


def _fx_fuse(model: nn.Module, part: nn.Module | None, x: torch.Tensor, row: ZooRow) -> None:
    """torch.fx's `fuse` on the same model: BNs left are those it did not fuse away (it drops
    modules it traced through from the GraphModule, so counting modules would flatter it)."""
    from torch.fx.experimental.optimization import fuse

    try:
        traced = fx.symbolic_trace(copy.deepcopy(model))
        fused = fuse(traced)
    except Exception as exc:  # FX fails on many real models: that is the figure
        row.fx_left, row.fx_error = row.batchnorms, first_line(exc, with_type=True, limit=200)
        return
    row.fx_left = row.batchnorms - (_bn_calls(traced) - _bn_calls(fused))
    try:
        reference, candidate = (model, fused) if part is None else (part, fused.get_submodule("backbone"))
        row.fx_max_rel_error = compare(reference, candidate, x).max_rel_error
    except Exception as exc:
        row.fx_error = first_line(exc, with_type=True, limit=200)


def _param_count(spec: str) -> int | None:
    """Without building the model for real: torchvision's weights metadata, or a timm model built
    on the meta device (no memory, no init arithmetic)."""
    source, _, name = spec.partition(":")
    try:
        if source == "tv":
            import torchvision.models as tvm

            return int(tvm.get_model_weights(name).DEFAULT.meta["num_params"])
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return sum(p.numel() for p in _build(spec)[0].parameters())
    except Exception:
        return None  # the real build says what is wrong


def _too_big(spec: str, max_params: float) -> str | None:
    # A 600M-parameter model would take minutes and gigabytes on a small machine.
    params = _param_count(spec)
    if params is None:
        return None
    return f"{params / 1e6:.0f}M parameters > --max-params {max_params / 1e6:.0f}M" if params > max_params else None


def _exactness(model: nn.Module, part: nn.Module | None, x: torch.Tensor, row: ZooRow) -> None:
    """The same fold on the model in float64 (exact folds agree to ~1e-12), and how far the float32
    model is from its float64 self; a model whose ops refuse float64 leaves both None."""
    try:
        model64 = copy.deepcopy(model).double()
        folded64 = fold(model64)[0]
        if part is not None:
            model64, folded64 = model64.get_submodule("backbone"), folded64.get_submodule("backbone")
        row.f64_max_rel_error = compare(model64, folded64, x.double()).max_rel_error
        row.own_f32_error = compare(model64, part if part is not None else model, x.double()).max_rel_error
    except Exception:  # noqa: S110 -- a figure we cannot get, not a failure of the fold
        pass


def run_model(spec: str, *, seed: int = 0, max_params: float = float("inf")) -> ZooRow:
    """Build, randomize, fold and compare one model (`tv:NAME` or `timm:NAME`); a model with more
    than `max_params` parameters is not built (its row says so)."""
    row = ZooRow(spec)
    start = time.perf_counter()
    try:
        why = _too_big(spec, max_params) if max_params != float("inf") else None
        if why:
            raise BnfoldError(why)
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, part, shapes = _build(spec)
        model = randomize_batchnorm(model, seed).eval()
        row.batchnorms = count_batchnorm(model)
        if row.batchnorms == 0:  # nothing to fold: no need to find its input size
            row.seconds = time.perf_counter() - start
            return row
        x = _inputs(part if part is not None else model, shapes)
        row.input_shape = tuple(x.shape)
    except Exception as exc:
        row.error = f"build: {first_line(exc, with_type=True, limit=200)}"
        row.seconds = time.perf_counter() - start
        return row
    try:
        folded, report = fold(model)
        row.left = count_batchnorm(folded)
        reader, reported = BatchNormReader(), {name for name, _ in report.skipped}
        row.unreported = sum(1 for name, m in folded.named_modules() if reader.is_batchnorm(m) and name not in reported)
        reference, candidate = (model, folded) if part is None else (part, folded.get_submodule("backbone"))
        row.max_rel_error = compare(reference, candidate, x).max_rel_error
    except Exception as exc:
        row.error = first_line(exc, with_type=True, limit=200)
    _exactness(model, part, x, row)
    _fx_fuse(model, part, x, row)
    row.seconds = time.perf_counter() - start
    return row


def run_zoo(models: Iterable[str], *, seed: int = 0, progress: bool = True,
            max_params: float = float("inf"), on_row: Callable[[list[ZooRow]], None] | None = None) -> list[ZooRow]:
    """`run_model` for each of `models`; `on_row(rows so far)` after each (to save partial results)."""
    models = list(models)
    rows = []
    bar = progress_bar(models, desc="zoo", unit="model", enabled=progress)
    for spec in bar:
        bar.set_postfix_str(spec)
        rows.append(run_model(spec, seed=seed, max_params=max_params))
        if on_row is not None:
            on_row(rows)
    return rows


# -- model lists -------------------------------------------------------------------------------

_SIZE_WORDS = ["pico", "femto", "atto", "nano", "xxs", "xxsmall", "tiny", "xs", "xsmall", "small", "s", "b0",
               "lite0", "mini", "m", "medium", "b1", "b", "base", "l", "large"]


def _family(name: str) -> str:
    tokens = name.split("_")
    if tokens[0] in ("tf", "gluon", "legacy") and len(tokens) > 1:
        return f"{tokens[0]}_{_family('_'.join(tokens[1:]))}"
    return re.sub(r"[\d.]+[a-z]?$", "", tokens[0]) or tokens[0]


def _size_key(name: str) -> tuple:
    tokens = name.split("_")
    rank = min((_SIZE_WORDS.index(t) for t in tokens if t in _SIZE_WORDS), default=len(_SIZE_WORDS))
    digits = re.findall(r"\d+", tokens[0])
    return (rank, int(digits[-1]) if digits else 0, len(name), name)


def timm_families() -> list[str]:
    """One timm model per family (the name before its size), the smallest by its name."""
    import timm

    chosen: dict[str, str] = {}
    for name in timm.list_models():
        if name.startswith("test_"):
            continue
        family = _family(name)
        if family not in chosen or _size_key(name) < _size_key(chosen[family]):
            chosen[family] = name
    return [f"timm:{n}" for n in sorted(chosen.values())]


def torchvision_all() -> list[str]:
    import torchvision.models as tvm

    return [f"tv:{n}" for n in tvm.list_models()]


# -- report ------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def summary(rows: Sequence[ZooRow]) -> str:
    """A markdown table per model and one of totals per source."""
    lines = ["| model | BN | bnfold left | unreported | max rel err | float64 | own float32 | fx fuse left | "
             "fx max rel err | error |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.batchnorms == 0 and not r.error:
            continue  # no BatchNorm: nothing to say (counted in the totals' model count)
        error = "; ".join(e for e in (r.error, r.fx_error and f"fx: {r.fx_error}") if e)
        lines.append(f"| {r.model} | {r.batchnorms} | {r.left} | {r.unreported} | {_fmt(r.max_rel_error)} | "
                     f"{_fmt(r.f64_max_rel_error)} | {_fmt(r.own_f32_error)} | {r.fx_left} | {_fmt(r.fx_max_rel_error)} | {error.replace('|', '/')[:90]} |")
    lines += ["", "| source | models | BN modules | bnfold folded | exceptions | unreported | max rel err "
                  "(float32; float64) | float32 > 1e-5 | fx fuse folded | fx exceptions | fx max rel err |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for source in ("tv", "timm"):
        part = [r for r in rows if r.model.startswith(source + ":")]
        if not part:
            continue
        built = [r for r in part if not (r.error or "").startswith("build")]
        total = sum(r.batchnorms for r in built)
        share = lambda left: f"{100 * (total - left) / total:.1f} %" if total else "-"  # noqa: E731
        errs = [r.max_rel_error for r in built if r.max_rel_error is not None]
        errs64 = [r.f64_max_rel_error for r in built if r.f64_max_rel_error is not None]
        # A float32 error over 1e-5 where the float32 model is itself that far from float64.
        noisy = [r for r in built if r.max_rel_error is not None and not r.max_rel_error <= 1e-5]
        conditioned = sum(1 for r in noisy if r.own_f32_error is not None and not r.own_f32_error <= 1e-5)
        fx_errs = [r.fx_max_rel_error for r in built if r.fx_max_rel_error is not None]
        lines.append(
            f"| {'torchvision' if source == 'tv' else 'timm'} | {len(built)} ({sum(1 for r in built if r.batchnorms)} "
            f"with BN; +{len(part) - len(built)} not built) | "
            f"{total} | {share(sum(r.left for r in built))} | {sum(1 for r in built if r.error)} | "
            f"{sum(r.unreported for r in built)} | {_fmt(max(errs, default=None))}; {_fmt(max(errs64, default=None))} | "
            f"{len(noisy)} ({conditioned} ill-conditioned) | "
            f"{share(sum(r.fx_left for r in built))} | {sum(1 for r in built if r.fx_error)} | "
            f"{_fmt(max(fx_errs, default=None))} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from bnfold.options import SHARED, deprecated

    parser = argparse.ArgumentParser(prog="python -m bnfold.bench.zoo", description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated tv:NAME / timm:NAME (default: a modest list)")
    parser.add_argument("--torchvision-all", action="store_true", help="every torchvision model")
    parser.add_argument("--timm-families", action="store_true", help="one timm model per family (the smallest)")
    parser.add_argument("--out", metavar="FILE.json", help="also write the rows to this JSON file")
    deprecated(parser, "--json", "--out", "out")   # --json takes a file nowhere else
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="seed of the random weights and BatchNorm statistics (default 0)")
    parser.add_argument("--max-params", type=float, default=150.0,
                        help="skip models with more parameters than this, in millions (default 150)")
    parser.add_argument("--no-progress", **SHARED["--no-progress"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    models = [m for m in (args.models or "").split(",") if m]
    if args.torchvision_all:
        models += torchvision_all()
    if args.timm_families:
        try:
            models += timm_families()
        except ImportError:
            print("timm is not installed: no timm models", file=sys.stderr)
    if not models:
        models = list(DEFAULT_MODELS)
    try:
        import timm  # noqa: F401
    except ImportError:
        models = [m for m in models if not m.startswith("timm:")]
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    def save(rows: list[ZooRow]) -> None:
        if args.out:  # after every model: a long run that is stopped keeps what it measured
            with open(args.out, "w") as fh:
                json.dump([asdict(r) for r in rows], fh, indent=1)

    rows = run_zoo(dict.fromkeys(models), seed=args.seed, progress=args.progress,
                   max_params=args.max_params * 1e6, on_row=save)
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
