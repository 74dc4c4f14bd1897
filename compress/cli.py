"""``lrc``: compress causal LMs with low-rank methods. Every command is a few lines over ``compress.api``."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .console import err, out
from .console import error_line as _error_line
from .console import fail as _fail
from .errors import LrcError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="lrc: post-training low-rank compression of causal language models, layer by layer.\n\n"
                       "MODEL is a hub id, a local Hugging Face directory, a .gguf file, or 'smollm2' (the bundled "
                       "SmolLM2-135M-Instruct). Ratios are fractions of targeted Linear parameters KEPT.")
MODEL_ARG = typer.Argument(..., help="hub id, local HF directory, .gguf file, or 'smollm2'")
RECIPE_OPT = typer.Option(..., "--recipe", "-r", help="recipe YAML (see recipes/)")


def _int_list(value: str, option: str) -> tuple[int, ...]:
    """``"128,512"`` → ``(128, 512)``; anything else (a word, an empty item, zero or less) is a one-line error naming
    ``option``, not a ``ValueError`` traceback."""
    try:
        items = tuple(int(x) for x in value.split(","))
    except ValueError:
        items = ()
    if not items or min(items) < 1:
        raise LrcError(f"{option}: {value!r} is not a comma-separated list of positive integers (e.g. 128,512)")
    return items


@app.command()
def methods() -> None:
    """List the registered decomposition methods and rank allocators (a stage's ``allocator``)."""
    from .allocation import ALLOCATORS
    from .methods import METHODS

    table = Table(title="lrc methods")
    table.add_column("method")
    table.add_column("needs")
    table.add_column("description")
    for name, cls in sorted(METHODS.items()):
        table.add_row(name, ",".join(cls.needs) or "weights only", cls.description)
    out.print(table)
    table = Table(title="rank allocators (stage field allocator)")
    for col in ("allocator", "needs", "description"):
        table.add_column(col)
    for entry in ALLOCATORS.values():
        table.add_row(entry.name, entry.needs, entry.description)
    out.print(table)


def _grouping(q) -> str:
    """A quantize section's (or its embeddings') scale layout in words."""
    return ('groups of ' + str(q.group_size) if q.group_size else 'one scale per row') + \
        (', symmetric' if q.symmetric else '')


@app.command()
def plan(model: str = MODEL_ARG, recipe: Path = RECIPE_OPT,
         json_out: Optional[Path] = typer.Option(None, "--json", help="also write the plan as JSON here"),
         all_rows: bool = typer.Option(False, "--all", help="show every module (default: blocks 0 and last)")) -> None:
    """Dry run: per-module rank and parameters before/after, and totals. Loads only the config."""
    from . import api
    from .plan import totals
    from .recipe import load_recipe

    try:
        rows = api.plan(model, recipe, progress=True)
    except LrcError as e:
        _fail(e)
    last = max((r.block for r in rows), default=0)
    table = Table(title=f"plan: {recipe.name} on {model}")
    for col in ("module", "method", "shape (out x in)", "rank / kept dims / atoms", "params before", "params after",
                "note"):
        table.add_column(col)
    for r in rows:
        if all_rows or r.block in (0, last):
            # a group of modules (a block method's unit) is shaped by its knob; a Linear's knob is its rank, or
            # what its cost model calls it (atoms)
            knob = ("dense" if r.factorize is False else "data") if r.knob is None else \
                str(r.knob) if r.cost_model in ("lowrank", "residual") or not r.linear else r.describe()
            table.add_row(r.name, r.method, f"{r.out_features} x {r.in_features}" if r.linear else r.describe(), knob,
                          f"{r.params_before:,}", f"{r.params_after:,}" if r.params_after is not None else "?",
                          r.note)
    t = totals(rows)
    if rows:
        out.print(table)
        kept = t["kept_fraction_of_targeted"]
        comp = f", {t['compensated_modules']} compensated" if t["compensated_modules"] else ""
        out.print(f"targeted Linears: {t['targeted_modules']} ({t['factorized_modules']} factorized, "
                  f"{t['dense_modules']} kept dense{comp}); params {t['targeted_params_before']:,} → "
                  + (f"{t['targeted_params_after']:,} (kept {kept:.4f} of targeted; embeddings and lm_head excluded)"
                     if kept is not None else "data-dependent"))
    else:
        out.print("no stage: no module is decomposed")
    q = load_recipe(recipe).quantize
    if q is not None:
        widths = (f"each searched module at the width the byte budget chose ({', '.join(map(str, q.bits_options))};"
                  f" 16: not quantized), the others int{q.bits}") if q.bits_options else f"int{q.bits}"
        out.print(f"then quantized ({q.method}, {widths}, {_grouping(q)}): every Linear the blocks hold after the "
                  "stages, factors included; the report's quantization section and checkpoint_bytes give the bytes")
        searched = [r for r in rows if getattr(r, "bits", None) is not None]
        if searched:
            from .allocation.bits import searched_bytes

            used, dense = searched_bytes(searched, q)
            out.print(f"byte budget: the searched modules store {used:,} bytes, {used / dense:.4f} of their "
                      f"{dense:,} at 16 bits")
        if q.embeddings is not None:
            out.print(f"and the embeddings (with the output head) quantized first (rtn, int{q.embeddings.bits}, "
                      f"{_grouping(q.embeddings)})")
    if json_out:
        json_out.write_text(json.dumps({"modules": [r.to_dict() for r in rows], "totals": t}, indent=2))


@app.command()
def compress(
    model: str = MODEL_ARG,
    recipe: Path = RECIPE_OPT,
    out_dir: Path = typer.Option(..., "--out", "-o", help="checkpoint directory to create"),
    resume: bool = typer.Option(False, help="continue an interrupted run from its first unfinished block"),
    overwrite: bool = typer.Option(False, help="replace --out if it exists"),
    calib: Optional[str] = typer.Option(None, help="override calibration.dataset (set name, local file, selfgen)"),
    samples: Optional[int] = typer.Option(None, help="override calibration.samples"),
    seq_len: Optional[int] = typer.Option(None, help="override calibration.seq_len"),
    stage_calib: list[str] = typer.Option([], help="INDEX=DATASET: stage INDEX's own calibration set (e.g. "
                                                   "1=ARC-Easy-Dev.jsonl for task-calibrated EoRA); repeatable"),
    device: Optional[str] = typer.Option(None, help="override engine.device (auto, cpu, cuda)"),
    finetune_data: Optional[str] = typer.Option(None, help="override finetune.data (a recipe with a finetune "
                                                           "section: set name, local file, selfgen)"),
    cache_dir: Optional[Path] = typer.Option(None, help="activation/token cache (default ~/.cache/lrc or $LRC_CACHE)"),
    keep_cache: bool = typer.Option(False, help="keep the activation cache after success"),
) -> None:
    """Calibrate, compress block by block, and write a checkpoint that loads with trust_remote_code=True."""
    from . import api
    from .recipe import load_recipe
    from .report import summary_table

    try:
        r = api.with_overrides(load_recipe(recipe), str(recipe), calibration__dataset=calib,
                               calibration__samples=samples, calibration__seq_len=seq_len, engine__device=device,
                               finetune__data=finetune_data)
        r = api.with_stage_calibration(r, stage_calib, str(recipe)) if stage_calib else r
        _, report = api.compress(model, r, out_dir, resume=resume, overwrite=overwrite, cache_dir=cache_dir,
                                 keep_cache=keep_cache, return_model=False)
    except LrcError as e:
        _fail(e)
    except KeyboardInterrupt:
        err.print("interrupted: nothing was written to --out; rerun with --resume to continue")
        raise typer.Exit(130)
    out.print(summary_table(report))
    if "eval" in report:
        from .eval.run import results_tables

        for table in results_tables(report["eval"], str(out_dir)):
            out.print(table)
    if report.get("samples"):
        from .eval.samples import samples_table

        out.print(samples_table(report["samples"]))
    out.print(f"wrote {out_dir} (lrc_report.json, lrc_modules.csv, lrc_recipe.yaml)")


@app.command()
def compensate(
    dense: str = typer.Argument(..., help="the original model (hub id, directory, .gguf, 'smollm2')"),
    compressed: str = typer.Argument(..., help="the compressed model, loadable by transformers (a quantized "
                                               "checkpoint is de-quantized on load) or an lrc checkpoint"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="directory to create"),
    rank: Optional[int] = typer.Option(None, help="residual rank per module"),
    param_ratio: Optional[float] = typer.Option(None, help="extra parameters per module as a fraction of m·n "
                                                           "(instead of --rank)"),
    allocator: str = typer.Option("uniform", help="with --param-ratio: uniform (the same ratio per module), loss "
                                                  "(one global budget, greedy on the summed whitened error) or "
                                                  "energy (the same fraction of every residual's energy)"),
    calib: list[str] = typer.Option(["wikitext2"], help="calibration set: calib/ name, local file (ARC-style "
                                                        "question files are detected), or selfgen; repeat to mix "
                                                        "sources in equal shares (e.g. general text + task)"),
    samples: int = typer.Option(32, help="calibration windows"),
    seq_len: int = typer.Option(256, help="tokens per window"),
    export: str = typer.Option("lrc", help="lrc: checkpoint with the residual paths inside; peft: LoRA adapter "
                                           "for the compressed base"),
    overwrite: bool = typer.Option(False, help="replace --out if it exists"),
    cache_dir: Optional[Path] = typer.Option(None, help="activation/token cache"),
) -> None:
    """EoRA: add eigenspace low-rank residual paths that repair COMPRESSED towards DENSE (modules matched by name)."""
    from . import api
    from .report import summary_table

    try:
        if (rank is None) == (param_ratio is None):
            raise LrcError("give exactly one of --rank and --param-ratio")
        if export not in ("lrc", "peft"):
            raise LrcError(f"--export: {export!r} is not one of lrc, peft")
        sources = {"dataset": calib[0]} if len(calib) == 1 else {"mix": [{"dataset": c} for c in calib]}
        _, report = api.compensate(dense, compressed, out_dir, rank, param_ratio,
                                   {**sources, "samples": samples, "seq_len": seq_len}, export, overwrite, cache_dir,
                                   allocator=allocator)
    except LrcError as e:
        _fail(e)
    out.print(summary_table(report))
    out.print(f"wrote {out_dir} ({'PEFT LoRA adapter' if export == 'peft' else 'lrc checkpoint'})")


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="hub id, local HF directory, .gguf, 'smollm2', or an lrc checkpoint"),
    ppl: Optional[str] = typer.Option(None, help="comma-separated perplexity sets: calib/ names with an eval split "
                                                 "(wikitext2, ptb, c4) or local .txt/.jsonl/.parquet files "
                                                 "[default: wikitext2 unless only --tasks is given]"),
    tasks: Optional[str] = typer.Option(None, help="comma-separated zero-shot tasks: arc_easy, arc_challenge, piqa, "
                                                   "hellaswag, winogrande, openbookqa, lambada_standard, boolq"),
    limit: Optional[int] = typer.Option(None, help="zero-shot: first N documents of each task"),
    data_dir: Optional[str] = typer.Option(None, help="zero-shot data directory [default: $LRC_DATA_DIR]"),
    seq_len: int = typer.Option(2048, help="perplexity window length (capped by the model's context)"),
    stride: Optional[int] = typer.Option(None, help="slide windows by this many tokens (default: non-overlapping)"),
    max_windows: Optional[int] = typer.Option(None, help="score only the first N windows (quick looks)"),
    bos: bool = typer.Option(False, help="prepend BOS to every window (and score its first token)"),
    reference: Optional[str] = typer.Option(None, help="dense model: also report KL(dense‖model) and top-1 agreement"),
    chat: bool = typer.Option(False, help="answer 20 fixed chat prompts (instruct models): non-empty replies, "
                                          "and with --reference the KL over the dense model's replies; plus short "
                                          "prompts with checkable answers (capitals, arithmetic, ...): the fraction "
                                          "answered correctly, the dense model's beside it"),
    batch_size: int = typer.Option(4, help="windows (perplexity) or requests (zero-shot) per forward"),
    request_cache: bool = typer.Option(True, help="reuse zero-shot answers and chat replies cached for these exact "
                                                     "weights (a dense --reference is generated once)"),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda, cuda:N"),
    device_map: Optional[str] = typer.Option(None, help="let accelerate place a model larger than one device "
                                                        "(auto: GPUs, then CPU, then disk); overrides --device"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the results as JSON here"),
) -> None:
    """Paper-style perplexity (GPTQ / SVD-LLM protocol), KL to a dense model, and lm-eval zero-shot accuracy.

    Zero-shot tasks run through lm-eval's Python API on the loaded model with lrc's task files, which read local
    data (--data-dir). Results of an lrc checkpoint are also merged into its lrc_report.json under "eval".
    """
    from .eval.run import evaluate, results_tables
    from .recipe import EvalConfig, parse_model

    split = (lambda v: [x for x in (v or "").split(",") if x])
    try:
        cfg = parse_model(EvalConfig, "lrc eval", ppl=split(ppl) if ppl is not None else
                          ([] if tasks or chat else ["wikitext2"]), tasks=split(tasks), limit=limit, data_dir=data_dir,
                          seq_len=seq_len, stride=stride, max_windows=max_windows, bos=bos, batch_size=batch_size,
                          chat=chat,
                          request_cache=request_cache)
        results = evaluate(model, cfg, reference, device=device, device_map=device_map)
    except LrcError as e:
        _fail(e)
    for table in results_tables(results, model):
        out.print(table)
    for name, r in results["perplexity"].items():
        out.print(f"{name}: {r['protocol']}", highlight=False)
    if "zero_shot" in results:
        out.print(f"zero-shot task files: {results['zero_shot']['include_path']} (lm_eval --include_path)",
                  highlight=False)
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))


@app.command()
def bench(
    model: str = typer.Argument(..., help="hub id, local HF directory, .gguf, 'smollm2', or an lrc checkpoint"),
    reference: Optional[str] = typer.Option(None, help="dense model measured side by side in the same process"),
    seq_lens: str = typer.Option("128,512", help="prefill sequence lengths (batch 1)"),
    decode_batches: str = typer.Option("1,8", help="decode batch sizes"),
    decode_tokens: int = typer.Option(32, help="new tokens per decode run"),
    repeats: int = typer.Option(7, help="timed rounds per measurement, models interleaved (median and spread; "
                                        "one warm-up each first, not timed)"),
    threads: Optional[int] = typer.Option(None, help="torch intra-op threads, pinned for the run [default: torch's]"),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda, cuda:N"),
    dtype: str = typer.Option("float32", help="float type both models run in: float32, bfloat16 (4-bit matrices "
                                              "take the int4 CPU kernel only in bfloat16), float16"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the results as JSON here"),
) -> None:
    """Real cost on this device: parameters, size on disk, memory, prefill and decode tokens/s, speed-ups."""
    from .eval.bench import bench_table, run_bench

    try:
        for name, value in (("--decode-tokens", decode_tokens), ("--repeats", repeats), ("--threads", threads or 1)):
            if value < 1:
                raise LrcError(f"{name}: must be at least 1; got {value}")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise LrcError(f"--dtype: one of float32, bfloat16, float16; got {dtype!r}")
        results = run_bench(model, reference, _int_list(seq_lens, "--seq-lens"),
                            _int_list(decode_batches, "--decode-batches"), decode_tokens, repeats, device,
                            dtype=dtype, threads=threads)
    except LrcError as e:
        _fail(e)
    out.print(bench_table(results))
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))


@app.command()
def push(
    checkpoint: Path = typer.Argument(..., help="an lrc checkpoint directory"),
    repo_id: str = typer.Argument(..., help="hub repository, e.g. you/SmolLM2-135M-svd-llm-80"),
    private: bool = typer.Option(False, help="create the repository as private"),
    token: Optional[str] = typer.Option(None, help="hub token with write access [default: $HF_TOKEN or the token "
                                                   "stored by `hf auth login`]"),
    dry_run: bool = typer.Option(False, help="print the files and the model card; upload and write nothing"),
    base_model: Optional[str] = typer.Option(None, help="hub id for the card's base_model [default: from the report]"),
    endpoint: Optional[str] = typer.Option(None, envvar="HF_ENDPOINT", help="hub endpoint (a mirror or private hub)"),
) -> None:
    """Publish a checkpoint: write its model card (README.md), create the repo if needed, upload the folder."""
    from .publish import push as run_push

    try:
        res = run_push(checkpoint, repo_id, private, token, dry_run, endpoint, base_model)
    except LrcError as e:
        _fail(e)
    table = Table(title=f"{'would upload' if dry_run else 'uploaded'} to {repo_id}"
                        f"{' (private)' if private else ''}")
    table.add_column("file")
    table.add_column("size", justify="right")
    for name, size in res["files"]:
        table.add_row(name, f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size:,} B")
    out.print(table)
    if dry_run:
        out.print("model card (README.md):", highlight=False)
        out.print(res["card"], markup=False, highlight=False)
    else:
        out.print(f"{res['url']}" + ("" if res["card_written"] else " (kept your own README.md)"), highlight=False)


@app.command()
def info(checkpoint: Path = typer.Argument(..., help="an lrc checkpoint directory")) -> None:
    """What a checkpoint contains: base architecture, module types and ranks, parameter accounting."""
    from .checkpoint import describe_spec, read_config

    try:
        lrc = read_config(checkpoint)["lrc"]  # an older format is read as migrated, a newer one refused
    except LrcError as e:
        _fail(e)
    stored = json.loads((checkpoint / "config.json").read_text())["lrc"].get("format_version", 1)
    fmt = f"lrc format {stored}" + (f", read as {lrc['format_version']}" if stored != lrc["format_version"] else "")
    table = Table(title=f"{checkpoint} ({lrc['base_architecture']}, {fmt})")
    for col in ("module", "type", "shape (out x in)", "rank / head dims / atoms"):
        table.add_column(col)
    for name, spec in lrc["modules"].items():
        table.add_row(name, spec["type"], *describe_spec(spec))  # in the words of its module type
    out.print(table)
    rep = checkpoint / "lrc_report.json"
    if rep.is_file():
        from .report import summary_table

        out.print(summary_table(json.loads(rep.read_text())))


from .finetune.command import finetune  # noqa: E402  (its own file: the command is long)

app.command()(finetune)


def main() -> None:
    from transformers.utils import logging as hf_logging

    # typer >= 0.22 vendors click; older typer uses click itself: take the exceptions from whichever it parses with
    click = typer.BadParameter.__module__.rpartition(".")[0]
    click = sys.modules.get(click + ".exceptions", sys.modules.get(click))
    hf_logging.disable_progress_bar()  # lrc reports its own phases; keep errors on one line
    try:
        code = app(standalone_mode=False)  # usage errors come back here instead of typer's multi-line box
    except getattr(click, "NoArgsIsHelpError", ()) as e:  # a bare `lrc` or `lrc CMD`: the help, as usual
        e.show()
        sys.exit(e.exit_code)
    except click.UsageError as e:  # a bad option value, a missing argument, an unknown command
        where = e.ctx.command_path if e.ctx is not None else "lrc"
        _error_line(LrcError(f"{where}: {e.format_message()} (see {where} --help)"))
        sys.exit(2)
    except typer.Abort:
        err.print("interrupted")
        sys.exit(130)
    except LrcError as e:  # errors raised outside a command body
        _error_line(e)
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
