"""The ``neuroal`` command. Bad input ends with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from importlib.metadata import entry_points
from pathlib import Path

from neuroal.errors import UserError
from neuroal.files import write_json_atomic
from neuroal.progress import show_progress

EXIT_USAGE = 2
_ALLOW_PICKLE = "load pickled .bin weights when a model has no safetensors (unpickling can run code)"
_BOS_PER_WINDOW = ("start every {what} window with BOS: auto (the model family's rule: Gemma yes; "
                   "Llama-likes, SmolLM2, Qwen no, as in the reference), on, or off")
_CORPUS = "a corpus name ({names}), or the path of a text file, a folder of text files or a .jsonl file"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem (no usage dump)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="neuroal", description="NeuroAl and peer sparsity allocators for pruning LLMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_prune(commands.add_parser("prune", help="prune one model and write a checkpoint folder"))
    _add_eval(commands.add_parser("eval", help="perplexity and zero-shot accuracy of a model"))
    _add_materialize(commands.add_parser("materialize", help="rebuild a checkpoint folder from its lineage form "
                                         "and the source model, verified"))
    for command in entry_points(group="neuroal.commands"):  # the pipeline's `campaign`, `report` (flows/cli.py)
        command.load()(commands)
    return parser


def _add_prune(p: argparse.ArgumentParser) -> None:
    from neuroal.config import PruneConfig
    from neuroal.pruning import ALLOCATORS, BASE_METHODS

    defaults = PruneConfig.model_fields
    p.add_argument("--model", required=True, help="hub id, local folder, .gguf file, or alias (smollm2-135m)")
    p.add_argument("--method", required=True, help="base method: " + _plugin_help(BASE_METHODS))
    p.add_argument("--top-up", default=defaults["top_up"].default,
                   help="sparsity allocator (default %(default)s): " + _plugin_help(ALLOCATORS))
    p.add_argument("--sparsity", required=True, type=float, help="fraction of prunable weights to zero, in (0, 1)")
    p.add_argument("--structure", default=defaults["structure"].default, help="unstructured, or N:M such as 2:4")
    _add_allocator_options(p, defaults)
    p.add_argument("--calib", default=defaults["calib"].default,
                   help="calibration corpus: " + _CORPUS.format(names=_corpus_list()))
    p.add_argument("--bos-per-window", choices=_bos_choices(), default=defaults["bos_per_window"].default,
                   help=_BOS_PER_WINDOW.format(what="calibration"))
    for name in ("nsamples", "search_nsamples", "seqlen", "batch_size", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=defaults[name].default)
    p.add_argument("--device", default=defaults["device"].default, help="auto, cpu or cuda[:N]")
    p.add_argument("--dtype", default=defaults["dtype"].default, help="auto, float32, bfloat16 or float16")
    p.add_argument("--save-dtype", default=defaults["save_dtype"].default,
                   help="dtype of the checkpoint's weights: auto (the source's own where that is lossless, "
                        "else the computed one), float32, bfloat16 or float16")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with a hub model")
    p.add_argument("--allow-pickle", action="store_true", help=_ALLOW_PICKLE)
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder to create")
    p.add_argument("--lineage", type=Path, help="also write the checkpoint's compact lineage form to this folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and --lineage) folder")
    p.set_defaults(handler=_prune)


def _add_materialize(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lineage", required=True, type=Path, help="a compact lineage form (neuroal prune --lineage, "
                   "a campaign's runs/campaign/lineage/<cell>)")
    p.add_argument("--out", required=True, type=Path, help="the checkpoint folder to create (must not exist)")
    p.add_argument("--source", help="the source model, if not where the checkpoint records it (alias, hub id, "
                   ".gguf file or folder); its digest must match")
    p.set_defaults(handler=_materialize)


def _plugin_help(registry: dict) -> str:
    return "; ".join(f"{name} ({plugin.help})" for name, plugin in registry.items())


def _add_allocator_options(p: argparse.ArgumentParser, defaults: dict) -> None:
    """``--<allocator>-<option>`` for every option of every allocator, described by its pydantic
    field; the config validates the value, so a bad one is the same one-line error everywhere."""
    from neuroal.pruning import ALLOCATORS

    for name, chosen in ALLOCATORS.items():
        for option, info in chosen.Options.model_fields.items():
            key = f"{name}_{option}"
            choices = typing.get_args(info.annotation) if typing.get_origin(info.annotation) is typing.Literal else ()
            p.add_argument(f"--{key.replace('_', '-')}", default=defaults[key].default,
                           help=f"{name}: {info.description} ({', '.join(choices) + '; ' if choices else ''}"
                                "default %(default)s)")


def _add_eval(p: argparse.ArgumentParser) -> None:
    from neuroal.config import EvalConfig
    from neuroal.evaluation.zeroshot import PAPER_TASKS

    defaults = EvalConfig.model_fields
    p.add_argument("--model", required=True, help="model spec or pruned checkpoint folder")
    p.add_argument("--ppl", default=",".join(defaults["ppl"].default),
                   help="corpora for perplexity, comma-separated, or none; each " + _CORPUS.format(
                       names=_corpus_list()) + f" (default: {','.join(defaults['ppl'].default)})")
    p.add_argument("--tasks", default=",".join(PAPER_TASKS),
                   help="zero-shot tasks, comma-separated, or none (default: the paper's seven)")
    p.add_argument("--limit", type=int, help="at most N perplexity windows and N documents per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seqlen", type=int, help="perplexity window in tokens (default 2048, or the model's context)")
    p.add_argument("--online", action="store_true", help="lm-eval's hub tasks instead of the offline copies")
    p.add_argument("--bos-per-window", choices=_bos_choices(), default=defaults["bos_per_window"].default,
                   help=_BOS_PER_WINDOW.format(what="perplexity"))
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with a hub model")
    p.add_argument("--allow-pickle", action="store_true", help=_ALLOW_PICKLE)
    p.add_argument("--out", type=Path, help="metrics JSON file to write")
    p.set_defaults(handler=_eval)


def _prune(args: argparse.Namespace) -> int:
    from neuroal.config import PruneConfig, validated
    from neuroal.pipeline import check_config, prune_to_checkpoint

    fields = {k: v for k, v in vars(args).items() if k in PruneConfig.model_fields}
    config = validated(PruneConfig, **fields)
    for out in filter(None, (args.out, args.lineage)):
        if out.exists() and not args.overwrite:
            raise UserError(f"output {out} already exists; choose another folder or pass --overwrite")
    plan = check_config(config)  # every input problem, before the work and its progress bars
    manifest = prune_to_checkpoint(plan, args.out, overwrite=args.overwrite)
    summary = manifest.model_dump(include={"method", "top_up", "target_sparsity", "achieved_sparsity", "save_dtype",
                                           "timings"})
    if args.lineage:
        from neuroal.lineage import write_lineage

        summary["lineage"] = {"out": str(args.lineage), "form": write_lineage(args.out, plan.source, args.lineage).form}
    print(json.dumps({"out": str(args.out), **summary}, indent=1))
    return 0


def _materialize(args: argparse.Namespace) -> int:
    from neuroal.lineage import materialize

    manifest = materialize(args.lineage, args.out, args.source)
    print(f"checkpoint: {args.out} ({len(manifest.files)} weight file(s) verified; pruned from {manifest.source.spec})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from neuroal.evaluation.evaluate import EvalSpec, evaluate, metrics_table

    spec = EvalSpec(
        model=args.model, ppl=_names(args.ppl), tasks=_names(args.tasks), limit=args.limit,
        batch_size=args.batch_size, seqlen=args.seqlen, device=args.device, dtype=args.dtype,
        online=args.online, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
        bos_per_window=args.bos_per_window,
    )
    metrics = evaluate(spec)
    if args.out:
        write_json_atomic(args.out, metrics)
    print(metrics_table(metrics))
    return 0


def _corpus_list() -> str:
    from neuroal.data import corpus_names

    return ", ".join(corpus_names())


def _bos_choices() -> tuple[str, ...]:
    from neuroal.data import BOS_PER_WINDOW_CHOICES

    return BOS_PER_WINDOW_CHOICES


def _names(value: str) -> tuple[str, ...]:
    """A comma-separated list; ``none`` or empty is the empty list."""
    if value.strip().lower() in ("", "none"):
        return ()
    return tuple(name.strip() for name in value.split(",") if name.strip())


def _quiet_libraries() -> None:
    """Hide the per-file progress bars and notices of transformers and the per-request logs of
    HTTP clients (Prefect, MLflow); ours stay."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for name in ("httpx", "httpcore", "urllib3", "botocore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``neuroal`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        _quiet_libraries()
    show_progress(not args.quiet)
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"neuroal: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("neuroal: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
