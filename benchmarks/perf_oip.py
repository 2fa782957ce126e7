"""perf_analyzer against the gateway serving the demo model: unary and streaming, by concurrency.

    make bench                                   # or:
    .venv/bin/python benchmarks/perf_oip.py --repository .demo-repo [--perf-analyzer PATH]

perf_analyzer is NVIDIA's OIP load generator; ``../shared/tools/install-perf-analyzer`` (or
``PERF_ANALYZER=/path``) provides it. The gateway runs in its own process on 127.0.0.1; each
measurement is bounded in time. Results go to benchmarks/results/perf_oip.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"gateway ready grpc=(\S+)")


def find_perf_analyzer(explicit: str | None) -> str:
    candidates = [explicit, os.environ.get("PERF_ANALYZER"), shutil.which("perf_analyzer")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    installer = ROOT.parent / "shared" / "tools" / "install-perf-analyzer"
    if installer.exists():
        return subprocess.run(
            [str(installer)], check=True, capture_output=True, text=True
        ).stdout.strip()
    sys.exit("perf_analyzer not found: pass --perf-analyzer PATH or set PERF_ANALYZER")


def start_gateway(
    repository: Path, log: Path, extra: list[str]
) -> tuple[subprocess.Popen[bytes], str]:
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--repository", str(repository),
             "--port", "0", "--metrics-port", "0", *extra],
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        match = READY.search(log.read_text())
        if match:
            return proc, match.group(1)
        if proc.poll() is not None:
            sys.exit(f"gateway exited:\n{log.read_text()}")
        time.sleep(0.1)
    proc.kill()
    sys.exit("gateway did not start")


def run_perf(
    pa: str, url: str, concurrency: int, streaming: bool, batch: int, interval_ms: int
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pa.csv"
        command = [
            pa, "-m", "fraud", "-i", "grpc", "-u", url, "-b", str(batch),
            "--concurrency-range", str(concurrency), "--measurement-interval", str(interval_ms),
            "--percentile", "99", "--max-trials", "8", "--stability-percentage", "50",
            "-f", str(out),
        ]  # fmt: skip
        if streaming:
            command.append("--streaming")
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"perf_analyzer failed:\n{result.stdout}\n{result.stderr}")
        row = next(csv.DictReader(out.open()))
    return {
        "throughput_infer_s": float(row["Inferences/Second"]),
        "p50_us": float(row["p50 latency"]),
        "p95_us": float(row["p95 latency"]),
        "p99_us": float(row["p99 latency"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--repository", type=Path, default=ROOT / ".demo-repo")
    parser.add_argument("--perf-analyzer")
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--interval-ms", type=int, default=4000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "perf_oip")
    args = parser.parse_args()

    pa = find_perf_analyzer(args.perf_analyzer)
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_gateway(args.repository, Path(tmp) / "gateway.log", [])
        rows = []
        try:
            for streaming in (False, True):
                for concurrency in (int(c) for c in args.concurrency.split(",")):
                    stats = run_perf(pa, url, concurrency, streaming, args.batch, args.interval_ms)
                    rows.append({"mode": "streaming" if streaming else "unary",
                                 "concurrency": concurrency, **stats})  # fmt: skip
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            proc.terminate()
            proc.wait(30)

    header = (
        "| mode | concurrency | infer/s | p50 ms | p95 ms | p99 ms |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: |\n"
    )
    lines = [
        f"| {r['mode']} | {r['concurrency']} | {r['throughput_infer_s']:.0f} "
        f"| {r['p50_us'] / 1000:.2f} | {r['p95_us'] / 1000:.2f} | {r['p99_us'] / 1000:.2f} |"
        for r in rows
    ]
    meta = {
        "model": "fraud (demo, default version 2)",
        "batch": args.batch,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n"
    )
    table = header + "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(
        f"# perf_analyzer against the demo model\n\n{json.dumps(meta)}\n\n{table}"
    )
    print(table)


if __name__ == "__main__":
    main()
