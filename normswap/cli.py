"""Command line: a thin layer that parses options, calls one public function and prints or writes its report.

Exit codes: 0 ok, 1 validation failed, 2 usage error, 3 invalid or unsafe input, 4 unsupported model or feature,
5 cannot write output, 70 internal error (a bug: rerun with --debug and report it).
"""
from __future__ import annotations

import signal
import sys
import warnings
from pathlib import Path

import click

from .errors import (EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_UNSUPPORTED, EXIT_VALIDATION_FAILED,
                     SPEAKING_CLI, NormswapError, UnsupportedError, UsageError)
from .report import ConversionReport, InspectReport, ValidationReport
from .options import (CALIBRATION_BATCH, DEFAULT_REFINE_SECONDS, DEFAULT_REFINE_STEPS, REFINE_SCOPES,
                      CalibrationOptions, RefinementOptions, ValidationOptions)
from .targets import DEFAULT_GROUPS, LAYER_OVER, REPLACEMENT_TARGETS, TARGET_NAMES, resolve_groups
from .terminal import printable
from .validate.agreement import DEFAULT_THRESHOLD
from .validate.compare import DEFAULT_ATOL, DEFAULT_RTOL, NOISE_FLOOR, NOISE_MULTIPLE
from .validate.providers import PROVIDER_CHOICES


class _Group(click.Group):
    """Turns NormswapError into one line on stderr and its exit code; tracebacks only with --debug."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's standalone mode, except that Ctrl-C anywhere -- also while a finished run winds down, outside
        ``invoke`` -- exits 130 (click would say "Aborted!" and exit 1)."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            try:
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
                code = rv if isinstance(rv, int) else 0
            except click.Abort:
                click.echo("normswap: interrupted; nothing was written in place of an existing file", err=True)
                code = EXIT_INTERRUPTED
            except click.ClickException as e:
                e.show()
                code = e.exit_code
            sys.exit(code)
        except KeyboardInterrupt:
            sys.exit(EXIT_INTERRUPTED)

    def invoke(self, ctx: click.Context):
        previous, stdout = signal.signal(signal.SIGTERM, _terminated), sys.stdout
        sys.stdout = _PipeSafe(stdout)
        try:
            with warnings.catch_warnings():  # numpy's RuntimeWarnings (overflow near 3e38...) print source lines;
                warnings.simplefilter("ignore", RuntimeWarning)  # the rewrites check the values they keep
                return super().invoke(ctx)
        except KeyboardInterrupt:  # Ctrl-C: temporary files were removed on the way out
            click.echo("normswap: interrupted; nothing was written in place of an existing file", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except Terminated:
            click.echo("normswap: terminated; nothing was written in place of an existing file", err=True)
            ctx.exit(EXIT_TERMINATED)
        except NormswapError as e:
            if ctx.meta.get("normswap.debug"):
                raise
            click.echo(f"normswap: error: {printable(e)}", err=True)
            ctx.exit(e.exit_code)
        except click.UsageError as e:  # click's own (a bad option value): one line too, same exit code
            if ctx.meta.get("normswap.debug"):
                raise
            where = f"normswap {e.ctx.info_name}" if e.ctx is not None and e.ctx.info_name else "normswap"
            click.echo(f"normswap: error: {e.format_message().rstrip('.')}; see '{where} --help'", err=True)
            ctx.exit(e.exit_code)
        except MemoryError:  # what no size check foresaw (an address-space limit, a huge intermediate value)
            if ctx.meta.get("normswap.debug"):
                raise
            click.echo("normswap: error: ran out of memory; free memory, raise the limit (ulimit -v), or pass "
                       "smaller inputs / fewer samples", err=True)
            ctx.exit(EXIT_UNSUPPORTED)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:  # a bug: say so in one line
            if ctx.meta.get("normswap.debug"):
                raise
            if _out_of_memory(e):  # a native library's allocation failure (onnxruntime's std::bad_alloc)
                click.echo("normswap: error: ran out of memory; free memory, raise the limit (ulimit -v), or pass "
                           "smaller inputs / fewer samples", err=True)
                ctx.exit(EXIT_UNSUPPORTED)
            click.echo(f"normswap: internal error: {type(e).__name__}: {printable(e)}; rerun with --debug and "
                       "report it",
                       err=True)
            ctx.exit(EXIT_INTERNAL)
        finally:
            signal.signal(signal.SIGTERM, previous)
            sys.stdout = stdout


def _out_of_memory(e: Exception) -> bool:
    """Whether an exception from a native library reports a failed allocation."""
    text = str(e)
    return "bad_alloc" in text or "Failed to allocate memory" in text or "out of memory" in text.lower()


class _PipeSafe:
    """stdout that a closed pipe (``normswap convert ... | head``) cannot stop: once the reader is gone, the rest
    of the table is dropped and the job goes on (the model is still written)."""

    def __init__(self, stream) -> None:
        self.stream, self.closed_pipe = stream, False

    def write(self, text: str) -> int:
        if not self.closed_pipe:
            try:
                if isinstance(text, str):  # no terminal escape from a model gets through
                    self.stream.write(printable(text, keep="\n"))
                    return len(text)
                return self.stream.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.closed_pipe:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        import os
        self.closed_pipe = True
        try:  # the interpreter's own flush at exit must not fail either
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        except (OSError, ValueError, AttributeError):
            pass

    def __getattr__(self, name):
        return getattr(self.stream, name)


class Terminated(BaseException):
    """SIGTERM, raised where the program is so that cleanup runs as for Ctrl-C."""


def _terminated(signum, frame) -> None:
    raise Terminated()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="normswap")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Rewrite the BatchNorm layers of trained networks, and validate the result in ONNX Runtime."""
    ctx.meta["normswap.debug"] = debug
    token = SPEAKING_CLI.set(True)  # messages name flags (--input-shape), not API keywords (input_shapes=)
    ctx.call_on_close(lambda: SPEAKING_CLI.reset(token))  # in-process callers (tests, scripts) get it back


_map_threshold_option = click.option(
    "--map-threshold", type=float, default=DEFAULT_THRESHOLD, show_default=True,
    help="Probability-map outputs (N,1,H,W) with values in 0..1: agreement is the IoU of both maps above this.")


def _validation_options(f):
    options = [
        click.option("--provider", type=click.Choice(PROVIDER_CHOICES), default="auto", show_default=True,
                     help="ONNX Runtime provider: auto uses CUDA when it is really usable, else CPU."),
        click.option("--inputs", "inputs", type=click.Path(dir_okay=False), default=None,
                     help="Validation inputs: .npz whose keys are the input names (default: seeded random data)."),
        click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D0,D1,...",
                     help="Shape for an input with symbolic dimensions (repeatable)."),
        click.option("--atol", type=float, default=None,
                     help="Exact checks: judge elementwise, |cand - ref| <= atol + rtol*|ref|, with this absolute "
                          f"tolerance instead of against the float64 noise floor (rtol then {DEFAULT_RTOL:g} unless "
                          "given)."),
        click.option("--rtol", type=float, default=None,
                     help="Exact checks: judge elementwise with this relative tolerance (atol then "
                          f"{DEFAULT_ATOL:g} unless given)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for generated inputs."),
        _map_threshold_option,
        click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
                     help="Write the report to this file: JSON, or a self-contained page with plots when it ends "
                          "in .html ('-': JSON on stdout, which silences the table)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _shapes(values: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    from .validate.inputs import parse_input_shape
    return dict(parse_input_shape(v) for v in values)


def _path(value: str | None) -> Path | None:
    return Path(value) if value is not None else None


def _plan_report(plan, report_path: str | None):
    """Check --report against everything the command reads and writes, before any work; returns the plan."""
    if report_path is not None and report_path != "-":
        plan.add(report_path, "--report")
    return plan


def _is_html(path: str | None) -> bool:
    return path is not None and path.lower().endswith((".html", ".htm"))


def _write_report(report, path: str | None, reads=(), **context) -> None:
    """JSON, or one self-contained HTML page when the name ends in .html / .htm."""
    if path is None:
        return
    if _is_html(path):
        from .html_report import render
        text = render(report, **context)
    else:
        text = report.to_json() + "\n"
    if path == "-":
        click.echo(text, nl=False)
        return
    from .onnx.io import write_atomically
    write_atomically(Path(path), lambda f: f.write(text.encode()), protected=reads)


def _fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def _preserved(r: ConversionReport) -> str:
    """The verdict line's value: true / false, or unknown with what was measured and how to decide it."""
    if r.function_preserved is not None:
        return str(r.function_preserved).lower()
    if r.validation is None or not r.validation.outputs:
        return "unknown (not validated)"
    v = r.validation
    o = v.outputs[0]
    agreement = (f", agreement {v.agreement:.3f} ({v.agreement_measure})" if v.agreement is not None
                 else ", no agreement measure for its shape")
    return (f"unknown (measured cosine {_fmt(o.cosine, '.4f')} on '{o.name}'{agreement}; decide with "
            "--min-agreement or --min-cosine)")


def _verdict(passed: bool | None) -> str:
    return "measured" if passed is None else ("ok" if passed else "FAIL")


def _print_validation(v: ValidationReport) -> None:
    if v.check == "exact" and v.rule == "noise floor":
        rule = f"exact, against the float64 original: {v.float64_reference}"
    elif v.check == "exact":
        rule = f"exact, atol={v.atol:g} rtol={v.rtol:g}"
    else:
        gates = [f"cosine >= {v.min_cosine:g}"] if v.min_cosine is not None else []
        gates += [f"agreement >= {v.min_agreement:g}"] if v.min_agreement is not None else []
        rule = "fidelity" + (f", gate: {' and '.join(gates)}" if gates else ", no gate")
    exported = f"; exported with {v.exported_with}" if v.exported_with else ""
    shape = v.outputs[0].shape if v.outputs else []
    samples = f" ({shape[0]} sample(s))" if shape else ""
    click.echo(printable(f"validation ({rule}) on {', '.join(v.providers)}; inputs: {v.inputs}{samples}{exported}"))
    header = ["  output", f"{'max_abs':>10}", f"{'max_rel':>10}", f"{'mean_abs':>10}", f"{'cosine':>10}",
              f"{'agree':>6}",
              "result"]
    _table([[f"  {o.name}", f"{_fmt(o.max_abs):>10}", f"{_fmt(o.max_rel):>10}", f"{_fmt(o.mean_abs):>10}",
             f"{_fmt(o.cosine, '.6f'):>10}", f"{_fmt(o.agreement, '.3f'):>6}", _verdict(o.passed)]
            for o in v.outputs], header)
    for o in v.outputs:
        if o.agreement is not None:
            extras = "".join(f", {k} {x:.3f}" for k, x in o.agreements.items())
            click.echo(printable(f"  {o.name}: agreement = {o.agreement_measure}{extras}"))
    if v.task_agreement is not None:
        click.echo(printable(f"  task metric '{v.task_metric}': agreement {v.task_agreement:.4f}"))
    for o in v.outputs:
        if o.problem:
            click.echo(printable(f"  {o.name}: {o.problem}"))
        if o.original_error is not None:
            ratio = "" if o.error_ratio is None else f", {o.error_ratio:.2g}x"
            click.echo(f"  {o.name}: error against float64 {_fmt(o.converted_error)} (original's own float32 "
                       f"error {_fmt(o.original_error)}{ratio}; allowed {NOISE_MULTIPLE:g}x + {NOISE_FLOOR:g})")
    if v.tf32 is not None:
        click.echo(f"CUDA: TF32 {'on' if v.tf32 else 'off'}; graph optimizations: {v.reference_optimization}")
    if v.rule_note:
        click.echo(printable(f"note: {v.rule_note}"))
    for caution in v.cautions:
        click.echo(printable(f"warning: validation cannot tell the models apart on {caution}"), err=True)


def _size_change(source: Path, written: list[Path]) -> str | None:
    """Said when the written model is much larger than its input (e.g. weights a Caffe2 export computed with
    ConstantFill at run time are stored once folded)."""
    from .paths import external_files
    before = sum(p.stat().st_size for p in [source, *external_files(source)] if p.exists())
    after = sum(p.stat().st_size for p in written if p.exists())
    if after <= 4 * before or after - before < 10 * (1 << 20):
        return None
    return (f"the written model is {after / max(before, 1):.0f}x the size of the input ({_bytes(before)} -> "
            f"{_bytes(after)}): weights the input computed at run time (ConstantFill, Expand...) are now stored")


def _totals(sites: list[dict]) -> list[str]:
    """'by action: folded 50, affine 3' and one line per reason kind (names in quotes made generic), most first."""
    import re
    from collections import Counter
    if not sites:
        return []
    actions = Counter(s["action_under_fold"] for s in sites)
    reasons = Counter(re.sub(r"'[^']*'", "'…'", s["reason"]) for s in sites if s["action_under_fold"] != "folded")
    lines = ["by action: " + ", ".join(f"{a} {n}" for a, n in actions.most_common())]
    lines += [f"  {n} x {reason}" for reason, n in reasons.most_common()]
    return lines


def _table(rows: list[list[str]], header: list[str], name_columns: tuple[int, ...] = (0,)) -> None:
    """Left-aligned columns; on a terminal, fitted to its width (names shortened in the middle, the reason cut at
    the edge; the JSON report keeps them whole)."""
    from .terminal import fit_table, terminal_width
    rows = [[printable(cell) for cell in row] for row in rows]  # one line per row, whatever a name holds
    for line in fit_table(rows, header, terminal_width(), name_columns):
        click.echo(line)


def _group_counts(r: ConversionReport) -> str:
    """' (G=32 x18, G=16 x2)' for the converted group / layer / instance layers, most frequent first."""
    from .comparison import group_summary
    summary = group_summary(r, prefix="G=")
    return f" ({summary})" if summary else ""


def _print_conversion(r: ConversionReport) -> None:
    if r.exact:
        _table([[layer.name, layer.action, _fmt(layer.channels, "d"),
                 f"{layer.producer_op or '-'} {layer.producer or ''}".strip(), layer.reason] for layer in r.layers],
               ["layer", "action", "C", "producer", "reason"], name_columns=(0, 3))
    else:
        _table([[layer.name, layer.action, _fmt(layer.channels, "d"), _fmt(layer.groups, "d"),
                 "yes" if layer.calibrated else "no", _fmt(layer.drift_cosine, ".4f"), layer.reason]
                for layer in r.layers], ["layer", "action", "C", "G", "calibrated", "cosine", "reason"])
    summary = ", ".join(f"{r.count(a)} {a}" + (_group_counts(r) if a == "converted" else "")
                        for a in ("folded", "converted", "affine", "kept") if r.count(a))
    unit = "nodes" if r.frontend == "onnx" else "modules"
    click.echo(f"{len(r.layers)} BatchNorm site(s): {summary or 'none'}; {unit} {r.nodes_before} -> {r.nodes_after}")
    if r.dataflow is not None:
        click.echo(f"dataflow: {r.dataflow}")
    if r.calibration is not None:
        c = r.calibration
        how = (f"{c.segments} segments, each model run once" if c.segments else
               f"{c.passes} passes (level by level)")
        click.echo(f"calibration: {c.samples} samples, {how}, {c.seconds:.2f} s; {len(c.layers_changed)} layer(s) "
                   "changed" + (f" (output layer {c.head} refitted)" if c.head else ""))
        if c.segments:
            spilled = f", {_bytes(c.spilled_bytes)} on disk" if c.spilled_bytes else ""
            click.echo(f"calibration memory: activations kept in {c.activations} ({_bytes(c.peak_activation_bytes)} "
                       f"in memory at most, budget {_bytes(c.memory_budget)}{spilled}); process peak "
                       f"{_bytes(c.peak_rss_bytes)}")
        if c.batch_layout:
            click.echo(f"calibration batches: {c.batch_layout}")
    if r.stage_seconds:
        click.echo("time: " + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in r.stage_seconds.items()))
    for note in r.notes:
        click.echo(printable(f"note: {note}"))
    if r.function_preserved is False and r.calibration is None:
        click.echo("warning: the converted model does NOT compute what the original did: pass --calibrate "
                   "data.npz (a few hundred unlabeled samples) so the new layers are fitted", err=True)
    if r.validation is not None:
        _print_validation(r.validation)
    if not r.exact:
        click.echo(f"function_preserved: {_preserved(r)}")


def _progress(quiet: bool):
    """A progress callback drawing a bar on stderr when it is a terminal; None when quiet or piped."""
    from .progress import terminal_progress
    return terminal_progress(quiet)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str | None) -> int:
    """``--calibration-memory``: bytes from '2G', '512M', '1.5GiB', '100000' (None: the default budget)."""
    from .activation_store import DEFAULT_MEMORY_BUDGET
    if text is None:
        return DEFAULT_MEMORY_BUDGET
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = raw[-1] if raw and raw[-1] in _UNITS else ""
    try:
        value = float(raw[:-1] if unit else raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise UsageError(f"--calibration-memory '{text}' is not a size such as 2G, 512M or 100000 (bytes)")
    return int(value * _UNITS[unit])


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _default_output(model: Path, target: str) -> Path:
    return model.with_name(f"{model.stem}.{target}.onnx")


def _torch_options(f):
    options = [
        click.option("--torch-model", "torch_model", default=None, metavar="PACKAGE.MODULE:FACTORY",
                     help="Build a torch module by calling this factory (instead of MODEL)."),
        click.option("--weights", type=click.Path(dir_okay=False), default=None,
                     help="With --torch-model: weights as .safetensors, or a state_dict (read weights_only)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _torch_module(spec: str, weights: str | None):
    from .torch.load import load_factory, load_weights
    module = load_factory(spec)
    if weights:
        load_weights(module, weights)
    return module


def _model_source(model: str | None, torch_model: str | None) -> None:
    if (model is None) == (torch_model is None):
        raise UsageError("pass either an ONNX MODEL or --torch-model PACKAGE.MODULE:FACTORY")


@main.command(epilog="""\b
Examples:
  normswap inspect model.onnx
  normswap inspect model.onnx --json > sites.json
  normswap inspect model.onnx --batch-sensitivity data.npz --batch-sizes 1,2,4,8,32 --report sensitivity.html
  normswap inspect --torch-model torchvision.models:resnet18""")
@click.argument("model", type=click.Path(dir_okay=False), required=False)
@_torch_options
@click.option("--json", "as_json", is_flag=True, help="Print the sites as JSON.")
@click.option("--batch-sensitivity", "sensitivity_data", type=click.Path(dir_okay=False), default=None,
              metavar="DATA.npz",
              help="Measure how far each BN (and the model output) moves when a batch of each size supplies its "
                   "statistics -- what training at that batch size does (samples keyed by input name).")
@click.option("--batch-sizes", default="1,2,4,8,32", show_default=True, help="With --batch-sensitivity.")
@click.option("--batches", type=int, default=8, show_default=True,
              help="With --batch-sensitivity: batches drawn per batch size (at least 64 samples per size).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for drawing the batches.")
@click.option("--provider", type=click.Choice(PROVIDER_CHOICES), default="auto", show_default=True,
              help="ONNX Runtime provider for --batch-sensitivity.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Write the report to this file: JSON, or a self-contained page with plots when it ends in .html.")
def inspect(model: str | None, torch_model: str | None, weights: str | None, as_json: bool,
            sensitivity_data: str | None, batch_sizes: str, batches: int, seed: int, provider: str,
            report_path: str | None) -> None:
    """List every normalization site: op, channels, producer, and whether it folds (and why not). With
    --torch-model: every layer that couples the samples of a batch in training. With --batch-sensitivity: rank
    the BatchNorms by how much small training batches disturb them."""
    from .api import inspect as inspect_model
    from .batch_sensitivity import check_batches, parse_batch_sizes
    from .paths import WritePlan, external_files
    _model_source(model, torch_model)
    sizes = parse_batch_sizes(batch_sizes)
    check_batches(batches)
    reads = [_path(model), *(external_files(Path(model)) if model else []), _path(weights), _path(sensitivity_data)]
    reads = _plan_report(WritePlan([r for r in reads if r is not None]), report_path).reads
    target = _torch_module(torch_model, weights) if torch_model else model
    data = None
    if sensitivity_data is not None:
        data = _torch_args(target, {}, sensitivity_data, seed) if torch_model else sensitivity_data
    report: InspectReport = inspect_model(target)  # the table first: the sensitivity probe takes minutes
    quiet = as_json or report_path == "-"
    if not quiet:
        _print_sites(report, bool(torch_model))
    if data is not None:
        from .api import batch_sensitivity
        with _progress(quiet) as progress:
            report.batch_sensitivity = batch_sensitivity(target, data, batch_sizes=sizes, batches=batches, seed=seed,
                                                         provider=provider, progress=progress or False)
        if not quiet:
            _print_sensitivity(report.batch_sensitivity)
    _write_report(report, report_path, reads)
    if as_json and report_path != "-":
        click.echo(report.to_json())
    elif report_path is not None and report_path != "-":
        click.echo(f"wrote {report_path}")


def _print_sites(report: InspectReport, torch_model: bool) -> None:
    if report.problem:
        click.echo(printable(f"warning: {report.problem}"), err=True)
    if torch_model:
        _table([[s["name"], s["type"], _fmt(s["channels"], "d"), "yes" if s["couples_samples"] else "no",
                 "yes" if s["affine"] else "no", "yes" if s["running_stats"] else "no",
                 "yes" if s["frozen"] else "no", s["reason"]] for s in report.sites],
               ["layer", "type", "C", "couples samples", "affine", "running stats", "frozen", "why"])
        coupled = sum(s["couples_samples"] for s in report.sites)
        click.echo(f"{len(report.sites)} normalization layer(s), {coupled} couple the samples of a batch in training")
        return
    click.echo(printable(f"{report.source}: opset {report.opset}, IR version {report.ir_version}"))
    _table([[s["name"], s["op"], _fmt(s["channels"], "d"),
             f"{s['producer_op'] or '-'} {s['producer'] or ''}".strip(), s["action_under_fold"], s["reason"]]
            for s in report.sites], ["layer", "op", "C", "producer", "under --to fold", "reason"],
           name_columns=(0, 3))
    click.echo(f"{len(report.sites)} normalization site(s), {sum(s['foldable'] for s in report.sites)} foldable")
    for line in _totals(report.sites):
        click.echo(printable(line))


def _print_sensitivity(s) -> None:
    """The layers ranked by model-output error at the smallest batch size, and the verdict."""
    click.echo(f"\nbatch-size sensitivity ({s.batches} batches per size from {s.samples} samples): relative error "
               "of the model output when one BN uses the batch's statistics")
    _table([[layer.name, _fmt(layer.channels, "d")] + [_fmt(layer.model_error.get(b), ".3f") for b in s.batch_sizes]
            + [_fmt(layer.unreliable_up_to, "d")] for layer in s.ranked()],
           ["layer", "C"] + [f"@{b}" for b in s.batch_sizes] + ["unreliable up to"])
    for note in s.notes:
        click.echo(printable(f"note: {note}"))
    bad = s.unreliable()
    if not s.batch_sizes:
        click.echo("no batch size could be measured (see the notes above)")
        return
    if not bad:
        click.echo(f"no layer flips the top-1 class of more than {1 - s.unreliable_agreement:.0%} of samples (or, "
                   f"without class scores, moves the output by {s.unreliable_error:.0%}) at batch sizes "
                   f"{', '.join(map(str, s.batch_sizes))}")
        return
    worst = max(layer.unreliable_up_to for layer in bad)
    names = ", ".join(layer.name for layer in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    click.echo(f"unreliable for small-batch training: {len(bad)} of {len(s.layers)} BN layer(s) flip the top-1 "
               f"class of more than {1 - s.unreliable_agreement:.0%} of samples (or, without class scores, move the "
               f"output by {s.unreliable_error:.0%} or more) at batch sizes up to {worst}: {names}; replace them "
               "(normswap compare MODEL --calibrate DATA)")


@main.command(epilog="""\b
Examples:
  normswap compare model.onnx --calibrate unlabeled.npz --inputs heldout.npz
  normswap compare model.onnx --targets fold,group,layer --groups auto --calibrate unlabeled.npz \\
      --inputs heldout.npz --report compare.html
  normswap compare model.onnx --purpose deploy --targets fold,affine,weight""")
@click.argument("model", type=click.Path(dir_okay=False), required=False)
@_torch_options
@click.option("--targets", default=",".join(TARGET_NAMES), show_default=True,
              help="Comma-separated targets to compare.")
@click.option("--groups", type=str, default=None, metavar="G|auto",
              help=f"For the group target: G groups (default {DEFAULT_GROUPS}) or 'auto' (chosen by fit).")
@click.option("--calibrate", "calibration", type=click.Path(dir_okay=False), default=None,
              help="Unlabeled samples (.npz keyed by input name): the replacement targets are calibrated on them.")
@click.option("--purpose", type=click.Choice(["finetune", "deploy"]), default="finetune", show_default=True,
              help="What the recommendation is for: fine-tuning at small batch sizes, or inference.")
@click.option("--no-latency", is_flag=True, help="Do not time the models.")
@click.option("--agreement-floor", type=float, default=None, metavar="A",
              help="ONNX models, with --calibrate: add a row per replacement target for its agreement-floor plan "
                   "(as many BNs as keep agreement A normalize, the rest frozen affine).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--provider", type=click.Choice(PROVIDER_CHOICES), default="auto", show_default=True,
              help="ONNX Runtime provider: auto uses CUDA when it is really usable, else CPU.")
@click.option("--inputs", "inputs", type=click.Path(dir_okay=False), default=None,
              help="Held-out inputs (.npz keyed by input name) on which agreement is measured.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D0,D1,...",
              help="Shape for an input with symbolic dimensions (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for generated inputs.")
@_map_threshold_option
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Write the report to this file: JSON, or a self-contained page with plots when it ends in "
                   ".html ('-': JSON on stdout).")
def compare(model: str | None, torch_model: str | None, weights: str | None, targets: str, groups: str | None,
            calibration: str | None, purpose: str, no_latency: bool, agreement_floor: float | None, quiet: bool,
            provider: str,
            inputs: str | None, input_shapes: tuple[str, ...], seed: int, map_threshold: float,
            report_path: str | None) -> None:
    """Convert MODEL to each target, measure what each keeps and costs, and recommend one."""
    from .comparison import compare as compare_targets
    from .comparison import parse_targets
    from .paths import WritePlan, external_files
    _model_source(model, torch_model)
    names = parse_targets(targets)
    if "group" in names:
        resolve_groups("group", groups, None)
    reads = [_path(model), *(external_files(Path(model)) if model else []), _path(weights), _path(calibration),
             _path(inputs)]
    reads = _plan_report(WritePlan([r for r in reads if r is not None]), report_path).reads
    shapes = _shapes(input_shapes)
    if torch_model:
        module = _torch_module(torch_model, weights)
        target, calib = module, (_torch_args(module, {}, calibration, seed) if calibration else None)
        held = _torch_args(module, {}, inputs, seed) if inputs else None
        example = _torch_args(module, shapes, None, seed)
        extra = {"example_inputs": example}
    else:
        target, calib, held, extra = model, calibration, inputs, {"input_shapes": shapes}
    with _progress(quiet or report_path == "-") as progress:
        report = compare_targets(target, names, groups=groups, calibration=calib, inputs=held, provider=provider,
                                 seed=seed, purpose=purpose, latency=not no_latency, map_threshold=map_threshold,
                                 agreement_floor=agreement_floor, progress=progress, **extra)
    _write_report(report, report_path, reads)
    if report_path == "-":
        return
    _table([[r.target, "yes" if r.exact else "no", _fmt(r.agreement, ".2%"), _fmt(r.cosine, ".5f"),
             r.groups or "-", "yes" if r.batch_independent else "no", f"{r.parameters:,}", str(r.nodes),
             _fmt(r.latency_ms, ".3g"), _fmt(r.calibration_seconds, ".2f"),
             _verdict(r.passed) + ("" if not r.kept else f" ({r.kept} BN kept)")] for r in report.rows],
           ["target", "exact", "agreement", "cosine", "groups", "batch-indep.", "params", "nodes", "ms/batch",
            "calib s", "result"])
    measure = next((r.agreement_measure for r in report.rows if r.agreement_measure), None)
    if measure:
        click.echo(f"agreement: {measure}")
    original = next((r.original_latency_ms for r in report.rows if r.original_latency_ms is not None), None)
    if original is not None:
        click.echo(f"latency: per batch of {report.latency_batch}, {report.latency_source}, fastest of several "
                   f"rounds; the original takes {original:.3g} ms")
    for note in report.notes:
        click.echo(printable(f"note: {note}"))
    if report.recommended:
        click.echo(printable(f"recommended for {purpose}: {report.recommended} -- {report.reason}"))
    else:
        click.echo(printable(f"no recommendation for {purpose}: {report.reason}"))
    if report_path is not None:
        click.echo(f"wrote {report_path}")


@main.command(epilog="""\b
Examples:
  normswap convert model.onnx --to fold
  normswap convert model.onnx --to group --groups 32 --calibrate unlabeled.npz --inputs heldout.npz \\
      --min-agreement 0.99 --report report.json
  normswap convert --torch-model torchvision.models:resnet18 --weights r18.safetensors --to group \\
      --groups auto --calibrate unlabeled.npz""")
@click.argument("model", type=click.Path(dir_okay=False), required=False)
@_torch_options
@click.option("--export-onnx", type=click.Path(dir_okay=False), default=None,
              help="With --torch-model: also export the converted module to this ONNX file.")
@click.option("--refine/--no-refine", "refine", default=True, show_default=True,
              help="With --calibrate and a replacement target: after calibration, train the converted network "
                   "towards the original's outputs within --refine-seconds, keeping the best state on held-out data "
                   "(needs torch; ONNX models run in torch for it).")
@click.option("--refine-seconds", type=float, default=DEFAULT_REFINE_SECONDS, show_default=True,
              help="Time budget of refinement (it stops earlier when held-out agreement stops improving).")
@click.option("--refine-steps", type=int, default=DEFAULT_REFINE_STEPS, show_default=True,
              help="At most this many refinement steps (whichever of the two limits comes first).")
@click.option("--refine-scope", type=click.Choice(REFINE_SCOPES), default="all", show_default=True,
              help="Refinement trains every parameter (all) or the new layers' scale and shift (norms).")
@click.option("--refine-holdout", type=float, default=RefinementOptions.holdout, show_default=True,
              help="Share of the calibration data held aside to keep refinement's best state.")
@click.option("--agreement-floor", type=float, default=None, metavar="A",
              help="ONNX models, with --calibrate and a replacement target: convert as many BNs as keep the task "
                   "agreement at least A (judged out of sample on the calibration data, less one standard "
                   "error), the rest frozen affine (exact); the report lists which normalize.")
@click.option("--distill-steps", type=int, default=None, hidden=True)
@click.option("--distill-scope", type=click.Choice(REFINE_SCOPES), default=None, hidden=True)
@click.option("--distill-holdout", type=float, default=None, hidden=True)
@click.option("--to", "target", type=click.Choice(TARGET_NAMES), required=True, help="What to turn BN into.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Output model (default: <stem>.<target>.onnx beside the input).")
@click.option("--in-place", is_flag=True, help="Allow the output to replace the input model.")
@click.option("--keep-unfoldable", is_flag=True, help="With --to fold, leave BNs that cannot fold as BN.")
@click.option("--allow-nonfinite", is_flag=True,
              help="Rewrite BNs with NaN / infinite parameters or a negative variance (refused by default, exit 3).")
@click.option("--groups", type=str, default=None, metavar="G|auto",
              help=f"--to group: G groups in every layer whose channels allow it (else the largest divisor of C "
                   f"below G; default {DEFAULT_GROUPS}); 'auto' lets --calibrate choose each layer's count by fit.")
@click.option("--group-size", type=int, default=None, help="--to group: channels per group instead of --groups.")
@click.option("--layer-over", type=click.Choice(LAYER_OVER), default="all", show_default=True,
              help="--to layer: normalize over all non-batch dims, or over channels at each position.")
@click.option("--calibrate", "calibration", type=click.Path(dir_okay=False), default=None,
              help="Unlabeled samples (.npz keyed by input name) to fit the new layers to the original.")
@click.option("--calibrate-norms-only", is_flag=True,
              help="Calibrate only the new norm layers (do not refit the output layer).")
@click.option("--calibration-batch-size", type=int, default=CALIBRATION_BATCH, show_default=True,
              help="Samples per calibration run, at most (ONNX: fewer when a batch's inputs would exceed 64 MiB; "
                   "a fixed-batch model is fed its own batch when it must be).")
@click.option("--calibration-memory", type=str, default=None, metavar="SIZE",
              help="Activations calibration keeps in memory between segments (e.g. 2G, 512M); beyond it they go "
                   "to disk. Default: a quarter of RAM.")
@click.option("--opset", type=int, default=None, help="Upgrade the model to this opset first (never silently).")
@click.option("--min-cosine", type=float, default=None,
              help="Non-exact targets: fail (exit 1) when an output's cosine similarity is below this.")
@click.option("--min-agreement", type=float, default=None,
              help="Non-exact targets: fail (exit 1) when the task agreement is below this (top-1, whole-sequence "
                   "argmax, per-pixel argmax or map IoU, by the output's shape).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Compare the converted model with the original in ONNX Runtime.")
@click.option("--keep-invalid", is_flag=True, help="Write the output even when validation fails (exit 1).")
@_validation_options
def convert(model: str | None, torch_model: str | None, weights: str | None, export_onnx: str | None,
            refine: bool, refine_seconds: float, refine_steps: int | None, refine_scope: str, refine_holdout: float,
            agreement_floor: float | None, distill_steps: int | None, distill_scope: str | None,
            distill_holdout: float | None, target: str,
            output: str | None, in_place: bool, keep_unfoldable: bool, allow_nonfinite: bool, groups: str | None,
            group_size: int | None, layer_over: str, calibration: str | None, calibrate_norms_only: bool,
            calibration_batch_size: int, calibration_memory: str | None, opset: int | None,
            min_cosine: float | None, min_agreement: float | None, quiet: bool, validate: bool,
            keep_invalid: bool, provider: str, inputs: str | None, input_shapes: tuple[str, ...], atol: float,
            rtol: float, seed: int, map_threshold: float, report_path: str | None) -> None:
    """Convert the BatchNorm layers of MODEL (.onnx), or of a torch module (--torch-model), and validate the
    result."""
    from .api import convert as convert_model
    from .api import exporter_folded_hint
    from .onnx.io import same_file
    from .paths import WritePlan, external_files
    _model_source(model, torch_model)
    if output == "":
        raise UsageError("-o is empty; name the output file")
    resolve_groups(target, groups, group_size)  # conflicting options fail before any work
    cal = CalibrationOptions(calibration_batch_size, _size(calibration_memory), not calibrate_norms_only).check()
    for old, value in (("--distill-steps", distill_steps), ("--distill-scope", distill_scope),
                       ("--distill-holdout", distill_holdout)):
        if value is not None:
            click.echo(f"note: {old} is deprecated; use {old.replace('distill', 'refine')}", err=True)
    if distill_steps == 0:
        refine = False
    ref = RefinementOptions(refine and calibration is not None, refine_seconds,
                            refine_steps if distill_steps is None else distill_steps or None,
                            distill_scope or refine_scope,
                            refine_holdout if distill_holdout is None else distill_holdout).check()
    val = ValidationOptions(provider, inputs, _shapes(input_shapes), atol, rtol, seed, min_cosine, min_agreement,
                            map_threshold=map_threshold).check()
    if torch_model:
        if agreement_floor is not None:
            raise UnsupportedError("--agreement-floor plans ONNX models; export the module to ONNX (dynamo=True, "
                                   "optimize=False keeps its BNs) and plan that")
        return _convert_torch(torch_model, weights, export_onnx, target, output, keep_unfoldable, groups,
                              group_size, layer_over, calibration, cal, ref, val, quiet, validate, keep_invalid,
                              report_path)
    if export_onnx or weights:
        raise UsageError("--export-onnx and --weights apply to --torch-model")
    source = Path(model)
    out = Path(output) if output is not None else (source if in_place else _default_output(source, target))
    if source.exists() and out.exists() and same_file(source, out) and not in_place:
        raise UsageError(f"output '{out}' is the input model; pass another -o or --in-place to replace it")
    plan = WritePlan([source, *external_files(source), _path(calibration), _path(inputs)])
    replacing = in_place and source.exists() and out.exists() and same_file(source, out)
    out = plan.add(out, "-o" if output is not None else "the output", may_replace_input=replacing)
    plan.reserve(out.parent / f"{out.name}.data", "data file of the output")  # where its external data may go
    _plan_report(plan, report_path)
    quiet = quiet or report_path == "-"
    with _progress(quiet) as progress:
        result = convert_model(model, target, groups=groups, group_size=group_size, layer_over=layer_over,
                               calibration=calibration, keep_unfoldable=keep_unfoldable,
                               allow_nonfinite=allow_nonfinite, validate=validate, opset=opset,
                               calibration_options=cal, refine=ref if target in REPLACEMENT_TARGETS else False,
                               validation=val, agreement_floor=agreement_floor, progress=progress)
    report = result.report
    quiet = report_path == "-"
    if not report.layers:  # nothing to do: no file is written, and that is a success
        if not quiet:
            click.echo(printable(f"nothing to convert: {source} has no BatchNormalization; nothing written"
                                 + exporter_folded_hint(result.model)))
        _write_report(report, report_path, plan.reads)
        return
    if not quiet:
        _print_conversion(report)
    failed = report.passed is False
    if not failed or keep_invalid:
        with _progress(quiet) as progress:
            written = result.save(out, keep_invalid=keep_invalid, progress=progress, protected=plan.reads)
        growth = _size_change(source, written)
        if growth:
            report.notes.append(growth)
        if not quiet:
            click.echo(f"wrote {', '.join(str(p) for p in written)}")
            if growth:
                click.echo(printable(f"note: {growth}"))
    elif not quiet:
        click.echo("validation failed: nothing written (pass --keep-invalid to write it anyway)", err=True)
    _write_report(report, report_path, plan.reads)
    if failed:
        sys.exit(EXIT_VALIDATION_FAILED)


def _torch_args(module, shapes: dict[str, tuple[int, ...]], npz: str | None, seed: int):
    """Forward arguments for a torch module: arrays from an .npz keyed by forward's argument names, or seeded
    random tensors of the --input-shape shapes."""
    import numpy as np
    import torch
    from .torch.data import forward_names
    names = forward_names(module)
    if npz is not None:
        from .validate.inputs import load_npz_arrays
        arrays = load_npz_arrays(npz)
        missing = [n for n in names[:1] if n not in arrays]
        if missing:
            raise UsageError(f"{npz} has no array '{missing[0]}'; its keys must be forward's argument names {names}")
        return tuple(torch.from_numpy(np.ascontiguousarray(arrays[n])) for n in names if n in arrays)
    if not shapes:
        return None
    unknown = set(shapes) - set(names)
    if unknown:
        raise UsageError(f"--input-shape names {sorted(unknown)}, not among forward's arguments {names}")
    rng = np.random.default_rng(seed)
    return tuple(torch.from_numpy(rng.standard_normal(shapes[n]).astype(np.float32)) for n in names if n in shapes)


def _convert_torch(spec, weights, export_onnx, target, output, keep_unfoldable, groups, group_size, layer_over,
                   calibration, cal, ref, val, quiet, validate, keep_invalid, report_path) -> None:
    from dataclasses import replace

    from .api import convert as convert_model
    from .paths import WritePlan
    stem = Path(weights).stem if weights else spec.rpartition(":")[2]
    out = Path(output) if output is not None else Path(weights or ".").parent / f"{stem}.{target}.safetensors"
    plan = WritePlan([_path(weights), _path(calibration), _path(val.inputs)])
    out = plan.add(out, "-o" if output is not None else "the output")
    onnx_out = plan.add(export_onnx, "--export-onnx") if export_onnx is not None else None
    _plan_report(plan, report_path)
    module = _torch_module(spec, weights)
    example = _torch_args(module, dict(val.input_shapes or {}), None, val.seed)
    calib = _torch_args(module, {}, calibration, val.seed) if calibration else None
    held = _torch_args(module, {}, val.inputs, val.seed) if val.inputs else None
    if example is None and calib is None and held is None:
        raise UsageError("a torch module needs example inputs: pass --input-shape NAME:D0,D1,..., --calibrate or "
                         "--inputs")
    quiet = quiet or report_path == "-"
    with _progress(quiet) as progress:
        result = convert_model(module, target, groups=groups, group_size=group_size, layer_over=layer_over,
                               calibration=calib, example_inputs=example if example is not None else held,
                               keep_unfoldable=keep_unfoldable, validate=validate, calibration_options=cal,
                               refine=ref if target in REPLACEMENT_TARGETS else False,
                               validation=replace(val, inputs=held, input_shapes=None), progress=progress)
    report = result.report
    if not report.layers:
        if report_path != "-":
            click.echo(f"nothing to convert: {spec} has no BatchNorm layer; nothing written")
        _write_report(report, report_path, plan.reads)
        return
    if report_path != "-":
        _print_conversion(report)
        if report.deployable is not None:
            click.echo("export check: the converted module against its own ONNX export")
            _print_validation(report.deployable)
    failed = report.passed is False
    if not failed or keep_invalid:
        written = [result.save(out, keep_invalid=keep_invalid)]
        if onnx_out is not None:
            written.append(result.export_onnx(onnx_out, keep_invalid=keep_invalid))
        if report_path != "-":
            click.echo(f"wrote {', '.join(str(p) for p in written)}")
    elif report_path != "-":
        click.echo("validation failed: nothing written (pass --keep-invalid to write it anyway)", err=True)
    _write_report(report, report_path, plan.reads)
    if failed:
        sys.exit(EXIT_VALIDATION_FAILED)
    if report.validation_error:  # the conversion was written; its check could not run
        click.echo(f"normswap: error: {printable(report.validation_error)}; the converted module was written unchecked",
                   err=True)
        sys.exit(EXIT_UNSUPPORTED)


@main.command(epilog="""\b
Examples:
  normswap validate model.onnx model.fold.onnx
  normswap validate model.onnx model.group.onnx --check fidelity --inputs heldout.npz --min-cosine 0.99
  normswap validate model.onnx model.fold.onnx --input-shape x:1,3,224,224 --report -""")
@click.argument("reference", type=click.Path(dir_okay=False))
@click.argument("candidate", type=click.Path(dir_okay=False))
@click.option("--check", type=click.Choice(["exact", "fidelity"]), default="exact", show_default=True,
              help="exact: within --atol/--rtol; fidelity: measure, and gate with --min-cosine/--min-agreement.")
@click.option("--min-cosine", type=float, default=None, help="With --check fidelity: fail below this cosine.")
@click.option("--min-agreement", type=float, default=None,
              help="With --check fidelity: fail below this agreement (top-1, whole-sequence argmax, per-pixel "
                   "argmax or map IoU, by the output's shape).")
@_validation_options
def validate(reference: str, candidate: str, check: str, min_cosine: float | None, min_agreement: float | None,
             provider: str, inputs: str | None, input_shapes: tuple[str, ...], atol: float, rtol: float, seed: int,
             map_threshold: float, report_path: str | None) -> None:
    """Run REFERENCE and CANDIDATE in ONNX Runtime on the same inputs and compare every output."""
    from .api import validate as validate_models
    from .paths import WritePlan, external_files
    models = [Path(reference), Path(candidate)]
    reads = _plan_report(WritePlan(models + [f for m in models for f in external_files(m)] + [_path(inputs)]),
                         report_path).reads
    report = validate_models(reference, candidate, provider=provider, inputs=inputs,
                             input_shapes=_shapes(input_shapes), atol=atol, rtol=rtol, seed=seed, check=check,
                             min_cosine=min_cosine, min_agreement=min_agreement, map_threshold=map_threshold)
    if report_path != "-":
        _print_validation(report)
        click.echo({True: "passed", False: "FAILED", None: "measured (no gate given)"}[report.passed])
    _write_report(report, report_path, reads, reference=reference, candidate=candidate)
    if report.passed is False:
        sys.exit(EXIT_VALIDATION_FAILED)


if __name__ == "__main__":  # pragma: no cover
    main()
