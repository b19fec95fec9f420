"""The ``decollapse`` command line: ``train``, ``ablate``, ``heatmap``, ``lifelong``, ``sweep``, ``eval``,
``diagnose``, ``homonyms``, ``export``, ``card``, ``push``, ``list``.

Bad input gets one line on stderr and exit code 2; nothing is left half-written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise SystemExit(_fail(f"{message} (see `{self.prog} --help`)"))


def _fail(message: str) -> int:
    from .runner import is_main_process

    # Under torchrun / accelerate every process finds the same problem: the main one says it once.
    if is_main_process():
        sys.stderr.write(f"decollapse: error: {message}\n")
    return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="decollapse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train an architecture (on the embedded corpus by default)")
    _add_run_arguments(train, "runs/<arch>-<timestamp>", "override model, training (train.*) or corpus (corpus.*) knobs")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument(
        "--streaming", action="store_true",
        help="read a text --dataset as a stream (datasets' IterableDataset) instead of loading it: for corpora "
        "that do not fit in memory; needs --max-steps",
    )
    train.add_argument(
        "--resume", type=Path, default=None, metavar="DIR",
        help="continue a run stopped by SIGINT/SIGTERM (or saved with --set save_steps=N) from its latest "
        "checkpoint: DIR is the run's --output-dir (or its DIR.checkpoints); the run keeps its own settings",
    )

    ablate = sub.add_parser(
        "ablate", help="a grid of train runs (full factorial, optionally crossed with named cases) and one table"
    )
    _add_run_arguments(ablate, "runs/<arch>-ablation-<timestamp>", "knobs shared by every run")
    ablate.add_argument(
        "--grid", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
        help="knobs to vary; every combination is trained",
    )
    ablate.add_argument(
        "--case", action="append", default=[], metavar="'KEY=V KEY2=V2'",
        help="one run's settings that belong together (repeatable); crossed with --grid when both are given",
    )
    ablate.add_argument(
        "--seeds", default=None, metavar="S1,S2,...",
        help="train every arm once per seed (train.seed: same seed, same initialisation seed and data order in "
        "every arm); the table shows mean ± sample std (default: once, with the recipe's seed)",
    )
    ablate.add_argument(
        "--control", default=None, metavar="'KEY=V ...'",
        help="the arm the others are compared to, named by --case/--grid values that only it has; "
        "perplexity ratios are taken per seed (paired)",
    )
    ablate.add_argument(
        "--per-seed", action="store_true", help="also print every seed's values (ablation.json always has them)"
    )
    ablate.add_argument(
        "--heatmap", action="append", default=[], metavar="METRIC",
        help="draw METRIC (any value of a run's metrics.json or diagnostics.json) over the two --grid axes, mean "
        "over seeds per cell, into DIR/heatmaps/METRIC.png and .csv (repeatable; the name is checked before training)",
    )
    ablate.add_argument(
        "--heatmap-axes", default=None, metavar="ROWS,COLUMNS",
        help="the --grid key on the heat-map's rows (y) and the one on its columns (x) "
        "(default: the first --grid axis on the rows, the second on the columns)",
    )

    heatmap = sub.add_parser(
        "heatmap", help="heat-map of one metric over the two --grid axes of an ablation folder, mean over seeds"
    )
    heatmap.add_argument("ablation_dir", type=Path, help="a folder written by `decollapse ablate`")
    heatmap.add_argument("--metric", default=None, help="a value of the runs' metrics.json or diagnostics.json")
    heatmap.add_argument("--axes", default=None, metavar="ROWS,COLUMNS",
                         help="the --grid key on the rows (y) and the one on the columns (x) (default: the grid's order)")
    heatmap.add_argument("--output", type=Path, default=None,
                         help="the PNG to write; the cell values go to the .csv beside it "
                         "(default: ABLATION_DIR/heatmaps/METRIC.png)")
    heatmap.add_argument("--list-metrics", action="store_true",
                         help="list every metric the runs report, with how many runs report it, and draw nothing")

    lifelong = sub.add_parser(
        "lifelong", help="train on one domain subset of the embedded corpus, then another: what is forgotten"
    )
    lifelong.add_argument("arch", help="a causal architecture (`decollapse list`)")
    lifelong.add_argument("--first", required=True, metavar="DOMAINS", help="phase 1's domains: 0-3, 0,2,5 or 4")
    lifelong.add_argument("--then", required=True, metavar="DOMAINS", help="phase 2's domains, same forms")
    lifelong.add_argument("--seeds", default=None, metavar="S1,S2,...",
                          help="both phases once per seed (train.seed); mean ± sample std over seeds (default: once)")
    lifelong.add_argument("--max-steps", type=int, default=None, help="optimizer steps per phase (default 5000)")
    lifelong.add_argument("--output-dir", type=Path, default=None, help="default: runs/<arch>-lifelong-<timestamp>")
    lifelong.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    lifelong.add_argument("--set", dest="settings", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                          help="model, training (train.*) or corpus (corpus.*) knobs shared by both phases")
    lifelong.add_argument("--no-progress", action="store_true", help="no progress bars")

    sweep_search = sub.add_parser(
        "sweep", help="hyper-parameter search (optuna, through the Trainer), selected on validation; the best "
        "trial trained again and tested once",
        description="Trials of one recipe that differ only by learning rate (1e-5 to 9e-4, log), optim "
        "(adamw_torch or adafactor), warmup_steps (100 to 500; for runs under 1000 steps the range is scaled "
        "by max_steps/1000) and weight_decay (0.01 to 0.1). Every trial uses the run's seed (same "
        "initialisation and batches) and is scored by its validation loss at its last step; optuna's TPE "
        "sampler is seeded with it too. The best trial is trained again as an ordinary run into DIR/best, "
        "which alone evaluates the test split. Needs optuna: pip install 'decollapse[sweep]'.",
    )
    _add_run_arguments(
        sweep_search, "runs/<arch>-sweep-<timestamp>", "knobs shared by every trial (not the searched ones)"
    )
    sweep_search.add_argument("--trials", type=int, required=True, help="number of trials")
    sweep_search.add_argument(
        "--seed", type=int, default=None,
        help="train.seed of every trial and the sampler's seed (default: the recipe's, 0)",
    )
    sweep_search.add_argument("--no-progress", action="store_true", help="no progress bars")

    _add_eval_arguments(sub.add_parser(
        "eval", help="GLUE / SICK / PAWS / STS-B, fine-tuned or zero-shot; results into the model folder"
    ))

    diagnose = sub.add_parser("diagnose", help="collapse report of a checkpoint folder")
    diagnose.add_argument("checkpoint", type=Path)
    diagnose.add_argument("--plots-dir", type=Path, default=None, help="default: CHECKPOINT/plots")
    diagnose.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")

    homonyms = sub.add_parser(
        "homonyms", help="sense separation of five English homonyms in a causal LM's contextual states, with baselines"
    )
    homonyms.add_argument("model_dir", type=Path, help="a causal LM folder (AutoModelForCausalLM + a fast tokenizer)")
    homonyms.add_argument("--contexts", type=Path, default=None,
                          help="a contexts JSON file (default: decollapse's own, 5 words x 2 senses x 4 sentences)")
    homonyms.add_argument("--output", type=Path, default=None, help="write the full result (with continuations) as JSON")
    homonyms.add_argument("--max-new-tokens", type=int, default=8,
                          help="greedy continuation length after each homonym (0: none; default 8)")

    sweep = sub.add_parser(
        "recursive-sweep", help="held-out loss and concept rank of a recursive encoder at each K (test-time compute)"
    )
    sweep.add_argument("checkpoint", type=Path)
    sweep.add_argument("--k", default="2,4,6,8,12", help="iteration counts, comma-separated (default 2,4,6,8,12)")
    sweep.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")

    export = sub.add_parser(
        "export", help="a checkpoint folder -> a Hub-ready folder that loads with trust_remote_code, without decollapse"
    )
    export.add_argument("checkpoint", type=Path, help="a folder written by `decollapse train` (or save_pretrained + a tokenizer)")
    export.add_argument("out", type=Path, help="the folder to write (must not exist or be empty)")
    export.add_argument("--repo-id", default=None, help="USER/NAME the card's snippets and model-index name")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")

    card = sub.add_parser("card", help="(re)build a folder's README.md model card from the records in it")
    card.add_argument("folder", type=Path)
    card.add_argument("--repo-id", default=None, help="USER/NAME the card's snippets and model-index name")

    push = sub.add_parser("push", help="upload an exported folder to the Hugging Face Hub")
    push.add_argument("folder", type=Path, help="a folder written by `decollapse export`")
    push.add_argument("--repo-id", required=True, help="USER/NAME on the Hub")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", default=None, help="branch to push to (created if missing; default main)")
    push.add_argument("--dry-run", action="store_true", help="check and list the files; no network")

    sub.add_parser("list", help="architectures, variants and knobs with their defaults")
    return parser


def _add_run_arguments(parser: argparse.ArgumentParser, default_dir: str, set_help: str) -> None:
    """The arguments of a training run, shared by ``train`` and ``ablate`` (which trains one per cell)."""
    parser.add_argument("arch", help="architecture name (`decollapse list`)")
    parser.add_argument(
        "--dataset",
        default="synthetic",
        help="'synthetic' (default, embedded corpus), a local text file or folder, or a Hub id[:config]",
    )
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps per run (default 5000)")
    parser.add_argument("--output-dir", type=Path, default=None, help=f"default: {default_dir}")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    parser.add_argument(
        "--set", dest="settings", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=set_help
    )


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from .eval_suites.finetune import FinetuneSettings

    d = FinetuneSettings()
    parser.add_argument("model", help="a model folder (decollapse checkpoint or any HF model) or a Hub id")
    parser.add_argument("--suite", default="stsb", help="tasks, comma-separated, or glue | concept | all (default stsb)")
    parser.add_argument("--protocol", default="finetune", choices=["finetune", "zeroshot"])
    parser.add_argument("--pairs", default=d.pairs, choices=["joint", "siamese"],
                        help="pair tasks as one sequence (joint) or each sentence encoded alone (siamese)")
    parser.add_argument("--siamese-head", default=d.siamese_head, choices=["concat", "cosine"],
                        help="siamese head: Linear on [u;v;|u-v|;u*v], or cos(u,v) for regression tasks")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="the original release files (GLUE tsv folders, SICK/SICK.txt, PAWS/*.tsv); default: the Hub")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: the model folder")
    parser.add_argument("--peft", default=None, choices=["lora"], help="fine-tune LoRA adapters instead of all weights")
    parser.add_argument("--lora-r", type=int, default=d.lora_r)
    parser.add_argument("--lora-targets", default=None, help="comma-separated Linear names (default: per architecture)")
    parser.add_argument("--epochs", type=float, default=d.epochs)
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps per fine-tune (smoke runs)")
    parser.add_argument("--learning-rate", type=float, default=d.learning_rate)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--max-length", type=int, default=d.max_length, help="tokens per sequence")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None,
                        help="score only the first N rows of the reported split (smoke runs; the table says so)")
    parser.add_argument("--selection-fraction", type=float, default=d.selection_fraction,
                        help="share of the training split held out for model selection")
    parser.add_argument("--early-stopping-patience", type=int, default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--seeds", type=int, default=1, help="fine-tune with seeds seed..seed+N-1; report mean ± std")
    parser.add_argument("--revision", default=None, help="Hub revision of the model")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--skip-bad-rows", action="store_true", help="skip malformed data rows instead of failing")
    parser.add_argument("--allow-partial-data", action="store_true",
                        help="evaluate splits whose size differs from the official one (flagged in the results)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handlers = {
        "train": _cmd_train,
        "ablate": _cmd_ablate,
        "heatmap": _cmd_heatmap,
        "lifelong": _cmd_lifelong,
        "sweep": _cmd_sweep,
        "eval": _cmd_eval,
        "diagnose": _cmd_diagnose,
        "homonyms": _cmd_homonyms,
        "recursive-sweep": _cmd_recursive_sweep,
        "export": _cmd_export,
        "card": _cmd_card,
        "push": _cmd_push,
        "list": _cmd_list,
    }
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was written")
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Leave a torchrun / accelerate process group before exit: a group left to the interpreter's teardown
    can abort the process ("terminate called without an active exception") after the work succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _cmd_train(args) -> int:
    from .runner import RunInterrupted, TrainJob, UsageError, is_main_process, resumable_job, run
    from .settings import SettingError, parse_assignments
    from .trainers import NonFiniteLossError

    try:
        settings = parse_assignments(args.settings)
    except SettingError as err:
        return _fail(str(err))
    if args.resume is not None:
        given = [flag for flag, value in (("--set", args.settings), ("--max-steps", args.max_steps),
                                          ("--output-dir", args.output_dir), ("--overwrite", args.overwrite))
                 if value]
        if args.dataset != "synthetic":
            given.append("--dataset")
        if args.streaming:
            given.append("--streaming")
        if given:
            return _fail(f"--resume continues a run with the settings it was started with; drop {', '.join(given)}")
        try:
            resumed = resumable_job(args.resume)
        except UsageError as err:
            return _fail(str(err))
        if resumed.arch != args.arch:
            return _fail(f"--resume {args.resume}: that run trains {resumed.arch}, not {args.arch}")
    if args.no_progress:  # the bars of datasets and model loading; the runner leaves out the Trainer's
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    if args.resume is not None:
        job = resumed
        job.show_progress = not args.no_progress
    else:
        job = TrainJob(
            arch=args.arch,
            dataset=args.dataset,
            output_dir=args.output_dir,
            overwrite=args.overwrite,
            settings=settings,
            max_steps=args.max_steps,
            show_progress=not args.no_progress,
            streaming=args.streaming,
        )
    try:
        summary = run(job)
    except RunInterrupted as stop:
        if is_main_process():
            sys.stderr.write(f"decollapse: {stop}\n")
        return 128 + {"SIGINT": 2, "SIGTERM": 15}.get(stop.signal_name, 1)
    except UsageError as err:
        return _fail(str(err))
    except NonFiniteLossError as err:
        kept = getattr(err, "last_good_note", "nothing kept")
        return _fail(f"{err}; training stopped, {kept}")
    if not is_main_process():
        return 0
    metrics = summary["metrics"]
    print(f"wrote {job.output_dir}")
    for split in ("validation", "test"):
        if summary["objective"] != "causal_lm":
            # Masked / denoising objectives: the held-out loss over the positions the objective scores.
            if f"{split}_loss" in metrics:
                line = f"{split} {summary['objective']} loss {metrics[f'{split}_loss']:.4f}"
                if f"{split}_optimal_loss" in metrics:
                    line += (
                        f"  (Bayes-optimal {metrics[f'{split}_optimal_loss']:.4f}, ratio "
                        f"{metrics[f'{split}_loss_ratio']:.3f}; unigram {metrics[f'{split}_unigram_loss']:.4f})"
                    )
                print(line)
            continue
        if f"{split}_perplexity" not in metrics:
            continue
        line = f"{split} perplexity {metrics[f'{split}_perplexity']:.3f}"
        if f"{split}_optimal_perplexity" in metrics:
            line += (
                f"  (Bayes-optimal {metrics[f'{split}_optimal_perplexity']:.3f}, "
                f"ratio {metrics[f'{split}_perplexity_ratio']:.3f})"
            )
        print(line)
    for alarm in summary["alarms"]:
        print(f"collapse alarm at step {alarm['step']}: {alarm['message']}")
    return 0


def _cmd_ablate(args) -> int:
    from .ablation import AblationJob, parse_cases, parse_control, parse_grid, parse_seeds, run_ablation, to_markdown
    from .heatmap import default_png, parse_axes
    from .runner import UsageError, default_output_dir
    from .settings import SettingError, parse_assignments
    from .trainers import NonFiniteLossError

    try:
        settings = parse_assignments(args.settings)
        grid = parse_grid(args.grid) if args.grid else {}
        cases = parse_cases(args.case)
        seeds = parse_seeds(args.seeds) if args.seeds is not None else None
        control = parse_control(args.control) if args.control is not None else None
        heatmap_axes = parse_axes(args.heatmap_axes, "--heatmap-axes") if args.heatmap_axes is not None else None
    except (SettingError, UsageError) as err:
        return _fail(str(err))
    output_dir = args.output_dir or default_output_dir(f"{args.arch}-ablation")
    job = AblationJob(
        arch=args.arch, grid=grid, cases=cases, output_dir=output_dir, settings=settings, max_steps=args.max_steps,
        dataset=args.dataset, overwrite=args.overwrite, seeds=seeds, control=control,
        heatmaps=list(dict.fromkeys(args.heatmap)), heatmap_axes=heatmap_axes,
    )

    def progress(row, done, total):
        ppl = row["metrics"]["validation_perplexity"]
        shown = f"{ppl:.3f}" if ppl is not None else "n/a"
        print(f"[{done}/{total}] {row['run']}: validation perplexity {shown}", flush=True)

    try:
        run_ablation(job, on_run_done=progress)
    except UsageError as err:
        return _fail(str(err))
    except NonFiniteLossError as err:
        return _fail(f"{err}; the ablation stopped and wrote nothing")
    print(f"wrote {output_dir}")
    print(to_markdown(json.loads((output_dir / "ablation.json").read_text()), per_seed=args.per_seed))
    for metric in job.heatmaps:
        if default_png(output_dir, metric).is_file():
            print(f"heat-map of {metric}: {default_png(output_dir, metric)} (cell values: .csv beside it)")
    return 0


def _cmd_heatmap(args) -> int:
    from .heatmap import (ablation_run_metrics, check_output, default_png, draw, heatmap_axes, metric_counts,
                          parse_axes, read_ablation, to_markdown, unknown_metric)
    from .runner import UsageError

    try:
        axes = parse_axes(args.axes, "--axes") if args.axes is not None else None
        if args.metric is None and not args.list_metrics:
            raise UsageError("name the metric to draw with --metric (--list-metrics lists what the runs report)")
        if args.output is not None:
            check_output(args.output)
        payload = read_ablation(args.ablation_dir)
        if not args.list_metrics:
            axes = heatmap_axes(payload["grid"], payload.get("cases") or [], axes, str(args.ablation_dir))
        run_values = ablation_run_metrics(args.ablation_dir, payload)
        counts = metric_counts(run_values)
        if args.list_metrics:
            for name, count in counts.items():
                print(f"{name}  ({count}/{len(run_values)} runs)")
            return 0
        if args.metric not in counts:
            raise unknown_metric(args.metric, counts, f"--metric {args.metric}")
        heatmap, png, csv_path = draw(
            payload, run_values, args.metric, axes, args.output or default_png(args.ablation_dir, args.metric)
        )
    except UsageError as err:
        return _fail(str(err))
    print(to_markdown(heatmap))
    print(f"wrote {png} and {csv_path}")
    return 0


def _cmd_lifelong(args) -> int:
    from .ablation import parse_seeds
    from .lifelong import LifelongJob, run_lifelong, to_markdown
    from .runner import UsageError, default_output_dir
    from .settings import SettingError, parse_assignments
    from .trainers import NonFiniteLossError

    try:
        settings = parse_assignments(args.settings)
        seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    except (SettingError, UsageError) as err:
        return _fail(str(err))
    if args.no_progress:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    output_dir = args.output_dir or default_output_dir(f"{args.arch}-lifelong")
    job = LifelongJob(
        arch=args.arch, first=args.first, then=args.then, output_dir=output_dir, settings=settings, seeds=seeds,
        max_steps=args.max_steps, overwrite=args.overwrite, show_progress=not args.no_progress,
    )

    def progress(seed, phase, metrics):
        domains = args.first if phase == "phase1" else args.then
        ppl = metrics["test_perplexity"]
        print(f"[seed {seed}] {phase} (domains {domains}): test perplexity {ppl:.3f}", flush=True)

    try:
        payload = run_lifelong(job, on_phase_done=progress)
    except UsageError as err:
        return _fail(str(err))
    except NonFiniteLossError as err:
        return _fail(f"{err}; the lifelong run stopped and wrote nothing")
    print(f"wrote {output_dir}")
    print(to_markdown(payload))
    return 0


def _cmd_sweep(args) -> int:
    from .hpsearch import AllTrialsFailed, SweepJob, run_sweep, to_markdown
    from .runner import UsageError
    from .settings import SettingError, parse_assignments
    from .trainers import NonFiniteLossError

    try:
        settings = parse_assignments(args.settings)
    except SettingError as err:
        return _fail(str(err))
    if args.no_progress:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    job = SweepJob(
        arch=args.arch, trials=args.trials, dataset=args.dataset, output_dir=args.output_dir,
        overwrite=args.overwrite, settings=settings, max_steps=args.max_steps, seed=args.seed,
        show_progress=not args.no_progress,
    )
    done = []

    def progress(number, hyperparameters, loss, error):
        done.append(number)
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hyperparameters.items())
        result = f"validation loss {loss:.4f}" if error is None else f"diverged ({error})"
        print(f"[{len(done)}/{args.trials}] trial {number}: {result}; {shown}", flush=True)

    try:
        payload = run_sweep(job, on_trial_done=progress)
    except UsageError as err:
        return _fail(str(err))
    except AllTrialsFailed as err:
        return _fail(f"{err}; nothing written")
    except NonFiniteLossError as err:
        return _fail(f"{err} in the rerun of the best trial; nothing written")
    print(f"wrote {job.output_dir}")
    print(to_markdown(payload))
    return 0


def _cmd_eval(args) -> int:
    from .eval_suites import EvalJob, TaskError, run
    from .eval_suites.finetune import FinetuneSettings
    from .eval_suites.harness import format_value

    if args.no_progress:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()

    settings = FinetuneSettings(
        pairs=args.pairs, siamese_head=args.siamese_head, peft=args.peft, lora_r=args.lora_r,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) if args.lora_targets else None,
        epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.learning_rate, batch_size=args.batch_size,
        max_length=args.max_length, max_train_samples=args.max_train_samples,
        selection_fraction=args.selection_fraction, early_stopping_patience=args.early_stopping_patience,
    )
    job = EvalJob(
        model=args.model, suite=args.suite, protocol=args.protocol, data_dir=args.data_dir,
        output_dir=args.output_dir, revision=args.revision, trust_remote_code=args.trust_remote_code,
        seed=args.seed, seeds=args.seeds, finetune=settings, max_eval_samples=args.max_eval_samples,
        skip_bad_rows=args.skip_bad_rows, allow_partial_data=args.allow_partial_data,
        show_progress=not args.no_progress,
    )
    try:
        summary = run(job)
    except TaskError as err:
        return _fail(str(err))
    for row in summary["rows"]:
        print(f"{row['task']} {row['split']} {row['metric']} {format_value(row)}  ({row['protocol']}, {row['pairing']})")
    print(f"wrote {summary['output_dir']}")
    return 0


def _cmd_diagnose(args) -> int:
    from .diagnose import DiagnoseError, diagnose

    try:
        report, plots = diagnose(args.checkpoint, args.plots_dir)
    except DiagnoseError as err:
        return _fail(str(err))
    if args.json:
        print(json.dumps(report.to_dict()["metrics"], indent=2))
    else:
        from .diagnose import health_table

        print(report.to_markdown())
        health = health_table(report)
        if health:
            print("\nhealth (thresholds of MrCogito's concept analysis, github.com/ksopyla/MrCogito):")
            print(health)
        if plots:
            print(f"\nplots: {plots[0].parent}")
    return 0


def _cmd_homonyms(args) -> int:
    from .homonyms import load_contexts, score_homonym_contexts

    if args.max_new_tokens < 0:
        return _fail(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not args.model_dir.is_dir():
        return _fail(f"{args.model_dir}: no such folder")
    if args.output is not None and (args.output.is_dir() or not args.output.parent.is_dir()):
        # Checked before the model runs, so a typo costs nothing.
        return _fail(f"{args.output}: not a file in an existing folder")
    try:
        load_contexts(args.contexts)  # a bad file is refused before the model loads
    except ValueError as err:
        return _fail(str(err))
    try:
        model, tokenizer = _load_causal_lm(args.model_dir)
    except ValueError as err:
        return _fail(str(err))
    try:
        result = score_homonym_contexts(model, tokenizer, args.contexts, max_new_tokens=args.max_new_tokens)
    except ValueError as err:
        return _fail(f"{args.model_dir}: {err}")
    m = result["metrics"]
    print(f"homonyms: {int(m['homonyms'])} words, {result['sentences']} sentences ({result['contexts']})")
    print("| metric | value |\n|---|---|")
    for key in ("separation", "same_sense_baseline", "margin", "random_pair_baseline"):
        print(f"| {key} | {m[key]:.4f} |")
    print("\n| word | separation |\n|---|---|")
    for word, value in result["per_word"].items():
        print(f"| {word} | {value:.4f} |")
    if result["continuations_skipped"]:
        print(f"\ncontinuations skipped: {result['continuations_skipped']}")
    if args.output is not None:
        tmp = args.output.with_name(f".{args.output.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            os.replace(tmp, args.output)
        finally:
            tmp.unlink(missing_ok=True)
        print(f"wrote {args.output}")
    return 0


def _load_causal_lm(folder: Path):
    """A folder's tokenizer and causal LM, or ValueError (one line) when it holds none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json, not a model folder")
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    # One line below instead of transformers' load-report table and a bar for a small folder.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{folder}: no loadable causal LM and tokenizer ({first})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if info.get("missing_keys"):
        # A head initialised at load time (a BERT folder read as BertLMHeadModel, say) would be scored
        # as if it were trained.
        raise ValueError(
            f"{folder}: weights missing for {type(model).__name__} (e.g. {sorted(info['missing_keys'])[0]}), "
            "not a trained causal LM"
        )
    return model.eval(), tokenizer


def _cmd_recursive_sweep(args) -> int:
    from .diagnose import DiagnoseError
    from .sweep import parse_ks, recursive_sweep, to_markdown

    try:
        rows = recursive_sweep(args.checkpoint, parse_ks(args.k))
    except DiagnoseError as err:
        return _fail(str(err))
    print(json.dumps(rows, indent=2) if args.json else to_markdown(rows))
    return 0


def _cmd_export(args) -> int:
    from .hub_cards import CardError, ExportError, export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out, repo_id=args.repo_id, overwrite=args.overwrite)
    except (ExportError, CardError) as err:
        return _fail(str(err))
    print(f"wrote {out}")
    return 0


def _cmd_card(args) -> int:
    from .hub_cards import CardError, write_card

    if not (args.folder / "config.json").is_file():
        return _fail(f"{args.folder}: no config.json, not a model folder")
    try:
        path = write_card(args.folder, repo_id=args.repo_id)
    except CardError as err:
        return _fail(str(err))
    print(f"wrote {path}")
    return 0


def _cmd_push(args) -> int:
    from .hub_cards import PushError, push

    try:
        plan = push(args.folder, args.repo_id, private=args.private, revision=args.revision, dry_run=args.dry_run)
    except PushError as err:
        return _fail(str(err))
    target = f"{plan.repo_id}@{plan.revision or 'main'}{' (private)' if plan.private else ''}"
    for name, size in plan.files:
        print(f"{size:>12,}  {name}")
    print(f"{len(plan.files)} files, {plan.total_bytes:,} bytes; card valid")
    if args.dry_run:
        print(f"dry run: nothing uploaded to {target}")
    else:
        print(f"uploaded to {target}: {plan.url}")
    return 0


def _cmd_list(args) -> int:
    from .data import SyntheticCorpusConfig
    from .registry import ARCHITECTURES
    from .runner import TrainRecipe

    for arch in ARCHITECTURES.values():
        print(f"{arch.name}: {arch.summary}")
        print(f"  objectives: {', '.join(arch.objectives)}  (--set objective=...)")
        print(f"  classes: {', '.join(arch.models.values())}")
        for key, value in arch.config_class.knobs().items():
            print(f"    {key} = {value!r}")
    print("training knobs (--set key=value or train.key=value):")
    for f in dataclasses.fields(TrainRecipe):
        print(f"    {f.name} = {f.default if f.default is not dataclasses.MISSING else None!r}")
    print("embedded corpus knobs (--set corpus.key=value):")
    for f in dataclasses.fields(SyntheticCorpusConfig):
        print(f"    corpus.{f.name} = {f.default!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
