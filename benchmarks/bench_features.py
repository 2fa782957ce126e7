"""Feature assembly benchmark: the native kernel against its Python twin, and assembly's share
of the server's CPU under load.

    .venv/bin/python benchmarks/bench_features.py              # kernel only (about 30 s)
    .venv/bin/python benchmarks/bench_features.py --profile    # + perf_analyzer under py-spy

Kernel: a 32-feature contract (24 numeric, 8 categorical; benchmarks/models.py) over batches
of 1, 64 and 1024 rows with about 5% nulls and 5% out-of-vocabulary values, strings as the
wire carries them (one raw BYTES buffer per feature) and as bytes objects. Native and twin
are timed in alternating short windows in one process; the ratio is what to read. ``e2e`` adds what
the server does around the kernel for one request (type checks, conversion, allocation).

Profile: the gateway serves a scorer under that contract; perf_analyzer sends named-feature
requests (-b 1, concurrency 64, the features ModelMetadata advertises) while py-spy samples
the server; the share of samples inside ``Pipeline._assemble`` is assembly's share of server
CPU (the stack strings of py-spy's raw output, every thread). Results:
benchmarks/results/features.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_serving import find_perf_analyzer, running  # noqa: E402
from benchmarks.models import write_feature_model  # noqa: E402
from gateway._hotloops import encode_bytes  # noqa: E402
from gateway.features import Contract, _kernel_py, load_contract  # noqa: E402
from gateway.types import Tensor  # noqa: E402

try:
    from gateway import _features_c
except ImportError:
    sys.exit("the native kernel is not built: run `make native`")

RESULTS = ROOT / "benchmarks" / "results"


def raw_columns(contract: Contract, rows: int, seed: int = 0) -> dict[str, tuple[str, Any]]:
    """One request's tensors as (datatype, array): ~5% NaN in floats, ~5% OOV strings."""
    rng = np.random.default_rng(seed)
    out: dict[str, tuple[str, Any]] = {}
    for feature in contract.features:
        if feature.kind == "categorical":
            vocab = feature.vocabulary or []
            picks = rng.integers(0, len(vocab), rows)
            values = np.empty(rows, dtype=object)
            values[:] = [b"unseen" if rng.random() < 0.05 else vocab[p].encode() for p in picks]
            out[feature.name] = ("BYTES", values)
        elif feature.kind == "int":
            out[feature.name] = ("INT64", rng.integers(0, 120, rows))
        elif feature.kind == "bool":
            out[feature.name] = ("BOOL", rng.random(rows) < 0.5)
        else:
            values = rng.lognormal(2.0, 1.0, rows).astype(np.float32)
            values[rng.random(rows) < 0.05] = np.nan
            out[feature.name] = ("FP32", values)
    return out


def kernel_columns(contract: Contract, raw: dict[str, tuple[str, Any]], wire: bool) -> list[Any]:
    """Columns as the kernel gets them: numerics in their own dtype; strings as the wire's raw
    BYTES buffer (``wire``, the server's form) or as an object array (the offline form)."""
    return [
        (encode_bytes(list(values)) if wire else values) if datatype == "BYTES" else values
        for datatype, values in (raw[f.name] for f in contract.features)
    ]


def rate(fn: Callable[[], object], budget_s: float) -> float:
    """Calls per second of ``fn`` over about ``budget_s``."""
    calls, started = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= budget_s:
            return calls / elapsed


def bench_kernel(contract: Contract, pairs: int, window_s: float) -> list[dict[str, object]]:
    """Native and twin timed in ``pairs`` back-to-back short windows; medians are reported,
    the ratio as the median of the per-pair ratios (robust to the machine's speed drifting)."""
    results = []
    for wire in (True, False):
        for rows in (1, 64, 1024):
            results.append(bench_rows(contract, rows, wire, pairs, window_s))
            print(results[-1], flush=True)
    return results


def bench_rows(
    contract: Contract, rows: int, wire: bool, pairs: int, window_s: float
) -> dict[str, object]:
    raw = raw_columns(contract, rows)
    columns = kernel_columns(contract, raw, wire)
    tensors = [
        Tensor(name, datatype, raw=encode_bytes(list(values)), shape=(rows,))
        if datatype == "BYTES" and wire
        else Tensor(name, datatype, values)
        for name, (datatype, values) in raw.items()
    ]
    out = np.zeros((rows, contract.width), dtype=np.float32)
    counts = np.zeros((len(contract.features), 4), dtype=np.int64)
    native_plan, twin_plan = _features_c.prepare(contract.plan), _kernel_py.prepare(contract.plan)

    def native_call() -> object:
        return _features_c.run(native_plan, columns, rows, out, counts)

    def twin_call() -> object:
        return _kernel_py.run(twin_plan, columns, rows, out, counts)

    def e2e() -> object:
        return contract.assemble(tensors, "bench", 1 << 30)

    native, twin, e2e_rates, ratios = [], [], [], []
    for _ in range(pairs):
        native.append(rate(native_call, window_s) * rows)
        twin.append(rate(twin_call, window_s) * rows)
        ratios.append(native[-1] / twin[-1])
        e2e_rates.append(rate(e2e, window_s) * rows)
    e2e_median = float(np.median(e2e_rates))
    return {
        "rows": rows,
        "strings": "wire" if wire else "objects",
        "native_rows_per_s": round(float(np.median(native))),
        "twin_rows_per_s": round(float(np.median(twin))),
        "native_over_twin": round(float(np.median(ratios)), 1),
        "ratio_iqr": [round(float(q), 1) for q in np.percentile(ratios, [25, 75])],
        "e2e_native_rows_per_s": round(e2e_median),
        "e2e_us_per_request": round(1e6 * rows / e2e_median, 1),
    }


def profile(pa: str, seconds: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        write_feature_model(repo / "features_bench")
        command = [sys.executable, "-m", "gateway", "serve", "--repository", str(repo)]
        command += ["--port", "0", "--metrics-port", "0"]
        with running(command, Path(tmp) / "gateway.log") as server:
            load_command = [pa, "-m", "features_bench", "-i", "grpc", "-u", server.url, "-b", "1"]
            load_command += ["--concurrency-range", "64"]
            load_command += ["--measurement-interval", str(seconds * 1000)]
            load_command += ["--stability-percentage", "100", "--max-trials", "3"]
            load_command += ["-f", str(Path(tmp) / "pa.csv")]
            load = subprocess.Popen(
                load_command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            time.sleep(3)  # past perf_analyzer's warm-up
            samples = Path(tmp) / "samples.txt"
            spy_command = [str(Path(sys.executable).parent / "py-spy"), "record"]
            spy_command += ["--pid", str(server.process.pid), "--duration", str(seconds)]
            spy_command += ["--rate", "200", "--format", "raw", "--output", str(samples)]
            spy_command += ["--nonblocking"]
            spy = subprocess.run(spy_command, capture_output=True, text=True)
            output, _ = load.communicate(timeout=600)
            if spy.returncode != 0:
                sys.exit(f"py-spy failed: {spy.stderr.strip()}")
        shares = {
            "assembly": "Pipeline._assemble (",
            "decode": "request_from_pb (",
            "model_run": "Session.run (",
        }
        total = 0
        counted = dict.fromkeys(shares, 0)
        for line in samples.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            total += int(count)
            for name, frame in shares.items():
                if frame in stack:
                    counted[name] += int(count)
        if total < 100:
            sys.exit(f"py-spy took {total} samples: the server was idle?\n{output[-2000:]}")
        throughput = [ln for ln in output.splitlines() if ln.strip().startswith("Throughput:")]
        return {
            "samples": total,
            **{f"{name}_share": round(n / total, 4) for name, n in counted.items()},
            "perf_analyzer": throughput[-1].strip() if throughput else output[-400:],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=15, help="native/twin window pairs")
    parser.add_argument("--window-s", type=float, default=0.2, help="seconds per window")
    parser.add_argument("--profile", action="store_true", help="also profile the server")
    parser.add_argument("--profile-seconds", type=int, default=20)
    parser.add_argument("--perf-analyzer")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        width = write_feature_model(Path(tmp) / "m")
        contract = load_contract(Path(tmp) / "m")
    report: dict[str, object] = {
        "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
        "python": platform.python_version(),
        "contract": f"{len(contract.features)} features (8 categorical), width {width}",
        "kernel": bench_kernel(contract, args.pairs, args.window_s),
    }
    if args.profile:
        report["profile"] = profile(find_perf_analyzer(args.perf_analyzer), args.profile_seconds)
        print(report["profile"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "features.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "features.md").write_text(markdown(report))
    print((RESULTS / "features.md").read_text())


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Feature assembly benchmark",
        "",
        f"`{report['machine']}, Python {report['python']}; contract: {report['contract']}`",
        "",
        "Strings: `wire` = categorical values as the request's raw BYTES buffer (the server's "
        "form); `objects` = an array of bytes objects (the offline form).",
        "",
        "| strings | rows | native rows/s | twin rows/s | native / twin (IQR) | "
        "server path rows/s | server path us/request |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["kernel"]:
        lines.append(
            f"| {row['strings']} | {row['rows']} | {row['native_rows_per_s']:,} | "
            f"{row['twin_rows_per_s']:,} | "
            f"{row['native_over_twin']}x ({row['ratio_iqr'][0]}-{row['ratio_iqr'][1]}) | "
            f"{row['e2e_native_rows_per_s']:,} | "
            f"{row['e2e_us_per_request']} |"
        )
    if "profile" in report:
        p = report["profile"]
        lines += [
            "",
            "## Server CPU under load (perf_analyzer -b 1, concurrency 64, py-spy)",
            "",
            f"- py-spy samples of the server (every thread, idle excluded): {p['samples']}",
            f"- feature assembly (`Pipeline._assemble`): {100 * p['assembly_share']:.1f}%",
            f"- decoding the request's tensors (`request_from_pb`): {100 * p['decode_share']:.1f}%",
            f"- ONNX Runtime (`Session.run`): {100 * p['model_run_share']:.1f}%",
            f"- perf_analyzer: {p['perf_analyzer']}",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
