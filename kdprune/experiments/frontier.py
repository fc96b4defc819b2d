"""The compression frontier: the most compressed student within an accuracy budget, per recovery method.

  python -m kdprune.frontier --budget 1.0 [--methods kd,finetune,scratch] [--seeds 0,1,2] [--set key=value ...]
                             [-j N] [--lo 2] [--hi 200] [--tolerance 1.25] [--max-probes 8]
                             [--axis compression|macs|bytes|latency]
  python -m kdprune.frontier --budget 0.5,1,2 --analyse     # no training: the frontier from the runs so far

For each method, the frontier is the largest compression whose mean test accuracy over the seeds stays
within ``--budget`` points of the teacher (the mean of the seeds' teachers).

The axis (``--axis``): what "most compressed" is measured in, each run's metric:
  compression  compression_ratio: teacher params / non-zero student params (the default)
  macs         mac_reduction: teacher MACs / student MACs; for prune.method l1_filter / channel (magnitude
               removes no MACs: refused)
  bytes        bytes_onnx_gzip_teacher / bytes_onnx_int8_gzip_<method>: the fp32 teacher's gzipped ONNX file over
               the student's gzipped INT8 ONNX file, per method (runs with quantize.method ptq or qat)
  latency      ort_speedup_b1_<method>_int8: the measured ONNX Runtime INT8 speed-up at batch 1 over the fp32
               teacher, per method; a noisy timing, reported with the runs that flagged the CPU as busy
The per-method axes give each method its own value at a probe (the mean over seeds), and each method's frontier
is interpolated along its own values. The search still bisects prune.ratio, so the axis must grow strictly with
the ratio over the probes (for compression: checked for l1_filter / channel, whose ratio is the channel ratio);
where it does not, the frontier stops with an error naming the two probes and their values: it does not
reorder or drop probes. ``--lo`` and ``--hi`` are in the searched ratio for every axis:
``1 / (1 - prune.ratio)``, the compression of the prunable weights under magnitude pruning (the axis's values
are only known once measured); ``--tolerance`` is on the axis itself: a bracket's failing probe over its passing
one, in the method's own measured values. Outputs along another axis than compression are named frontier_<axis>.*
(metrics/frontier_macs.md, plots/frontier_bytes.png, ...); compression keeps metrics/frontier.* as before.

The search. A *probe* is one ``prune.ratio``, run once per seed: one queued DVC experiment and one MLflow
run per seed, with every method as a variant of that experiment (``distill.variants``), so the methods share
the probe's teacher, mask and batch order. The axis is ``u = -ln(1 - ratio)``: for ``magnitude`` pruning
exactly the log of the compression of the prunable weights, for ``l1_filter``/``channel`` (where ratio is the
channel ratio) a monotone stand-in (checked: probes whose measured compression does not grow with the ratio
are an error); both the params compression and the MAC reduction are measured and reported. The search first
probes ``--lo`` and ``--hi`` (compressions); then, as long as some (method, budget) has its frontier
bracketed by a passing probe below and a failing one above that span more than
``--tolerance`` x on the axis (the method's measured values: compression, MACs, bytes), it probes the midpoint of
that bracket in ``u`` (bisection in log-ratio). All the brackets' midpoints of a round run as one queue (``-j`` workers).

Resume: every finished run is read back from MLflow and from the per-run records CSV (``--records``, all
params, all metrics and the MLflow run id of each run), so a rerun, even on a fresh clone with an empty
``mlflow.db``, reuses every finished probe and trains nothing twice; DVC's run-cache restores each seed's
teacher. A run counts for a probe when every param equals params.yaml + ``--set``, except ``prune.ratio``,
``seed``, ``mlflow.*``, ``evaluate.latency_repeats`` (timing only) and ``distill.variants`` (it must include
every method: variants are trained independently, each from the same seed). A method that does not distil
(finetune, scratch) may come from another run of the same seed and ratio that differs only in the KD settings
(``distill.alpha``, ``temperature``, ``at_beta``), when both runs report the same teacher and compression.

The estimate and its interval. Between the last passing probe and the first failing one, the mean
accuracy is interpolated linearly in log-compression, and the frontier is where it crosses
``teacher - budget``. Each run is judged against its own teacher: a probe whose teacher differs from its seed's
other teachers (a teacher retrained on another CPU type or thread count is not bit-identical) has that difference
taken off its accuracies first (:func:`levelled`); with one teacher per seed, as on one machine, nothing changes.
The bracket ``[low, high]`` is a 95 % percentile bootstrap over seeds: the seeds are
resampled with replacement (the same draw for every probe and the teacher, as the runs are paired by seed),
the estimate is recomputed, 2000 times, seeded. A frontier beyond the probed range is reported as
``>= C`` (or ``< C``): the data says no more than that.

Output: ``metrics/frontier.csv`` and ``metrics/frontier.md`` (every probe: ratio, compression, MAC
reduction, per-method mean ± std and n, the first method minus each other one paired by seed with its 95 % t
interval (unadjusted), run ids; the .md also the headline and the frontier per budget and
method, which ``metrics/frontier_points.csv`` holds as numbers),
``plots/frontier.png``, and a summary run in the MLflow experiment ``<experiment>-reports``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from kdprune import overrides
from kdprune.experiments import queue
from kdprune.experiments.args import nest, parse_floats, parse_methods, parse_seeds, parse_sets
from kdprune.experiments.frontier_axis import AXES, check_axis_params
from kdprune.experiments.frontier_report import plural_seeds, write_outputs
from kdprune.experiments.frontier_search import MAX_PROBES, Probe, check_compression_grows, probes_from_runs, search
from kdprune.experiments.runs import FrontierError, joined, load_runs, write_records
from kdprune.params import ParamsError, flatten, params_from_dict, safe_load_yaml
from kdprune.archs import params_name
from kdprune.presets import merge
from kdprune.tracking.store import redact, tracking_uri
from kdprune.tracking.summary import log_summary, reports_experiment

RECORDS = Path("metrics/frontier_runs.csv")


def target_params(params_path: Path, sets: dict[str, Any], methods: list[str]):
    """params.yaml + the overrides + the methods as variants, validated like every stage does."""
    base = safe_load_yaml(params_path.read_text())
    try:
        overrides.check_no_interpolation(base, str(params_path))
    except overrides.OverrideError as e:
        raise FrontierError(str(e)) from None
    merged = merge(base, nest({**sets, "distill.variants": methods}))
    try:
        params = params_from_dict(merged)
    except ParamsError as e:
        raise FrontierError(f"--set: {e}") from None
    if params.prune.target_macs_reduction is not None:
        raise FrontierError(f"prune.target_macs_reduction is {params.prune.target_macs_reduction}: channel pruning "
                            "then ignores prune.ratio, the axis the frontier searches; set it to null")
    if params.prune.schedule != "oneshot" and params.prune.method != "magnitude":
        raise FrontierError("prune.schedule agp applies to magnitude pruning only")
    return params, flatten(merged)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdprune.frontier", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="1.0", help="accuracy budget(s) in points below the teacher, e.g. 1.0 or 0.5,1,2")
    ap.add_argument("--methods", default="kd,finetune", help="recovery variants to compare (default kd,finetune)")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of every probe (default 0,1,2)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="params override for every probe, like dvc exp run -S (repeatable)")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="parallel queue workers (default 1)")
    ap.add_argument("--axis", choices=list(AXES), default="compression",
                    help="what 'most compressed' is measured in: compression (params, default), macs (MAC "
                         "reduction; l1_filter/channel), bytes (INT8 gzip ONNX size; quantize.method ptq/qat), "
                         "latency (measured ORT INT8 speed-up at batch 1, noisy)")
    ap.add_argument("--lo", type=float, default=2.0,
                    help="least 1/(1 - prune.ratio) searched, for every --axis: the compression of the prunable "
                         "weights under magnitude pruning (default 2x = ratio 0.5)")
    ap.add_argument("--hi", type=float, default=200.0,
                    help="most 1/(1 - prune.ratio) searched, for every --axis (default 200x = ratio 0.995; "
                         "l1_filter/channel: at most 1/(1 - the model's largest ratio), e.g. 16 for ResNet-8 w16)")
    ap.add_argument("--tolerance", type=float, default=1.25,
                    help="stop when each bracket spans at most this factor on --axis: the failing probe's value over the "
                         "passing one's, per method (default 1.25)")
    ap.add_argument("--max-probes", type=int, default=8, help=f"new probes at most (default 8, at most {MAX_PROBES})")
    ap.add_argument("--records", type=Path, default=RECORDS, help=f"per-run records CSV (default {RECORDS})")
    ap.add_argument("--analyse", action="store_true", help="train nothing: write the frontier from the runs so far")
    ap.add_argument("--no-mlflow-summary", action="store_true", help="don't log the outputs as an MLflow run")
    ap.add_argument("--out", type=Path, default=Path("."), help="directory that gets metrics/ and plots/")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except FrontierError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    budgets = parse_floats(args.budget, "--budget", 0.0, 100.0)
    methods = parse_methods(args.methods)
    seeds = parse_seeds(args.seeds)
    lo = parse_floats(str(args.lo), "--lo", 1.0, 1e6)[0]
    hi = parse_floats(str(args.hi), "--hi", lo, 1e6)[0]
    tolerance = parse_floats(str(args.tolerance), "--tolerance", 1.0, 100.0)[0]
    if not 1 <= args.jobs <= 64:
        raise FrontierError(f"-j {args.jobs}: allowed 1 to 64")
    if not 1 <= args.max_probes <= MAX_PROBES:
        raise FrontierError(f"--max-probes {args.max_probes}: allowed 1 to {MAX_PROBES}")
    sets = parse_sets(args.sets)
    params, target = target_params(Path("params.yaml"), sets, methods)
    axis = AXES[args.axis]
    check_axis_params(axis, params.prune.method, target, params.evaluate.latency_repeats, train=not args.analyse)
    uri = tracking_uri()
    experiment = params.mlflow.experiment
    log = lambda m: print(m, flush=True)  # noqa: E731

    def known() -> list[Probe]:
        runs = load_runs(args.records, uri, experiment)
        write_records(args.records, runs)
        return probes_from_runs(joined(runs, target, methods), methods, seeds, axis)

    probes = known()
    log(f"frontier: {len(probes)} finished probes found (MLflow {redact(uri)} and {args.records})")
    if not args.analyse:
        try:
            extra = overrides.dvc_args({}, {**sets, "distill.variants": methods})
        except overrides.OverrideError as e:
            raise FrontierError(f"--set {e}") from None

        def run_batch(ratios: list[float]) -> list[Probe]:
            grid = [(s, r) for s in seeds for r in ratios]
            names, status, counts, seconds = queue.run_grid(grid, extra, args.jobs, "frontier", experiment, log)
            failed = [n for n in names.values() if status.get(n) == "Failed"]
            log(f"frontier: {len(names)} experiments in {seconds:.0f} s; failed: {failed or 'none'}")
            return known()

        t0 = time.time()
        probes = search(run_batch, probes, methods, budgets, lo, hi, tolerance, args.max_probes, log,
                        prune_method=params.prune.method, axis=axis)
        log(f"frontier: search wall time {time.time() - t0:.0f} s")
    if not probes:
        raise FrontierError(f"no finished probes match params.yaml + --set with seeds {seeds} and methods {methods}")
    check_compression_grows(probes, params.prune.method, axis)

    title = f"{params.data.name}, {params_name(params.model)}, {params.prune.method} ({plural_seeds(len(seeds))})"
    files, fronts = write_outputs(args.out, probes, methods, budgets, title, prefix=axis.prefix, axis=axis)
    print(Path(files[1]).read_text())
    if not args.no_mlflow_summary:
        run_id = log_summary(uri, experiment, files + ([args.records] if args.records.exists() else []),
                             sum(len(p.seeds) for p in probes), kind="frontier")
        log(f"mlflow: frontier logged as run {run_id} (experiment '{reports_experiment(experiment)}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
