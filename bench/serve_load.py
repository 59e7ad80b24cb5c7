"""Load test of `captioner serve` (issue 15): N concurrent HTTP clients on the loopback interface.

Phases, in one run, on the same photos and model:
  cli     `captioner caption PHOTOS -o out.csv` in a subprocess: the batch photos/s it reports
          (model load excluded), the reference the server's throughput is compared with. Run
          before and after the serve phase, and averaged, so that other jobs on a shared machine
          that come or go during the run weigh on both sides alike.
  serve   `captioner serve` in a subprocess on 127.0.0.1 and a free port; after a warm-up,
          `--clients` threads send `--requests` single-photo requests between them, alternating
          the TF Serving endpoint (base64 JSON) and multipart uploads, a share of them bad uploads
          (a truncated JPEG or a text file). Every request carries a photo no other request sent,
          so the feature cache never answers.

Reports throughput (photos/s of good photos, requests/s), p50/p99 latency, answers by status and
error, the server's passes (how many photos shared each), the CPU the server and the clients each
used (both share the machine's cores), and the server's resident memory after the warm-up and at
the end. Targets (issue 15, 2 cores, 16 clients): throughput >= 80 % of the CLI's,
p99 < 1 s, no 5xx, memory growth < 50 MiB over 2,000 requests. Bounded: at most `--requests`
requests and `--max-seconds` of load; every call has a timeout; nothing leaves the machine.

    python bench/serve_load.py --requests 2000          # the issue's figure (about 2-4 min)
    python bench/serve_load.py --requests 200           # a quick look

Writes bench/results/serve_load.json.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import common
from common import generate_jpegs, machine_info, percentile, print_table, write_result

HOST = "127.0.0.1"  # loopback only: this script never talks to another machine
PREDICT = "/v1/models/captioner:predict"
MAX_REQUESTS = 20_000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR", default=str(common.REPO / "captioner/assets/models/default"),
                   help="model bundle (default: the shipped model)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--requests", type=int, default=2000, help=f"requests in all, at most {MAX_REQUESTS:,} (default 2,000)")
    p.add_argument("--bad-every", type=int, default=20, help="every Nth request is a bad upload (default 20: 5 %%)")
    p.add_argument("--warmup", type=int, metavar="N",
                   help="concurrent requests before memory is first measured, so passes of every size have "
                   "run and the allocators have their pools (default 10 per client)")
    p.add_argument("--cli-photos", type=int, default=256, help="photos the CLI reference captions (default 256)")
    p.add_argument("--serve-args", default="", metavar="ARGS",
                   help="more flags for captioner serve, e.g. \"--batch-window-ms 40\" (default none)")
    p.add_argument("--max-seconds", type=float, default=900, help="stop sending after this long (default 900)")
    p.add_argument("--workdir", metavar="DIR", help="where generated photos go (default: a temp dir)")
    p.add_argument("--output", metavar="FILE", help="result JSON (default bench/results/serve_load.json)")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS or not 1 <= args.clients <= 256:
        p.error(f"--requests must be 1..{MAX_REQUESTS:,} and --clients 1..256")
    if args.warmup is None:
        args.warmup = 10 * args.clients
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cpu_seconds_of(pid: int) -> float:
    """User + system CPU time of another process so far (less hostage to other jobs than wall time)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """Resident memory of another process (the server), from /proc."""
    text = Path(f"/proc/{pid}/status").read_text()
    return round(int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024, 1)


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(common.REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}


def cli_reference(photos: list[Path], model: str, workdir: Path) -> dict:
    """`captioner caption` on `photos` in a new process; photos/s from its own summary line, which
    times the captioning (not the start-up and model load)."""
    out = workdir / "cli.csv"
    command = [sys.executable, "-m", "captioner", "caption", *map(str, photos), "-o", str(out), "--overwrite",
               "--model", model]
    run = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=900)
    found = re.search(r"captioned (\d+) of (\d+) photos in ([\d.]+) s", run.stderr)
    if run.returncode != 0 or not found:
        raise SystemExit(f"captioner caption failed (exit {run.returncode}): {run.stderr[-2000:]}")
    done, seconds = int(found.group(1)), float(found.group(3))
    return {"photos": done, "seconds": seconds, "photos_per_s": done / seconds}


def start_server(model: str, port: int, extra: list[str]) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "captioner", "serve", "--model", model, "--host", HOST,
                                "--port", str(port), *extra], env=env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"captioner serve exited: {process.stderr.read()[-2000:]}")
        try:
            if healthz(port, timeout=2)[0] == 200:
                return process
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("captioner serve was not ready within 180 s")


def make_request(i: int, photo: Path, bad_every: int) -> tuple[str, str, bytes]:
    """(endpoint, kind, bytes) of request `i`: even ones TF Serving JSON, odd ones uploads."""
    data = photo.read_bytes()
    kind = "good"
    if bad_every and i % bad_every == bad_every - 1:
        kind, data = ("truncated", data[: len(data) // 3]) if (i // bad_every) % 2 else ("text", b"not a photo\n")
    return ("predict" if i % 2 == 0 else "upload"), kind, data


class Client:
    """One keep-alive HTTP/1.1 connection of the standard library's. The clients share the cores
    with the server, so they must take little of them: httpx took 3.4-4.3 ms of CPU a request here."""

    def __init__(self, port: int, timeout: float = 30):
        self.port, self.timeout, self.connection = port, timeout, None

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "") -> tuple[int, bytes]:
        if self.connection is None:
            self.connection = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
        try:
            self.connection.request(method, path, body, {"Content-Type": content_type} if content_type else {})
            response = self.connection.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException):
            self.close()  # the next request opens a new connection; this one counts as a transport error
            raise
        if response.will_close:
            self.close()
        return response.status, answer

    def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        return self.request("POST", path, body, content_type)

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def healthz(port: int, timeout: float) -> tuple[int, bytes]:
    client = Client(port, timeout)
    try:
        return client.request("GET", "/healthz")
    finally:
        client.close()


BOUNDARY = "captioner-load-test"


def send(client: Client, endpoint: str, data: bytes) -> tuple[int, str]:
    if endpoint == "predict":
        body = json.dumps({"instances": [{"b64": base64.b64encode(data).decode()}]}).encode()
        status, answer = client.post(PREDICT, body, "application/json")
    else:
        body = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="photo.jpg"\r\n'
                f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()
        status, answer = client.post("/caption", body, f"multipart/form-data; boundary={BOUNDARY}")
    try:
        error = json.loads(answer).get("error") or ""
    except ValueError:
        error = "not JSON"
    return status, error


def run_load(port: int, photos: list[Path], args, count: int) -> tuple[list[dict], float]:
    """`count` requests from `args.clients` clients, each taking the next request number until
    all are sent or `--max-seconds` is up."""
    lock, next_index, records = threading.Lock(), [0], []
    stop_at = time.monotonic() + args.max_seconds

    def client_loop() -> None:
        client = Client(port)
        try:
            while time.monotonic() < stop_at:
                with lock:
                    i = next_index[0]
                    next_index[0] += 1
                if i >= count:
                    return
                endpoint, kind, data = make_request(i, photos[i], args.bad_every)
                started = time.perf_counter()
                try:
                    status, error = send(client, endpoint, data)
                except (OSError, http.client.HTTPException) as e:
                    status, error = 0, f"{type(e).__name__}"
                records.append({"endpoint": endpoint, "kind": kind, "status": status, "error": error,
                                "seconds": time.perf_counter() - started})
        finally:
            client.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - started


def sample_rss(pid: int, samples: list[float], stop: threading.Event) -> None:
    """The server's resident memory every second until `stop`."""
    while not stop.wait(1.0):
        samples.append(rss_mib(pid))


def error_kind(record: dict) -> str:
    """`status: reason` without the image's name, so equal errors are counted together."""
    reason = re.sub(r"^\d+ of \d+ images could not be captioned: [^:]+: ", "", record["error"])
    reason = re.sub(r" \(.*\)$", "", reason)
    return f"{record['status']} {record['kind']}: {reason}" if reason else f"{record['status']} {record['kind']}"


def main(argv=None) -> int:
    args = parse_args(argv)
    info = machine_info()

    with tempfile.TemporaryDirectory(prefix="captioner-serve-load-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        warmup = args.warmup
        # Distinct photos for every request, the warm-up and the CLI, so no cache answers for the encoder.
        photos = generate_jpegs(args.requests + warmup, workdir / "photos", seed=15)
        print(f"{len(photos)} generated 500x375 JPEGs in {workdir / 'photos'}")
        cli_photos = photos[warmup : warmup + args.cli_photos]
        cli_before = cli_reference(cli_photos, args.model, workdir)
        print(f"CLI: {cli_before['photos']} photos in {cli_before['seconds']:.1f} s = "
              f"{cli_before['photos_per_s']:.1f} photos/s")

        port = free_port()
        server = start_server(args.model, port, shlex.split(args.serve_args))
        try:
            # The warm-up runs passes of every size (compiling the tf.functions, filling the
            # allocators' pools), so that growth after it would be a leak, not a first use.
            run_load(port, photos[:warmup], args, warmup)
            rss_before, cpu_before = rss_mib(server.pid), cpu_seconds_of(server.pid)
            samples, sampling = [], threading.Event()
            sampler = threading.Thread(target=sample_rss, args=(server.pid, samples, sampling))
            sampler.start()
            clients_cpu_before = time.process_time()
            try:
                records, seconds = run_load(port, photos[warmup:], args, args.requests)
            finally:
                sampling.set()
                sampler.join()
            rss_after, server_cpu = rss_mib(server.pid), cpu_seconds_of(server.pid) - cpu_before
            clients_cpu = time.process_time() - clients_cpu_before
            health = json.loads(healthz(port, timeout=10)[1])
        finally:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
        cli_after = cli_reference(cli_photos, args.model, workdir)
        print(f"CLI again: {cli_after['photos_per_s']:.1f} photos/s")
    cli = {"before": cli_before, "after": cli_after,
           "photos_per_s": (cli_before["photos_per_s"] + cli_after["photos_per_s"]) / 2}
    matmul = common.matmul_gflops()  # this machine's rate, after the load: photos/s are read against it

    good = [r for r in records if r["kind"] == "good"]
    ok = [r for r in good if r["status"] == 200]
    latencies = [r["seconds"] for r in records]
    by_kind = Counter(error_kind(r) for r in records if r["status"] != 200)
    wrong = [r for r in records if r["status"] != (200 if r["kind"] == "good" else 422)]
    photos_per_s = len(ok) / seconds
    result = {
        "clients": args.clients, "requests": len(records), "seconds": round(seconds, 2),
        "photos_per_s": round(photos_per_s, 2), "requests_per_s": round(len(records) / seconds, 2),
        "cli_photos_per_s": round(cli["photos_per_s"], 2),
        "server_cpu_ms_per_photo": round(1000 * server_cpu / max(len(ok), 1), 1),
        # The clients share the cores with the server: what they take is not the server's to use.
        "clients_cpu_ms_per_request": round(1000 * clients_cpu / max(len(records), 1), 1),
        "server_cores_busy": round(server_cpu / seconds, 2), "clients_cores_busy": round(clients_cpu / seconds, 2),
        "ratio_to_cli": round(photos_per_s / cli["photos_per_s"], 3),
        "photos_per_s_per_matmul_gflops": round(photos_per_s / matmul["best_gflops"], 3),
        "p50_ms": round(1000 * percentile(latencies, 50), 1), "p99_ms": round(1000 * percentile(latencies, 99), 1),
        "good_captioned": len(ok), "good_sent": len(good), "bad_sent": len(records) - len(good),
        "errors_by_kind": dict(by_kind), "server_errors_5xx": sum(r["status"] >= 500 for r in records),
        "transport_errors": sum(r["status"] == 0 for r in records), "unexpected_answers": len(wrong),
        "server_rss_mib_before": rss_before, "server_rss_mib_after": rss_after,
        "server_rss_growth_mib": round(rss_after - rss_before, 1), "server_rss_mib_peak": max(samples, default=None),
        # A leak goes on growing; a first use (a new pass size, the feature cache filling) stops.
        "server_rss_growth_second_half_mib": round(rss_after - samples[len(samples) // 2], 1) if samples else None,
        "passes": health["passes"], "photos_per_pass": round(health["photos"] / max(health["passes"], 1), 2),
        "largest_pass": health["largest_pass"],
    }
    targets = {
        "throughput >= 80% of the CLI": result["ratio_to_cli"] >= 0.8,
        "p99 < 1 s": result["p99_ms"] < 1000,
        "no 5xx": result["server_errors_5xx"] == 0 and result["transport_errors"] == 0,
        "memory growth < 50 MiB": result["server_rss_growth_mib"] < 50,
        "every answer as expected (200 good, 422 bad)": not wrong,
    }
    print_table([{k: v for k, v in result.items() if k != "errors_by_kind"}],
                title=f"captioner serve, {args.clients} clients, {len(records)} requests (model {args.model})")
    print_table([{"answer": k, "count": v} for k, v in sorted(by_kind.items())], title="answers other than 200")
    print_table([{"target": k, "met": "yes" if v else "NO"} for k, v in targets.items()], title="targets")
    print(f"this machine's float32 matmul rate in this run: {matmul['best_gflops']:.0f} GFLOP/s (best of 7)")
    write_result("serve_load", {"machine": info, "matmul": matmul, "model": args.model, "cli": cli, "serve": result,
                                "server_rss_mib_every_second": samples,
                                "targets": targets}, args.output)
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
