"""`reslab` command line: one subcommand per job, each a thin layer over the library."""

from __future__ import annotations

import argparse
import dataclasses
import math
import signal
import sys
from collections.abc import Callable, Sequence

from reslab.models.registry import MAX_INPUT_SIZE, MAX_RESIZE  # torch-free

# torch.compile's modes (torch.compile(mode=...)); reduce-overhead adds CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

Handler = Callable[[argparse.Namespace], int]
MAX_PIXELS_HELP = ("decompression-bomb limit: images over N pixels are skipped and reported "
                   "(default PIL's MAX_IMAGE_PIXELS, about 89.5 million)")  # fmt: skip


def _fmt_count(x: float) -> str:
    return f"{x / 1e9:.2f}G" if x >= 1e9 else f"{x / 1e6:.2f}M"


def cmd_models(args: argparse.Namespace) -> int:
    """Print the model zoo with our parameter and multiply-add counts beside the paper's."""
    from reslab.analysis.zoo import PAPER_SHORTCUT, zoo_rows

    rows, notes = [], []
    for r in zoo_rows():
        if args.family is not None and r["family"] != args.family:
            continue
        err = "" if r["paper_error"] is None else f"{r['paper_error']:.2f}"
        paper_sc = PAPER_SHORTCUT.get(r["name"])
        if err and paper_sc is not None and paper_sc != r["shortcut"]:
            err += f" ({paper_sc})"
            notes.append(f"({paper_sc}): {r['name']}'s paper error is for shortcut option "
                         f"{paper_sc} (Table 2); ours is built with {r['shortcut']}.")  # fmt: skip
        rows.append([
            r["name"], r["family"], str(r["depth"]), f"{r['input_size']}px", r["shortcut"],
            _fmt_count(r["params"]),
            "" if r["paper_params"] is None else _fmt_count(r["paper_params"]),
            _fmt_count(r["macs"]), "" if r["paper_macs"] is None else _fmt_count(r["paper_macs"]),
            err,
        ])  # fmt: skip
    head = ["model", "family", "depth", "input", "shortcut", "params", "paper",
            "mult-adds", "paper", "paper top-1 err %"]  # fmt: skip
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print("\nImageNet mult-adds are for the paper's v1 (stride on the bottleneck's first 1x1).")
    for n in notes:
        print(n)
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model zoo with parameter and FLOP counts")
    p.add_argument("--family", choices=["imagenet", "cifar", "alexnet"], default=None)
    p.set_defaults(func=cmd_models)


def _add_model_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="FILE", help="a reslab checkpoint or safetensors file")
    src.add_argument(
        "--weights", metavar="FILE", help="weights in any supported format (torchvision, "
        "pytorch_resnet_cifar10 .th, safetensors, DataParallel state_dict, reslab)",
    )  # fmt: skip
    p.add_argument("--model", metavar="NAME", help="architecture for --weights (default: detected)")


def _load_model_source(args: argparse.Namespace):
    from reslab.models.weights import model_from_weights

    if args.checkpoint is not None:
        if args.model is not None:
            raise ValueError("--model goes with --weights; a --checkpoint names its own model")
        return model_from_weights(args.checkpoint)
    return model_from_weights(args.weights, model_name=args.model)


def _fail(cmd: str, err: BaseException | str) -> int:
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # end a progress bar's line first
        bar.close()
    line = _one_line(err)
    line = line.removeprefix(f"reslab {cmd}: ")  # a message that already names the command
    print(f"reslab {cmd}: error: {line}", file=sys.stderr)
    return 2


def _os_error(e: OSError) -> str:
    """One line for a failed file operation: what failed and on which file."""
    where = f" ({e.filename})" if e.filename else ""
    return f"{e.strerror or e}{where}"


def cmd_export(args: argparse.Namespace) -> int:
    """Write the model as ONNX or TorchScript with its preprocessing and classes inside."""
    from reslab.errors import check_output_file
    from reslab.export import export_weights

    try:
        args.format = args.format or _export_format(args.out)
        check_output_file(args.out, "--out", [args.checkpoint, args.weights])
        model, info = _load_model_source(args)
        out, size = export_weights(model, info, args.out, format=args.format)
    except (ValueError, KeyError) as e:
        return _fail("export", e)
    except OSError as e:  # e.g. the folder became unwritable, or the disk is full
        from pathlib import Path

        # the atomic write's temporary file beside --out (.NAME.tmpXXXX): name --out instead
        if e.filename and Path(str(e.filename)).name.startswith(f".{Path(args.out).name}."):
            return _fail("export", f"--out {args.out}: {e.strerror or e} (writing beside it); "
                         "choose a folder you can write to")  # fmt: skip
        return _fail("export", e if isinstance(e, FileNotFoundError) else _os_error(e))
    print(f"wrote {out} ({args.format}, {info.model_name}, input [N, 3, {size}, {size}])")
    return 0


# --out's suffix names the format when --format is not given (TorchScript files are usually .pt).
_EXPORT_SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript",
                    ".torchscript": "torchscript"}  # fmt: skip


def _export_format(out: str) -> str:
    from pathlib import Path

    fmt = _EXPORT_SUFFIXES.get(Path(out).suffix.lower())
    if fmt is None:
        raise ValueError(f"--out {out}: its suffix names no format; end it in .onnx or .pt, or "
                         "add --format onnx or --format torchscript")  # fmt: skip
    return fmt


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model to ONNX or TorchScript (dynamic batch)")
    _add_model_source(p)
    p.add_argument("--format", choices=["onnx", "torchscript"],
                   help="default: from --out's suffix (.onnx; .pt, .ts: TorchScript)")  # fmt: skip
    p.add_argument("--out", required=True, metavar="FILE")
    p.set_defaults(func=cmd_export)


def cmd_predict(args: argparse.Namespace) -> int:
    """Top-k classes per image, using the preprocessing stored with the weights."""
    import json
    import os

    from reslab.predict import PredictError, collect_images, predict_with, write_csv

    try:
        if args.csv and not os.path.isdir(os.path.dirname(os.path.abspath(args.csv))):
            raise PredictError(f"--csv {args.csv}: its folder does not exist; create it first")
        paths = collect_images(args.inputs)
        from reslab.errors import check_output_file

        check_output_file(args.csv, "--csv", [*paths, args.checkpoint, args.weights])
        model, info = _load_model_source(args)
        if args.normalize and info.preprocess is not None:
            print(f"reslab predict: note: --normalize {args.normalize} is not used: "
                  f"{info.path} says how its inputs were normalised", file=sys.stderr)  # fmt: skip
        preds, seconds = predict_with(
            model, info, paths, normalize=args.normalize, device=args.device,
            precision=args.precision, backend=args.backend, topk=args.topk,
            batch_size=args.batch_size, max_pixels=args.max_pixels,
        )  # fmt: skip
        if args.csv:
            write_csv(preds, args.csv, topk=args.topk)
    except (ValueError, KeyError, FileNotFoundError, PredictError) as e:
        return _fail("predict", e)
    except OSError as e:  # --csv into a folder that does not exist or is not writable
        return _fail("predict", f"--csv {args.csv}: {e.strerror}")
    if args.json:
        print(json.dumps([p.to_dict() for p in preds], indent=1))
    else:
        for p in preds:
            if p.error is not None:
                print(f"{p.path}: ERROR {p.error}")
            else:
                print(f"{p.path}: " + ", ".join(f"{c} {v:.1%}" for c, v in p.top))
    bad = sum(p.error is not None for p in preds)
    # The rate covers reading, decoding and resizing as well as the network: what a user gets.
    print(f"{len(preds)} images in {seconds:.2f} s ({len(preds) / max(seconds, 1e-9):.1f} "
          f"images/s, decoding included)" + (f"; wrote {args.csv}" if args.csv else ""),
          file=sys.stderr)  # fmt: skip
    if bad:
        print(f"{bad} of {len(preds)} images could not be read", file=sys.stderr)
    return 1 if bad else 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify images (files or directories)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE|DIR")
    _add_model_source(p)
    p.add_argument("--topk", type=_positive, default=5)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    p.add_argument("--csv", metavar="FILE", help="also write path, top-k classes and "
                   "probabilities (or the error) per image to a CSV file")  # fmt: skip
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--max-pixels", type=_positive, help=MAX_PIXELS_HELP)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 autocast where the hardware has native bf16, fp16 on a GPU "
                   "without it, else fp32")  # fmt: skip
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="onnxruntime: export once, then run fp32 on the CPU")  # fmt: skip
    p.add_argument("--normalize", choices=["imagenet", "cifar10"], default=None,
                   help="only for weights that carry no preprocessing")  # fmt: skip
    p.set_defaults(func=cmd_predict)


def _is_image_folder(path: str | None) -> bool:
    """A directory of class subfolders (or train/ and val/), not a CIFAR download."""
    from pathlib import Path

    from reslab.data.folder import check_listable

    if not path or not Path(path).is_dir():
        return False
    root = Path(path)
    check_listable(root)  # an unreadable folder is refused by name, not guessed at
    if any((root / d).is_dir() for d in ("cifar-10-batches-py", "cifar-100-python")):
        return False
    return any(p.is_dir() for p in root.iterdir())


def _auto_recipe(args: argparse.Namespace) -> str | None:
    if args.dataset in ("cifar10", "cifar100"):
        return None
    return "finetune" if args.dataset == "folder" or _is_image_folder(args.data) else None


def _train_config(args: argparse.Namespace):
    """Recipe, then --set assignments, then the explicit flags (which win). Without --recipe an
    image folder gets the finetune recipe; without --model, --weights name the architecture."""
    from reslab.data import check_data_root, resolve_data_root
    from reslab.engine.config import TrainConfig, load_recipe

    stored = _stored_config(args) if args.resume and args.recipe is None else None
    recipe = None if stored is not None else args.recipe or _auto_recipe(args)
    if recipe is not None and args.recipe is None:
        why = (
            "--dataset folder"
            if args.dataset == "folder"
            else f"--data {args.data} is an image folder"
        )
        _notice(f"{why}: recipe finetune (see train --help)")
    cfg = stored or (load_recipe(recipe) if recipe else TrainConfig())
    cfg = cfg.override(args.set or [])
    named = None
    if args.model is None and args.weights is not None:
        from reslab.models.weights import read_weights

        named = read_weights(args.weights)[1].get("model_name")
    chose_batch = args.batch_size is not None or any(
        a.startswith("batch_size=") for a in args.set or []
    )
    flags = {
        "model": args.model or named, "data": args.data, "dataset": args.dataset,
        "epochs": args.epochs, "out": args.out, "device": args.device,
        "precision": args.precision, "seed": args.seed, "weights": args.weights,
        "num_classes": args.num_classes, "save_every": args.save_every,
        "eval_every": args.eval_every, "time_limit": args.time_limit,
        "channels_last": args.channels_last, "compile_mode": args.compile_mode,
        "compile": True if args.compile_mode else args.compile,
        "download": args.download or None, "sync_bn": args.sync_bn or None,
        "lr": args.lr, "batch_size": args.batch_size, "workers": args.workers,
        "max_pixels": args.max_pixels,
        "fit_batch": False if chose_batch else None,  # the user's batch: refused if too large
    }  # fmt: skip
    cfg = dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    if args.max_pixels is not None and cfg.dataset != "folder":
        from reslab.engine.config import ConfigError

        # It would do nothing: CIFAR's images are 32x32 arrays, never decoded from files.
        raise ConfigError(
            f"--max-pixels limits the images read from an image folder; {cfg.dataset} images are "
            "32x32 and have no such limit: drop the flag"
        )
    own_milestones = any(a.split("=", 1)[0].strip() == "milestones" for a in args.set or [])
    own_warmup = any(a.split("=", 1)[0].strip() == "warmup_iters" for a in args.set or [])
    before = stored
    if args.resume and stored is None and args.recipe is not None:
        before = _stored_config(args)  # --resume --recipe NAME: the run's own schedule
        if before is not None and not own_milestones:
            cfg.milestones = list(before.milestones)
        if before is not None and not own_warmup:
            cfg.warmup_iters = before.warmup_iters  # as shorten_warmup left it
    if args.iters is not None and (before is not None or own_milestones):
        # A resumed run keeps its own milestones (a longer run only moves where it stops), and
        # so do milestones given with --set.
        cfg.epochs, cfg.iters = None, args.iters
    elif args.iters is not None:
        from reslab.engine.run_length import scale_milestones, shorten_warmup

        cfg.epochs = None  # an explicit --iters wins over a recipe's epochs
        for note in (
            scale_milestones(cfg, args.iters),
            None if own_warmup else shorten_warmup(cfg),
        ):
            if note:
                _notice(note)
    check_data_root(cfg.data)  # before it becomes a plain path: name --data or $RESLAB_DATA
    cfg.data = resolve_data_root(cfg.data)
    cfg.validate(source="reslab train")
    return cfg


def _stored_config(args: argparse.Namespace):
    """`--resume` without --recipe continues the run as it was configured: RUN_DIR/config.yaml
    (plain YAML, read safely) is the base that --set and the flags change; the trainer then
    refuses any change other than the run's length and where it runs. Where config.yaml is
    gone or damaged, the configuration stored in last.pt (the one the trainer compares with)."""
    from pathlib import Path

    from reslab.engine.config import ConfigError, TrainConfig
    from reslab.runtime.yaml_file import YamlFileError, read_yaml

    run = Path(args.out or "runs/run")
    path = run / "config.yaml"
    doc, damage = None, "is missing"
    if path.is_file():
        try:
            doc = read_yaml(path)
        except (OSError, YamlFileError) as e:
            damage = f"cannot be read ({e if isinstance(e, YamlFileError) else e.strerror})"
        else:
            if isinstance(doc, dict):
                return TrainConfig.from_dict(
                    {k: v for k, v in doc.items() if not k.startswith("_")}, source=str(path)
                )
            damage = "is empty" if doc is None else f"holds a {type(doc).__name__}, not a mapping"
    if not (run / "last.pt").is_file():
        if damage == "is missing":
            return None  # nothing to resume from: _check_something_to_resume has said so
        raise ConfigError(f"{path} {damage} and there is no last.pt; resume with --recipe NAME")
    from reslab.runtime.checkpoint import load_checkpoint

    stored = load_checkpoint(run / "last.pt").get("config")
    if not isinstance(stored, dict):
        raise ConfigError(f"{path} {damage} and {run / 'last.pt'} holds no configuration; "
                          "resume with --recipe NAME (the run's own)")  # fmt: skip
    _notice(f"{path} {damage}: resuming with the configuration stored in last.pt")
    return TrainConfig.from_dict(stored, source=f"{run / 'last.pt'}")


def _notice(text: str) -> None:
    """A note on how the configuration was read, said once: by a single process, by rank 0 of
    a torchrun run, and by `train --nproc`'s launcher rather than its workers."""
    import os

    if os.environ.get("RANK", "0") != "0" or os.environ.get(_LAUNCHED) == "1":
        return
    print(f"reslab train: {text}", file=sys.stderr, flush=True)


_LAUNCHED = "RESLAB_NPROC_WORKER"  # set for the workers `train --nproc` starts


def _check_something_to_resume(out: str) -> None:
    """`--resume` into a folder with no run (a mistyped --out) had started a new run of the
    defaults (64k iterations of cifar10-paper) under the banner "recipe the run's config.yaml".
    A run killed before its first checkpoint still has its config.yaml and starts again on it."""
    from pathlib import Path

    from reslab.engine.rundir import RunDirError

    run = Path(out)
    if not (run / "last.pt").exists() and not (run / "config.yaml").exists():
        where = (
            "does not exist" if not run.exists() else "holds no run (no last.pt, no config.yaml)"
        )
        raise RunDirError(
            f"--resume: {out} {where}: nothing to resume; check --out, or leave out --resume to "
            "start a new run there"
        )


def cmd_train(args: argparse.Namespace) -> int:
    import os

    if args.nproc and args.nproc > 1:
        return _relaunch_torchrun(args)
    if args.max_restarts and "TORCHELASTIC_RUN_ID" not in os.environ:
        # Restarts are torchrun's: one process started here has nobody to restart it.
        return _fail("train", "--max-restarts works with --nproc N (N >= 2), which runs the "
                     "processes under torchrun; without it, rerun with --resume after a failure")  # fmt: skip
    from reslab.engine.trainer import TrainingDiverged, train
    from reslab.errors import UserError

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        cfg = _train_config(args)
        if args.resume:
            _check_something_to_resume(cfg.out)
        recipe = args.recipe or ("the run's config.yaml" if args.resume else _auto_recipe(args))
        final = train(cfg, resume=args.resume, recipe=recipe)
    except (UserError, TrainingDiverged) as e:
        return _fail("train", _one_line(e))
    except OSError as e:  # e.g. permission denied: name the file
        return _fail("train", _os_error(e))
    except RuntimeError as e:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world < 2 or not _peer_lost(e):
            raise
        # Another process of a --nproc run died (killed, out of memory): this one's collective
        # fails. One line with what to do, instead of a traceback through backward().
        return _fail("train", f"a collective of this {world}-process run failed "
                     f"({_one_line(e)[:200]}): if another process stopped (killed, out of "
                     "memory), the run keeps its last checkpoint and the same command with "
                     "--resume continues it")  # fmt: skip
    if os.environ.get("RANK", "0") == "0":
        print(_summary(final, cfg.out))
        done, planned = int(final.get("iter", 0)), _planned_iters(cfg)
        if cfg.time_limit is not None and planned and 0 < done < planned:
            print(f"stopped by the time limit ({cfg.time_limit:g} s) at iteration {done:,} of "
                  f"{planned:,}; `reslab train --out {cfg.out} --resume` continues it")  # fmt: skip
    return 0


def _peer_lost(e: RuntimeError) -> bool:
    """Whether e is a collective's failure because a peer process went away."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return any(k in text for k in ("Connection closed by peer", "Connection reset by peer",
                                   "Broken pipe"))  # fmt: skip


def _planned_iters(cfg) -> int | None:  # type: ignore[no-untyped-def]
    """The run's length as it worked it out (from --epochs: RUN_DIR/config.yaml; train() leaves
    the caller's config as it was)."""
    from pathlib import Path

    from reslab.runtime.yaml_file import YamlFileError, read_yaml

    try:
        doc = read_yaml(Path(cfg.out) / "config.yaml")
    except (OSError, YamlFileError):
        doc = None
    iters = doc.get("iters") if isinstance(doc, dict) else None
    return iters if isinstance(iters, int) else cfg.iters


def _one_line(e: BaseException | str) -> str:
    # Some library messages (a weights file that does not fit) list details on further lines.
    # "... (file: x; model: y):" then detail lines: joined with "; ", the colon goes.
    lines = [ln.strip().rstrip(":") for ln in str(e).splitlines() if ln.strip()]
    return "; ".join(lines) if len(lines) <= 4 else "; ".join(lines[:4]) + "; ..."


def _summary(final: dict, out: str) -> str:
    errs = ", ".join(
        f"{k.removesuffix('_error')} error {final[k]:.2f}%" for k in ("val_error", "test_error")
        if k in final
    )  # fmt: skip
    return f"done: {final.get('iter', 0)} iterations, {errs or 'nothing evaluated'}; run in {out}"


def _relaunch_torchrun(args: argparse.Namespace) -> int:
    """`reslab train --nproc N [--max-restarts K] ...` = `torchrun --standalone
    --nproc-per-node N --max-restarts K -m reslab train ...` (one machine)."""
    import os
    import subprocess

    from reslab.data.setup import check_data_exists
    from reslab.engine.config import check_batch_divides
    from reslab.errors import UserError

    try:  # what every worker would refuse, refused once here and not N times in tracebacks
        cfg = _train_config(args)
        check_batch_divides(cfg.batch_size, args.nproc)
        check_data_exists(cfg)
    except UserError as e:
        return _fail("train", _one_line(e))
    argv, skip = [], False
    for a in args.argv:  # the command line without the launcher's own options
        if skip:
            skip = False
        elif a in ("--nproc", "--max-restarts"):
            skip = True
        elif not a.startswith(("--nproc=", "--max-restarts=")):
            argv.append(a)
    cmd = [sys.executable, "-c", _TORCHRUN, "--standalone", f"--nproc-per-node={args.nproc}",
           f"--max-restarts={args.max_restarts}", "-m", "reslab", *argv]  # fmt: skip
    # torchrun stops its workers on SIGTERM, but a SIGTERM (`timeout`, `kill PID`) or SIGKILL of
    # this launcher alone had left torchrun and the workers training on in the background,
    # holding the run directory: pass SIGTERM/SIGHUP on, and have the kernel send torchrun a
    # SIGTERM when this process dies (set by the child itself before it execs torchrun: a
    # preexec_fn would run Python in a forked copy of a process whose other threads may hold
    # locks).
    proc = subprocess.Popen([sys.executable, "-c", _EXEC_WITH_PARENT, str(os.getpid()), *cmd[1:]],
                            env={**os.environ, _LAUNCHED: "1"})  # fmt: skip
    forward = lambda signum, frame: proc.send_signal(signum)  # noqa: E731
    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP)}
    interrupted = False
    try:
        while True:
            try:
                rc = proc.wait()
                break
            except KeyboardInterrupt:  # Ctrl-C reached torchrun too: let it stop its workers
                interrupted = True
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if interrupted:
        raise KeyboardInterrupt  # main's one line and exit code 130
    return rc


# torchrun (torch.distributed.run's main) whose failures end in one line, not its traceback and
# failure table: a worker that exits 2 has said why in its own line (bad input each worker
# meets, e.g. a --data folder that does not exist: it had ended in ChildFailedError's traceback
# and exit code 1); any other failure names the worker and how it ended. Its exit code: the
# first failed worker's (128 + N for a signal N), as a single process would have ended.
_TORCHRUN = """import logging, os, sys
os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun gives its workers, minus its banner
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main
logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
try:
    main(sys.argv[1:])
except ChildFailedError as e:
    rank, failure = e.get_first_failure()
    code = failure.exitcode
    if code != 2:
        how = f"was killed by {failure.signal_name()}" if code < 0 else f"exited with code {code}"
        print(f"reslab train: error: worker {rank} of the --nproc run {how} (its output is above); "
              "`--resume` continues the run from its last checkpoint", file=sys.stderr)
    sys.exit(128 - code if code < 0 else code)
except SignalException as e:
    sys.exit(128 + int(e.sigval))
except KeyboardInterrupt:
    sys.exit(130)
"""

# The launcher's child: SIGTERM on the launcher's death (Linux's PR_SET_PDEATHSIG, which an exec
# keeps; elsewhere nothing), then it becomes `python ARGS...` (_TORCHRUN). argv: launcher pid, ARGS.
_EXEC_WITH_PARENT = """import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(143)  # the launcher died before the line above
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model with one of the paper's recipes, or fine-tune on a folder",
        description="Train with a recipe; fine-tune on an image folder with just "
        "`reslab train --data DIR --weights FILE --out RUN_DIR`.",
        epilog=_recipes_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--recipe", help="a recipe below, or a YAML path (default: finetune for an "
                   "image folder, else the paper's CIFAR-10 settings)")  # fmt: skip
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--model", type=_model_name, help="architecture (`reslab models`); default: "
                   "the one --weights name, else the recipe's")  # fmt: skip
    p.add_argument("--data", help="data directory (default $RESLAB_DATA)")
    p.add_argument("--dataset", choices=["cifar10", "cifar100", "folder"])
    p.add_argument("--iters", type=_positive, help="iterations; a step schedule's milestones "
                   "scale with it")  # fmt: skip
    p.add_argument("--epochs", type=_epochs, help="passes over the training set (sets --iters)")
    p.add_argument("--lr", type=float, help="base learning rate")
    p.add_argument("--batch-size", type=_positive, help="mini-batch, over all processes")
    p.add_argument("--workers", type=_workers, help="image-folder loader processes (default: auto)")
    p.add_argument("--max-pixels", type=_positive, help=MAX_PIXELS_HELP)
    p.add_argument("--threads", type=_threads, help="CPU threads for torch (default: torch's)")
    p.add_argument("--out", help="run directory (config, metrics.jsonl, checkpoints)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model (default: off, or as the recipe says)",
    )
    p.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        help="torch.compile mode (implies --compile); reduce-overhead: CUDA graphs",
    )
    p.add_argument("--seed", type=_seed)
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--weights", help="initial weights (torchvision, reslab, safetensors, .th)")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--time-limit", type=_seconds,
                   help="wall-clock seconds for this call (evaluations included), then a final "
                   "eval; --resume continues a stopped run with the limit afresh")  # fmt: skip
    p.add_argument("--download", action="store_true", help="fetch CIFAR if it is missing")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes")
    p.add_argument("--nproc", type=_positive, help="processes on this machine (wraps torchrun)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="with --nproc: restart the processes this often after a failure; "
                   "they resume from RUN_DIR/last.pt")  # fmt: skip
    p.set_defaults(func=cmd_train)


def _recipes_epilog() -> str:
    import textwrap

    import yaml

    from reslab.engine.config import CONFIG_DIR, list_recipes

    lines = ["recipes (--recipe NAME):"]
    for name in list_recipes():
        desc = (yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text()) or {}).get("description")
        text = textwrap.fill(desc or "", width=96, initial_indent="      ",
                             subsequent_indent="      ")  # fmt: skip
        lines += [f"  {name}", text]
    return "\n".join(lines)


def _model_name(text: str) -> str:
    from reslab.models import list_models

    if text not in list_models():
        raise argparse.ArgumentTypeError(
            f"unknown model {text!r}; the zoo (`reslab models`): {', '.join(list_models())}"
        )
    return text


def cmd_data(args: argparse.Namespace) -> int:
    """`reslab data check|stats|download`: the work lives in reslab.data."""
    import logging

    from reslab.errors import UserError

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.data_command == "check":
            from reslab.data.check import check_data

            print(check_data(
                args.dir, quick=args.quick, labels_file=args.labels, min_size=args.min_size,
                max_pixels=args.max_pixels, num_workers=args.workers,
            ))  # fmt: skip
        elif args.data_command == "stats":
            from reslab.data.stats import (
                cifar_datasets,
                compute_cifar_stats,
                compute_folder_stats,
                save_stats,
            )  # fmt: skip
            from reslab.errors import check_output_file

            # Before the long scan; never into the data it reads (a stats file written over an
            # image or a CIFAR batch would destroy it).
            if args.crop_size > args.resize:  # before check_output_file makes --out's folder
                raise UserError(
                    f"--crop-size {args.crop_size} is larger than --resize {args.resize}: the "
                    "crop is taken from the image resized to that shorter side"
                )
            check_output_file(args.out, "--out", create_parent=True, input_dirs=[args.dir])
            found = cifar_datasets(args.dir)
            if found:
                name, root = found[0]
                stats = compute_cifar_stats(root, dataset=name, split=args.split)
            else:
                stats = compute_folder_stats(
                    args.dir, resize=args.resize, crop_size=args.crop_size, labels_file=args.labels,
                    max_images=args.max_images, num_workers=args.workers,
                    max_pixels=args.max_pixels,
                )  # fmt: skip
            print(stats.describe())
            print(f"saved {save_stats(stats, args.out)}")
        else:
            from reslab.data.cifar import download_cifar

            print(f"{args.dataset} ready in {download_cifar(args.dir, dataset=args.dataset)}")
    except UserError as e:  # DataError, or an --out that cannot be written
        return _fail("data", e)
    except OSError as e:  # e.g. `data download FILE`, a folder that became unwritable
        return _fail("data", _os_error(e))
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="check a data set, compute its statistics, download CIFAR")
    dsub = p.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("check", help="scan a data set without training: images per class, "
                        "unusable files and why (CIFAR directories are read as CIFAR)")  # fmt: skip
    c.add_argument("dir")
    c.add_argument("--quick", action="store_true", help="read headers only (no full decode)")
    c.add_argument("--labels", default=None, help="label file of a flat (ImageNet val) folder")
    c.add_argument("--min-size", type=_count, default=224,
                   help="report images smaller than this")  # fmt: skip
    c.add_argument("--max-pixels", type=_positive, default=None, help=MAX_PIXELS_HELP)
    c.add_argument("--workers", type=_workers, default=0)
    s = dsub.add_parser("stats", help="mean image, per-channel mean/std, RGB PCA -> a file")
    s.add_argument("dir")
    s.add_argument("--out", default="reslab-stats.pt", help="output file (default %(default)s)")
    s.add_argument("--split", default="train", choices=["train", "train45k"], help="CIFAR split")
    s.add_argument("--labels", default=None, help="label file of a flat (ImageNet val) folder")
    s.add_argument("--resize", type=_pixels(MAX_RESIZE), default=256)
    s.add_argument("--crop-size", type=_pixels(MAX_INPUT_SIZE), default=224)
    s.add_argument("--max-images", type=_positive, default=None, help="a fixed random subset")
    s.add_argument("--workers", type=_workers, default=0)
    s.add_argument("--max-pixels", type=_positive, default=None, help=MAX_PIXELS_HELP)
    d = dsub.add_parser("download", help="fetch CIFAR with torchvision's downloader")
    d.add_argument("dir")
    d.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100"])
    p.set_defaults(func=cmd_data)


def cmd_reproduce(args: argparse.Namespace) -> int:
    """`reslab reproduce NAME`: train the experiment's runs, then write DIR/REPORT.md."""
    import os

    from reslab.data.cifar import DataError
    from reslab.experiments.runner import ConfigMismatch, RunProcessDied, reproduce

    opts = reproduce_options(args)
    try:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"--out {args.out} is a file; give a folder for REPORT.md and runs/")
        from reslab.data import check_data_root
        from reslab.errors import check_output_file

        check_data_root(args.data, folders=False)
        if not args.dry_run:
            # Before any training: an unwritable --out would fail at the report, after hours.
            for flag, path in (("--out", args.out), ("--runs", args.runs)):
                check_output_file(path, flag, folder=True)
        if args.dry_run:
            from reslab.experiments.runner import describe_plan, make_plan

            ctx, _, plan = make_plan(args.name, **opts)
            print(describe_plan(ctx, plan))
            return 0
        path = reproduce(args.name, **opts)
    except (DataError, ConfigMismatch, RunProcessDied, ValueError) as e:
        return _fail("reproduce", e)
    except OSError as e:  # e.g. the folder became unwritable, or the disk is full
        return _fail("reproduce", _os_error(e))
    print(f"report: {path}")
    return 0


def reproduce_options(args: argparse.Namespace) -> dict:
    """make_plan's keyword arguments from `reslab reproduce` flags (runner.reproduce_argv's
    inverse)."""
    return dict(
        budget=args.budget, out=args.out, seeds=args.seeds, data=args.data, device=args.device,
        runs=args.runs, jobs=args.jobs, compile=args.compile or args.compile_mode or False,
        progress=not args.quiet, only=args.only, time_limit=args.time_limit,
        fused={"auto": None, "on": True, "off": False}[args.fused], threads=args.threads,
    )  # fmt: skip


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one run name, e.g. resnet20-s0")
    return names


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def _epochs(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and 0 < v <= 100_000):  # checked even where --iters overrides it
        raise argparse.ArgumentTypeError(f"must be a number of epochs in (0, 100000], got {text!r}")
    return v


def _pixels(hi: int) -> Callable[[str], int]:
    """An argparse type for an image side: 8..hi pixels (a typo must not become a huge batch)."""

    def parse(text: str) -> int:
        if not text.isdigit() or not 8 <= int(text) <= hi:
            raise argparse.ArgumentTypeError(f"must be 8..{hi} pixels, got {text!r}")
        return int(text)

    return parse


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return v


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return int(text)


def _workers(text: str) -> int:
    if not text.isdigit() or int(text) > 1024:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to 1024, got {text!r}")
    return int(text)


def _threads(text: str) -> int:
    n = _positive(text)
    if n > 1024:  # torch allocates per-thread state up front: 10^5 threads is a MemoryError
        raise argparse.ArgumentTypeError(f"must be at most 1024, got {text!r}")
    return n


def _seed(text: str) -> int:
    if not text.isdigit() or int(text) >= 2**63:  # torch.manual_seed's range
        raise argparse.ArgumentTypeError(f"must be a whole number in 0..2^63-1, got {text!r}")
    return int(text)


def _minutes(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = float("nan")
    if not (0 < x < 10_000):  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be a number of minutes > 0, got {text!r}")
    return x


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    from reslab.experiments.runner import BUDGETS, EXPERIMENTS

    p = sub.add_parser("reproduce", help="run one of the paper's tables/figures and write a report")
    p.add_argument("name", choices=sorted(EXPERIMENTS))
    p.add_argument("--budget", choices=BUDGETS, required=True,
                   help="smoke: ~1 min check; cpu: ~45 min scaled-down schedule; cpu-long: "
                   "table6/fig6/fig7 at 20 and 56 layers, 4x longer (~75 min with --jobs 2); "
                   "cpu-xl: table6 at 20 and 56 layers, 8x longer (~85 min); "
                   "full: the paper's schedule (GPU)")  # fmt: skip
    p.add_argument("--out", required=True, help="directory for REPORT.md, figures and runs/")
    p.add_argument(
        "--seeds", type=_positive, default=1, help="runs per configuration (seeds 0..N-1)"
    )
    p.add_argument("--data", help="directory holding cifar-10-batches-py (default $RESLAB_DATA)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--runs", help="RUN_DIR root shared between experiments (default OUT/runs)")
    p.add_argument("--threads", type=_threads, help="CPU threads for torch (default: torch's)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once (processes sharing the device; GPU: 4-8)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each model (GPU)")
    p.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        help="torch.compile mode (implies --compile); reduce-overhead: CUDA graphs",
    )
    p.add_argument(
        "--only",
        type=_names,
        help="comma-separated run names (see --dry-run): train and report these only",
    )
    p.add_argument(
        "--time-limit",
        type=_seconds,
        help="seconds of training per run in this call; a run stopped by it gets a final "
        "evaluation, is marked STOPPED in the report, and resumes on the next call",
    )
    p.add_argument(
        "--fused",
        choices=["auto", "on", "off"],
        default="auto",
        help="with --seeds K: train each configuration's K seeds as one grouped net (auto: on "
        "where measured faster, see README)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars or run headers; each evaluation row names its run",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the runs and whether each is new, finished or to resume; train nothing",
    )
    p.set_defaults(func=cmd_reproduce)


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate one checkpoint, or several as an ensemble (softmax scores averaged)."""
    import os
    from pathlib import Path

    from reslab.data.cifar import DataError
    from reslab.engine.eval_run import format_report, run_eval, write_outputs
    from reslab.errors import UserError, check_output_file

    try:
        # Before the (long) evaluation: its results must have somewhere to go.
        if args.scales and args.views != "multi-scale":
            raise ValueError("--scales goes with --views multi-scale; add it or drop --scales")
        if args.checkpoint and args.model is not None:  # as predict and export refuse it
            raise ValueError("--model goes with --weights; a --checkpoint names its own model")
        check_output_file(args.json, "--json", [*(args.checkpoint or ()), args.weights])
        files = args.checkpoint or [args.weights]
        out = Path(args.out) if args.out else None
        if out is None and files[0] is not None:  # (neither source given: run_eval says so)
            out = Path(files[0]).parent / "eval"
        if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"--out {args.out} is a file; give a folder for the confusion PNGs")
        # A PNG in an image folder's class folder would train as an image of that class (with
        # no --dataset the checkpoint may name a folder: the same care).
        from reslab.data import resolve_data_root

        root = resolve_data_root(args.data)  # --data, else $RESLAB_DATA
        folder = args.dataset == "folder" or (args.dataset is None and _is_image_folder(root))
        data_dirs = [root] if folder else []
        check_output_file(out, "--out", folder=True, input_dirs=data_dirs)
        result, members, classes = run_eval(
            checkpoints=args.checkpoint or (),
            weights=args.weights,
            model_name=args.model,
            labels_file=args.labels,
            workers=args.workers,
            max_pixels=args.max_pixels,
            data=args.data,
            dataset=args.dataset,
            split=args.split,
            views=args.views,
            scales=args.scales,
            batch_size=args.batch_size,
            device=args.device,
            precision=args.precision,
            limit=args.limit,
            normalize=args.normalize,
        )
    except (DataError, ValueError, FileNotFoundError) as e:  # WeightsError is a ValueError
        return _fail("eval", e)
    from reslab.engine.eval_run import default_dataset
    from reslab.runtime.distributed import resolve_device
    from reslab.runtime.precision import resolve_precision

    args.dataset = args.dataset or default_dataset(members)  # what run_eval read
    if args.normalize and not any(m.normalize_used for m in members):
        what = "the checkpoint says" if args.checkpoint else f"{args.weights} says"
        print(f"reslab eval: note: --normalize {args.normalize} is not used: {what} how its "
              "inputs were normalised", file=sys.stderr)  # fmt: skip
    if args.dataset == "folder":
        from reslab.engine.eval_run import eval_folder

        read = eval_folder(root, members[0].classes)
        if str(read) != str(root):
            print(f"reslab eval: {read} (the validation set of {root})", file=sys.stderr)
    precision = resolve_precision(args.precision, resolve_device(args.device))  # "auto" -> used
    seen = [m.name for m in members if m.trained_on.get("val_split") is False
            and m.trained_on.get("dataset") == args.dataset]  # fmt: skip
    if args.split == "val5k" and seen:
        print(f"reslab eval: note: {', '.join(seen)} trained on all 50k training images "
              "(val_split: false), the val5k images among them: this is not a validation error",
              file=sys.stderr)  # fmt: skip
    print(
        f"{args.dataset} {args.split}, {args.views} view(s), {result.ensemble.num_samples} "
        f"images, {precision}"
    )
    print(format_report(result, classes))
    meta = {
        "checkpoints": [str(p) for p in files],
        "models": [m.model_name for m in members],
        "dataset": args.dataset,
        "split": args.split,
        "views": args.views,
        "precision": precision,
        "limit": args.limit,
    }
    assert out is not None  # run_eval had a checkpoint or weights file
    try:
        written = write_outputs(
            result, classes, out_dir=out, json_path=Path(args.json) if args.json else None,
            meta=meta,
        )  # fmt: skip
    except OSError as e:  # the table above is printed; the files could not be written
        return _fail("eval", _os_error(e))
    except UserError as e:  # e.g. DiskFullError from the atomic writes: one line already
        return _fail("eval", e)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="top-1/top-5 error, per-class accuracy, confusion matrix; "
        "several checkpoints are evaluated as an ensemble",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint",
        nargs="+",
        metavar="FILE",
        help="reslab checkpoint(s); several = an ensemble",
    )
    src.add_argument(
        "--weights",
        metavar="FILE",
        help="weights in another format (torchvision, "
        "pytorch_resnet_cifar10 .th, safetensors); with --model",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="NAME",
        help="architecture for --weights (default: detected from the file)",
    )
    p.add_argument("--data", metavar="DIR", help="directory holding the data set "
                   "(default $RESLAB_DATA)")  # fmt: skip
    p.add_argument("--normalize", choices=["imagenet", "cifar10"], default=None,
                   help="with --weights that carry no preprocessing: how its inputs were "
                   "normalised")  # fmt: skip
    p.add_argument("--dataset", choices=["cifar10", "cifar100", "folder"], default=None,
                   help="default: what the checkpoint's run trained on, else cifar10")  # fmt: skip
    p.add_argument(
        "--labels",
        default=None,
        metavar="FILE",
        help="label file of a flat folder (ImageNet val layout), --dataset folder",
    )
    p.add_argument("--workers", type=_workers, default=2, help="DataLoader workers for folders")
    p.add_argument("--max-pixels", type=_positive, help=MAX_PIXELS_HELP)
    p.add_argument("--split", choices=["test", "val5k"], default="test")
    p.add_argument("--views", choices=["center", "flip", "flip-shift", "ten-crop", "multi-scale"],
                   default="center", help="test-time views whose softmax scores are averaged: "
                   "flip = image + mirror; flip-shift = those two and both moved 1 pixel "
                   "down-right and up-left; ten-crop = 4 corners + centre and their mirrors "
                   "(CIFAR: of the 4-pixel-padded image)")  # fmt: skip
    p.add_argument(
        "--scales",
        type=_pixels(MAX_RESIZE),
        nargs="+",
        default=None,
        help="input sides for --views multi-scale (default 32 40 48 for 32px "
        "models, 224 256 384 480 640 for ImageNet ones)",
    )
    p.add_argument(
        "--batch-size", type=_positive, default=None, help="default 500 for CIFAR, 32 for folders"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="fp32",
                   help="auto: as in train and predict (reslab.runtime.precision)")  # fmt: skip
    p.add_argument("--limit", type=_positive, default=None, help="evaluate only the first N images")
    p.add_argument(
        "--json", default=None, metavar="OUT", help="JSON report path (default OUT_DIR/eval.json)"
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where confusion PNGs go (default: CHECKPOINT_DIR/eval)",
    )
    p.set_defaults(func=cmd_eval)


def cmd_plot(args: argparse.Namespace) -> int:
    """Figure-6-style training curves of one or more RUN_DIRs on one PNG."""
    from pathlib import Path

    from reslab.analysis.plots import load_runs, plot_curves
    from reslab.errors import check_output_file

    try:
        run_files = [Path(d) / n for d in args.run_dir for n in
                     ("metrics.jsonl", "config.yaml", "steps.jsonl", "final.json", "last.pt",
                      "best.pt")]  # fmt: skip
        check_output_file(args.out, "--out", run_files, create_parent=True)
        runs = load_runs(args.run_dir)
        # A run not yet evaluated (still starting, or killed before its first evaluation) has
        # nothing to draw: the others are drawn, with a line saying which was left out.
        keys = ("train_error", args.test_key or "test_error", "val_error")
        empty = [d for d, run in zip(args.run_dir, runs)
                 if not any(r.get(k) is not None for r in run.rows for k in keys)]  # fmt: skip
        if len(empty) == len(runs):
            raise ValueError(f"{', '.join(empty)}: no evaluation in metrics.jsonl yet (a run "
                             "still starting, or stopped before its first); plot it once its "
                             "first evaluation is written (train --eval-every)")  # fmt: skip
        for d in empty:
            print(f"reslab plot: left out {d}: no evaluation in its metrics.jsonl yet",
                  file=sys.stderr)  # fmt: skip
        runs = [run for d, run in zip(args.run_dir, runs) if d not in empty]
        out = plot_curves(runs, out=args.out, title=args.title, test_key=args.test_key)
    except (FileNotFoundError, ValueError) as e:
        return _fail("plot", e)
    except OSError as e:
        return _fail("plot", _os_error(e))
    print(f"wrote {out}")
    return 0


def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="training curves (Figure 6 style) of RUN_DIRs to a PNG")
    p.add_argument("run_dir", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default="curves.png", metavar="PNG",
                   help="the PNG to write (default: ./curves.png)")  # fmt: skip
    p.add_argument("--title", default=None)
    p.add_argument(
        "--test-key",
        default=None,
        help="metrics.jsonl field drawn bold (default: test_error, or val_error for runs "
        "without a test set)",
    )
    p.set_defaults(func=cmd_plot)


def cmd_demo(args: argparse.Namespace) -> int:
    from reslab.demo import run_demo
    from reslab.errors import UserError

    try:
        run_demo(data=args.data, out=args.out, minutes=args.minutes, download=args.download)
    except UserError as e:
        return _fail("demo", _one_line(e))
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job: a few minutes of ResNet-20 on CIFAR-10")
    p.add_argument("--data", help="directory holding cifar-10-batches-py (default $RESLAB_DATA)")
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("--minutes", type=_minutes, default=4.0, help="training time to plan for")
    p.add_argument("--download", action="store_true", help="fetch CIFAR-10 if it is missing")
    p.set_defaults(func=cmd_demo)


class _Parser(argparse.ArgumentParser):
    """argparse, with its refusals in one line (the usage block goes to --help)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="reslab",
        description="Deep residual learning (He et al., 2015): models, training, "
        "reproduction of the paper's tables and figures.",
    )
    from reslab import __version__

    parser.add_argument("--version", action="version", version=f"reslab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_models,
        _add_data,
        _add_train,
        _add_eval,
        _add_plot,
        _add_demo,
        _add_export,
        _add_predict,
        _add_reproduce,
    ):
        add(sub)
    return parser


def _out_of_memory(e: BaseException) -> bool:
    """A failed allocation: Python's MemoryError, torch's CPU allocator or CUDA's OOM (a
    RuntimeError subclass)."""
    if isinstance(e, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    return "can't allocate memory" in str(e)


def _oom_detail(e: BaseException) -> str:
    import re

    m = re.search(r"tried to allocate (\d+) bytes", str(e))
    if m:
        n = int(m.group(1))
        return f"{n / 2**30:,.1f} GiB asked for" if n >= 2**30 else f"{n / 2**20:.1f} MiB asked for"
    m = re.search(r"Tried to allocate ([\d.]+ [KMGT]iB)", str(e))  # CUDA's wording
    return f"{m.group(1)} asked for" if m else type(e).__name__


def _interrupt_hint(args: argparse.Namespace) -> str:
    """How to go on after Ctrl-C: resume where a checkpoint exists, else start again."""
    import os
    import shlex

    out = getattr(args, "out", None)
    if args.command == "reproduce":
        return "; the same command again resumes the unfinished runs"
    if args.command not in ("train", "demo") or not out:
        return ""
    saved = os.path.isfile(os.path.join(out, "last.pt"))
    if args.command == "train":
        if saved:
            return (f"; `reslab train --out {shlex.quote(out)} --resume` continues from its "
                    "last checkpoint")  # fmt: skip
        return "; nothing was saved yet: the command without --resume starts it again"
    data = f" --data {shlex.quote(args.data)}" if getattr(args, "data", None) else ""
    again = f"`reslab demo --out {shlex.quote(out)}{data}` again "
    return "; " + again + ("continues from its last checkpoint" if saved else "starts it again")


def _empty_flag(argv: list[str], args: argparse.Namespace) -> str | None:
    """The first `--flag ""` or `--flag=` whose value the command took as an empty string."""
    for i, a in enumerate(argv):
        flag = a[:-1] if a.startswith("--") and a.endswith("=") else None
        if a == "" and i and argv[i - 1].startswith("--") and "=" not in argv[i - 1]:
            flag = argv[i - 1]
        value = getattr(args, (flag or "--")[2:].replace("-", "_"), None)
        if flag and (value == "" or (isinstance(value, list) and "" in value)):
            return flag
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for stream in (sys.stdout, sys.stderr):
        # File names that are not valid text (os.listdir's surrogate escapes) must still print
        # under a strict encoding (PYTHONIOENCODING=utf-8, an ASCII terminal): as \udcXX escapes.
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    args.argv = argv
    empty = _empty_flag(argv, args)
    if empty:
        # `--out ""` had meant the current directory and `--data ""` $RESLAB_DATA, silently
        # (an unset shell variable: `--out $RUN`).
        return _fail(args.command, f"{empty} is given an empty value (an unset shell variable?); "
                     "give it one or drop the flag")  # fmt: skip
    try:
        rc = args.func(args)
        sys.stdout.flush()  # inside the try: a pipe closed early fails here, not at exit
        return rc
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        # Whatever the run had saved (checkpoints are written atomically) is intact.
        return _fail(args.command, f"out of memory ({_oom_detail(e)}); lower --batch-size or "
                     "the image size, or run where more memory is free")  # fmt: skip
    except KeyboardInterrupt:
        # Ctrl-C: what the run had saved is intact (every file is written atomically); a
        # traceback through whichever op was running says nothing useful.
        _fail(args.command, f"interrupted{_interrupt_hint(args)}")
        return 130
    except BrokenPipeError:
        # `reslab models | head`: the reader has gone. Nothing more can be printed; send the
        # rest of stdout (Python flushes it at exit) nowhere, and exit as a SIGPIPE'd tool does.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13


if __name__ == "__main__":
    sys.exit(main())
