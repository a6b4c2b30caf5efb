"""Serving on this CPU: ``llm serve`` (ONNX Runtime, continuous batching) against ``mlflow models serve``.

Both servers serve the same registered version, one after the other, in this one run: ``llm serve`` once for
each of ``--engines`` (1 and 2 engine processes by default), then ``mlflow models serve``. For each server and
each number of concurrent clients (1, 4, 8 by default), every client sends chat requests back to back for
``--seconds``: one user message (a few lines from a small list), ``--max-tokens`` new tokens (64), temperature
0.8, a different seed per request, and ``min_tokens`` (``min_new_tokens`` for the pyfunc) equal to
``--max-tokens`` so that every answer is that long rather than ending at the model's end of turn (a pyfunc
logged before ``min_new_tokens`` existed ignores it, and its answers end where the model ends them; its
figures count the tokens it did return). Reported per row:

    tokens/s    completion tokens of all requests / the phase's wall time (aggregate over the clients)
    p50, p99    request latency, from sending the request to its last byte
    ttft        time to first token: the first content chunk of a streamed answer (llm serve streams every
                request, as a chat UI does); mlflow's scoring server cannot stream, so its ttft is the latency
    errors      requests that failed (HTTP status other than 200, a broken stream, a timeout)
    cpu/tok     the server's CPU time (user + system, with its worker processes) per completion token, in
                microseconds: what serving a token costs, which other load on the machine barely changes, unlike
                tokens/s
    load        the 1-minute load average at the end of the phase (the machine's other work; it is also printed
                before the first phase): wall-clock figures are the server's own only on an otherwise idle machine
    rss         the server's resident memory (with its worker processes): at the start / peak / end of the phase

``llm serve`` counts completion tokens in its ``usage`` (exact); for ``mlflow models serve`` they are the
tokenizer's count of the returned text (the ids sampled can differ from a re-encoding by a token or two).
Then the last ``llm serve`` runs ``--long-seconds`` (120) with 8 clients, to show zero errors and flat memory
under sustained load. The clients are plain ``http.client`` threads in this process, on the same machine as the
server, so they take some of its CPU: the figures are what one box serving itself gives. Both servers run this
checkout's ``llm`` (its folder goes first on their ``PYTHONPATH``), whatever copy the virtualenv installed.

Usage (in a project where ``dvc repro`` has registered and exported a model, e.g. after ``make demo``)::

    python bench/serve.py                                   # models:/gpt/Production, 20 s per row, 120 s long run
    python bench/serve.py --engines 1 --skip-mlflow         # llm serve's default alone
    python bench/serve.py --seconds 10 --long-seconds 0 --json serve.json
    python bench/serve.py --chaos --model artifacts/onnx  # engine killed 3 times, stopped once, under 8 clients
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BIN = Path(sys.executable).parent
QUESTIONS = [
    "What news from Verona?",
    "Who comes here?",
    "Tell me of the king.",
    "Where is my lord?",
    "What say you to this?",
    "How fares the queen?",
    "Why do you weep?",
    "What is your name, good sir?",
]


@dataclass
class Result:
    latency: float
    ttft: float
    tokens: int


@dataclass
class Phase:
    server: str
    clients: int
    seconds: float
    results: list[Result] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    cpu_s: float = float("nan")  # the server's CPU seconds during the phase
    load: float = float("nan")  # the 1-minute load average at its end

    def row(self) -> dict:
        latencies = sorted(r.latency for r in self.results)
        ttfts = sorted(r.ttft for r in self.results)
        return {
            "server": self.server, "clients": self.clients, "seconds": round(self.seconds, 1),
            "requests": len(self.results), "tokens": sum(r.tokens for r in self.results),
            "tokens_per_s": sum(r.tokens for r in self.results) / self.seconds,
            "p50_s": _percentile(latencies, 50), "p99_s": _percentile(latencies, 99),
            "ttft_p50_s": _percentile(ttfts, 50), "ttft_p99_s": _percentile(ttfts, 99),
            "errors": len(self.errors), "first_errors": self.errors[:3],
            "cpu_us_per_token": self.cpu_s / max(1, sum(r.tokens for r in self.results)) * 1e6,
            "load_avg": self.load,
            "rss_mb": [round(self.rss_mb[0]), round(max(self.rss_mb)), round(self.rss_mb[-1])] if self.rss_mb else [],
        }


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process started for the benchmark, ready once ``health`` answers 200, stopped on exit."""

    def __init__(self, name: str, args: list[str], port: int, health: str, log: Path):
        self.name, self.port, self.health, self.log = name, port, health, log
        # this checkout's llm, not the copy a virtualenv may have installed from elsewhere (an editable install of
        # another worktree would otherwise be what both servers run)
        path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        # and this virtualenv's scripts first on PATH: `mlflow models serve` starts the `uvicorn` it finds there
        env = {**os.environ, "PYTHONPATH": path, "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}
        self.process = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}); see {self.log}")
            try:
                status, _ = request(self.port, "GET", self.health, None, timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not answer {self.health} in {timeout:.0f} s; see {self.log}")

    def rss_mb(self) -> float:
        try:
            root = psutil.Process(self.process.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
        except psutil.Error:
            return float("nan")

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server and its live worker processes have used so far."""
        try:
            root = psutil.Process(self.process.pid)
            return sum(sum(p.cpu_times()[:2]) for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            return float("nan")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def request(port: int, method: str, path: str, body: dict | None, timeout: float = 120) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def llm_chat(port: int, model: str, question: str, seed: int, max_tokens: int) -> Result:
    """One streamed chat completion from ``llm serve``; its usage chunk gives the completion tokens."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "min_tokens": max_tokens, "temperature": 0.8, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
        ttft, tokens, done = None, None, False
        for line in response:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                done = True
                break
            if ttft is not None and data.endswith(b'"usage": null}'):
                continue  # a content chunk after the first: the client need not parse it (saves its CPU)
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"error event: {chunk['error'].get('message')}")
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        if not done or tokens is None:
            raise RuntimeError("the stream ended without its usage chunk and [DONE]")
    finally:
        conn.close()
    latency = time.perf_counter() - start
    return Result(latency, latency if ttft is None else ttft, tokens)


def mlflow_chat(port: int, question: str, seed: int, max_tokens: int, count: Callable[[str], int]) -> Result:
    """One chat request to the scoring server of ``mlflow models serve`` (no streaming)."""
    row = {"messages": [{"role": "user", "content": question}], "max_new_tokens": max_tokens,
           "min_new_tokens": max_tokens, "temperature": 0.8, "seed": seed}
    start = time.perf_counter()
    status, body = request(port, "POST", "/invocations", {"dataframe_records": [row]})
    latency = time.perf_counter() - start
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
    text = json.loads(body)["predictions"][0]
    return Result(latency, latency, count(text))


def run_phase(server: Server, clients: int, seconds: float, send: Callable[[str, int], Result]) -> Phase:
    """``clients`` threads sending requests back to back for ``seconds``; memory sampled every 0.5 s."""
    phase = Phase(server.name, clients, seconds)
    lock, stop = threading.Lock(), threading.Event()
    seeds = iter(range(10**9))

    def client(index: int) -> None:
        n = index
        while not stop.is_set():
            with lock:
                seed = next(seeds)
            try:
                result = send(QUESTIONS[n % len(QUESTIONS)], seed)
            except Exception as err:  # noqa: BLE001 - every failure counts as an error of the server
                with lock:
                    phase.errors.append(f"{type(err).__name__}: {err}")
                continue
            finally:
                n += 1
            if not stop.is_set():  # a request still running at the end is not counted
                with lock:
                    phase.results.append(result)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    start = time.perf_counter()
    phase.rss_mb.append(server.rss_mb())
    cpu = server.cpu_s()
    for t in threads:
        t.start()
    while (elapsed := time.perf_counter() - start) < seconds:
        time.sleep(min(0.5, seconds - elapsed))
        phase.rss_mb.append(server.rss_mb())
    stop.set()
    phase.seconds = time.perf_counter() - start
    phase.cpu_s, phase.load = server.cpu_s() - cpu, os.getloadavg()[0]
    for t in threads:
        t.join(180)
    return phase


def tokenizer_counter(model: str) -> Callable[[str], int]:
    """Counts the tokens of a text with the served model's tokenizer (from its ONNX export)."""
    from llm.api_server import resolve_export
    from llm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_export(model) / "tokenizer")
    return lambda text: len(tokenizer.encode(text))


def print_table(rows: list[dict]) -> None:
    header = (f"{'server':<20} {'clients':>7} {'tokens/s':>9} {'p50 s':>7} {'p99 s':>7} {'ttft p50':>9} "
              f"{'ttft p99':>9} {'requests':>8} {'errors':>6} {'cpu/tok':>7} {'load':>5}  rss MB start/peak/end")
    print(header)
    print("-" * len(header))
    for r in rows:
        rss = "/".join(str(v) for v in r["rss_mb"])
        print(f"{r['server']:<20} {r['clients']:>7} {r['tokens_per_s']:>9.0f} {r['p50_s']:>7.2f} {r['p99_s']:>7.2f} "
              f"{r['ttft_p50_s']:>9.3f} {r['ttft_p99_s']:>9.3f} {r['requests']:>8} {r['errors']:>6} "
              f"{r['cpu_us_per_token']:>7.0f} {r['load_avg']:>5.2f}  {rss}")


def engine_pids(server: Server) -> list[int]:
    """The engine processes of ``llm serve`` (its children started by multiprocessing's spawn)."""
    try:
        children = psutil.Process(server.process.pid).children(recursive=True)
        return [c.pid for c in children if "spawn_main" in " ".join(c.cmdline()) and c.status() != "zombie"]
    except psutil.Error:
        return []


def chaos_client(port: int, model: str, stop: threading.Event, outcomes: list, max_tokens: int) -> None:
    """Streamed chats until ``stop``; each outcome ("ok" or the error's first words, when it was sent, when it
    ended, by time.monotonic())."""
    seed = 0
    while not stop.is_set():
        seed += 1
        sent = time.monotonic()
        try:
            llm_chat(port, model, QUESTIONS[seed % len(QUESTIONS)], seed, max_tokens)
            outcomes.append(("ok", sent, time.monotonic()))
        except Exception as err:  # noqa: BLE001 - counted by kind
            outcomes.append((" ".join(str(err).split()[:4]), sent, time.monotonic()))
            stop.wait(0.1)


def run_chaos(args: argparse.Namespace, logs: Path) -> bool:
    """8 streaming clients while the engine is killed (SIGKILL) three times and stopped (SIGSTOP) once: prints
    the first success after each fault, the outcomes by kind, the server's memory and what is left behind;
    True when the server stayed up, every fault was followed by a success within 5 s and nothing was left."""
    port = free_port()
    server = Server("llm serve", [str(BIN / "llm"), "serve", "--model", args.model, "--port", str(port)], port,
                    "/health", logs / "llm-serve-chaos.log")
    stop, outcomes, seen, recovery = threading.Event(), [], set(), []
    try:
        server.wait_ready()
        model = json.loads(request(port, "GET", "/v1/models", None)[1])["data"][0]["id"]
        clients = [threading.Thread(target=chaos_client, args=(port, model, stop, outcomes, args.max_tokens))
                   for _ in range(8)]
        for client in clients:
            client.start()
        time.sleep(3)
        rss = [server.rss_mb()]
        for fault in (signal.SIGKILL, signal.SIGKILL, signal.SIGSTOP, signal.SIGKILL):
            (engine,) = engine_pids(server)
            seen.add(engine)
            os.kill(engine, fault)
            struck = time.monotonic()
            while time.monotonic() - struck < 30 and not any(o == "ok" and t > struck for o, t, _ in outcomes):
                time.sleep(0.05)
            after = [end - struck for o, sent, end in outcomes if o == "ok" and sent > struck]
            recovery.append(min(after) if after else float("inf"))
            print(f"{fault.name}: first success (a request sent after it) {recovery[-1]:.2f} s after it", flush=True)
            time.sleep(2)
            seen.update(engine_pids(server))
        rss.append(server.rss_mb())
        stop.set()
        for client in clients:
            client.join(60)
        up = server.process.poll() is None
    finally:
        stop.set()
        server.stop()
    left = [pid for pid in seen if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    kinds = collections.Counter(o for o, _, _ in outcomes)
    print(f"server up throughout: {up}; outcomes: {dict(kinds)}; rss {rss[0]:.0f} -> {rss[-1]:.0f} MB (with its "
          f"engine); engine processes left behind: {left}")
    return up and max(recovery) < 5 and not left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--model", default="models:/gpt/Production", help="what both servers serve")
    parser.add_argument("--clients", default="1,4,8", help="numbers of concurrent clients, comma separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--long-seconds", type=float, default=120.0, help="the 8-client run of llm serve; 0 skips")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--engines", default="1,2",
                        help="llm serve's --engines (engine processes), comma separated: one server each, in turn")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads of llm serve")
    parser.add_argument("--stream-interval", type=float, default=None,
                        help="llm serve's --stream-interval (seconds between a stream's chunks; default: its own)")
    parser.add_argument("--skip-mlflow", action="store_true", help="benchmark llm serve only")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--chaos", action="store_true", help="instead: kill and stop llm serve's engine under "
                        "8 streaming clients, and report how the server fared (exit 1 when it did not)")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    logs = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    if args.chaos:
        sys.exit(0 if run_chaos(args, logs) else 1)
    rows = []
    print(f"{os.cpu_count()} CPUs, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} (1, 5, 15 min) "
          "before the first phase", flush=True)

    engines = [int(n) for n in args.engines.split(",")]
    for n_engines in engines:
        name = "llm serve" + (f" --engines {n_engines}" if n_engines > 1 else "")
        port = free_port()
        serve = [str(BIN / "llm"), "serve", "--model", args.model, "--port", str(port), "--max-batch", "8",
                 "--engines", str(n_engines)]
        serve += ["--threads", str(args.threads)] if args.threads else []
        serve += ["--stream-interval", str(args.stream_interval)] if args.stream_interval is not None else []
        server = Server(name, serve, port, "/health", logs / f"llm-serve-{n_engines}.log")
        try:
            server.wait_ready()
            model = json.loads(request(port, "GET", "/v1/models", None)[1])["data"][0]["id"]
            def llm_send(question: str, seed: int, port: int = port, model: str = model) -> Result:
                return llm_chat(port, model, question, seed, args.max_tokens)

            run_phase(server, 1, 3, llm_send)  # warm up
            rows += [run_phase(server, n, args.seconds, llm_send).row() for n in clients]
            if args.long_seconds and n_engines == engines[-1]:
                long_row = run_phase(server, 8, args.long_seconds, llm_send).row()
                rows.append({**long_row, "server": f"{name} (long)"})
        finally:
            server.stop()

    if not args.skip_mlflow:
        count = tokenizer_counter(args.model)
        port = free_port()
        mlflow = [str(BIN / "mlflow"), "models", "serve", "-m", args.model, "--env-manager", "local",
                  "-h", "127.0.0.1", "-p", str(port)]
        server = Server("mlflow models serve", mlflow, port, "/ping", logs / "mlflow-serve.log")
        try:
            server.wait_ready()
            mlflow_send = lambda question, seed: mlflow_chat(port, question, seed, args.max_tokens, count)  # noqa: E731
            run_phase(server, 1, 3, mlflow_send)
            rows += [run_phase(server, n, args.seconds, mlflow_send).row() for n in clients]
        finally:
            server.stop()

    print_table(rows)
    by = {(r["server"], r["clients"]): r["tokens_per_s"] for r in rows}
    top = max(clients)
    print()
    for name in dict.fromkeys(r["server"] for r in rows if r["server"].startswith("llm serve")):
        if by.get((name, 1)) and (name, top) in by:
            print(f"{name}, {top} clients / 1 client: {by[name, top] / by[name, 1]:.1f}x")
        if (name, top) in by and by.get(("mlflow models serve", top)):
            print(f"{name} / mlflow models serve, {top} clients: {by[name, top] / by['mlflow models serve', top]:.1f}x")
    print(f"server logs: {logs}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
