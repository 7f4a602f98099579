"""Multi-host serving on jax.distributed: several processes of 4 CPU devices each on this machine (gloo collectives)
form one 2x4 mesh (node = process). The servers under test are real `python -m mixjax.serve` subprocesses."""

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import free_port, stream_across_sigterm
from mixjax import distributed as dist

ROOT = Path(__file__).resolve().parents[1]
MAX_SEQ = 128
SERVE_ARGS = ["--mesh", "2x4", "--strategy", "hybrid_fused", "--max-batch", "4", "--max-seq-len", str(MAX_SEQ),
              "--prefill-buckets", "16,64"]
PROMPTS = ["Once upon a time", "Max counted: one, two,", "The rabbit", "Hello"]

pytestmark = pytest.mark.timeout(300)


class Proc:
    """A subprocess whose output is collected line by line (so that tests can wait for a line)."""

    def __init__(self, args, env_extra=None, devices=4):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT),
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        for k in [k for k in env if k.startswith(("MIXJAX_", "SLURM_", "OMPI_"))]:
            del env[k]
        env.update(env_extra or {})
        argv = list(args) if args[0] in ("bash", sys.executable) else [sys.executable, *args]
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=argv[0] == "bash")
        self.lines: list[str] = []
        self.t_exit: float | None = None
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        self.proc.wait()
        with self._cond:
            self.t_exit = time.monotonic()
            self._cond.notify_all()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(needle in line for line in self.lines):
                if self.t_exit is not None or time.monotonic() > deadline:
                    return False
                self._cond.wait(0.2)
        return True

    def wait(self, timeout: float) -> int | None:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        with self._cond:  # the reader has seen the end of the output
            while self.t_exit is None:
                self._cond.wait(0.1)
        return rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


class Cluster:
    """N `python -m mixjax.serve` processes; process 0 serves HTTP."""

    def __init__(self, n=2, extra=(), per_process=None):
        self.port, coord = free_port(), f"127.0.0.1:{free_port()}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs = []
        for i in range(n):
            args = ["-m", "mixjax.serve", *SERVE_ARGS, "--port", str(self.port), "--coordinator", coord,
                    "--num-processes", str(n), "--process-id", str(i), "--init-timeout", "120", *extra]
            self.procs.append(Proc(args + list((per_process or {}).get(i, ()))))

    def wait_ready(self, timeout=240):
        t0 = time.monotonic()
        ok = self.procs[0].wait_for("mixjax ready on", timeout) and all(
            p.wait_for("following process 0", max(1.0, timeout - (time.monotonic() - t0))) for p in self.procs[1:])
        if not ok:
            self.kill()
            raise RuntimeError("cluster did not start:\n" + "\n".join(f"--- process {i}\n{p.text[-3000:]}"
                                                                     for i, p in enumerate(self.procs)))
        return time.monotonic() - t0

    def kill(self):
        for p in self.procs:
            p.kill()


@pytest.fixture(scope="module")
def reference():
    """The single-process run of the same layout: mixjax.LLM on a 2x4 mesh of this process's 8 CPU devices."""
    import jax

    import mixjax

    assert len(jax.devices()) >= 8, "run the tests with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    return mixjax.LLM(None, mesh="2x4", strategy="hybrid_fused", progress=False)


def _greedy(llm, prompt, n):
    ids = llm.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    return llm.generate([ids], max_new_tokens=n, temperature=0.0)[0]


def _bytes_per_node(llm) -> list[int]:
    """For each mesh row (= process on several hosts): bytes of the distinct weight blocks its devices hold."""
    import jax

    from mixjax.checkpoint import is_param

    sm = llm.model
    leaves = jax.tree.leaves(sm.abstract_state, is_leaf=is_param)
    shardings = jax.tree.leaves(sm.param_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    out = []
    for row in sm.mesh.devices:
        total = 0
        for var, sh in zip(leaves, shardings):
            idx = sh.devices_indices_map(tuple(var.shape))
            blocks = {tuple((s.start, s.stop) for s in idx[d]) for d in row}
            item = np.dtype(var.get_value().dtype).itemsize
            total += sum(math.prod((b or n) - (a or 0) for (a, b), n in zip(bl, var.shape)) * item
                         for bl in blocks)
        out.append(total)
    return out


# --- 2 processes x 4 CPU devices serve the same greedy tokens as one process ----------------------------------
def test_two_processes_serve_same_greedy_tokens(reference):
    """Started by the documented example script (examples/multihost_local.sh)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    script = Proc(["bash", "examples/multihost_local.sh", *SERVE_ARGS[2:], "--failure-timeout", "15",
                   "--init-timeout", "120"],
                  {"N": "2", "DEVICES": "4", "PORT": str(port), "COORDINATOR": f"127.0.0.1:{free_port()}",
                   "PY": sys.executable})
    try:
        t0 = time.monotonic()
        assert script.wait_for("mixjax ready on", 240) and script.wait_for("process 1 of 2 ready", 60), \
            script.text[-3000:]
        print(f"2-process cluster start-up (join, load, warm-up): {time.monotonic() - t0:.1f}s")
        h = httpx.get(url + "/health", timeout=10)
        assert h.status_code == 200 and h.json()["status"] == "ok"
        n = 16
        want = [_greedy(reference, p, n) for p in PROMPTS]

        async def go():  # four requests at once: batched together in the decode steps
            async with httpx.AsyncClient(timeout=120) as cl:
                rs = await asyncio.gather(*[cl.post(url + "/v1/completions", json={
                    "prompt": p, "max_tokens": n, "temperature": 0}) for p in PROMPTS])
                return [r.json()["choices"][0]["token_ids"] for r in rs]

        t0 = time.monotonic()
        assert asyncio.run(go()) == want
        print(f"4 concurrent greedy requests x {n} tokens: {time.monotonic() - t0:.2f}s")
        ids = [(7 * i + 3) % 500 + 4 for i in range(100)]  # 100 tokens > largest bucket (64): chunked prefill
        r = httpx.post(url + "/v1/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0},
                       timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == _greedy(reference, ids, 8)
        # a sampled request with top-p and logprobs: both processes run the first token's full sampling program
        r = httpx.post(url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0.8,
                                                       "top_p": 0.9, "seed": 3, "logprobs": 2, "ignore_eos": True},
                       timeout=120)
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        # (top_logprobs are keyed by the token's text: two alternatives with the same text make one entry)
        assert len(lp["token_logprobs"]) == 4 and all(1 <= len(top) <= 2 for top in lp["top_logprobs"])
        metrics = httpx.get(url + "/metrics", timeout=10).text
        assert "mixjax_processes 2" in metrics and "mixjax_engine_healthy 1" in metrics
        plans = {l.split()[0]: float(l.split()[1]) for l in metrics.splitlines()
                 if l.startswith("mixjax_step_plan")}
        print(f"step plans: {plans['mixjax_step_plans_total']:.0f}, "
              f"{1e3 * plans['mixjax_step_plan_seconds_total'] / plans['mixjax_step_plans_total']:.2f} ms each")

        # each process read only the weight blocks of its own devices
        model_bytes = reference.model.load_stats["model_bytes"]
        assert reference.model.load_stats["bytes_read"] == model_bytes  # one process holds everything
        expect = _bytes_per_node(reference)
        for i in range(2):
            line = next(l for l in script.lines if f"mixjax process {i} read " in l)
            got = int(line.split(" read ")[1].split()[0])
            assert got == expect[i] < model_bytes, line
        print(f"weights read per process: {expect} bytes of {model_bytes}")

        # SIGTERM (to the script, which passes it to process 0) while a stream is in flight: the stream finishes,
        # every process exits 0
        body = {"prompt": "Last one", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
        chunks = stream_across_sigterm(url, body, lambda: script.proc.send_signal(signal.SIGTERM))
        assert sum(len(ch.get("token_ids", [])) for ch in chunks) == 30
        assert script.wait(60) == 0, script.text[-3000:]
        assert "mixjax stopped" in script.text and "mixjax process 1 stopped" in script.text
    finally:
        if script.proc.poll() is None:
            os.killpg(os.getpgid(script.proc.pid), signal.SIGKILL)


# --- multi-step decode on 2 processes: K travels in the step plan -------------------------------------------------
def test_two_processes_multi_step_decode(reference):
    """`--decode-steps 4` on every process: the followers run the same 4-step programs from process 0's plans, and
    the tokens are those of one process (18 tokens: the last call of 4 overshoots and its extra tokens are dropped).
    With a prefill budget of one largest bucket (64), a 100-token prompt that arrives while a request decodes goes
    in one chunk per decode call: the followers prefill each chunk from its own plan, and both requests' tokens are
    still those of one process."""
    c = Cluster(2, extra=["--decode-steps", "4", "--max-prefill-tokens", "64"])
    try:
        c.wait_ready()
        n = 18
        want = [_greedy(reference, p, n) for p in PROMPTS]

        async def go():
            async with httpx.AsyncClient(timeout=120) as cl:
                rs = await asyncio.gather(*[cl.post(c.url + "/v1/completions", json={
                    "prompt": p, "max_tokens": n, "temperature": 0}) for p in PROMPTS])
                return [r.json()["choices"][0]["token_ids"] for r in rs]

        assert asyncio.run(go()) == want

        long_ids = [(7 * i + 3) % 500 + 4 for i in range(100)]  # two chunks of 64: over the budget

        async def long_while_decoding():
            async with httpx.AsyncClient(timeout=120) as cl:
                async with cl.stream("POST", c.url + "/v1/completions", json={
                        "prompt": PROMPTS[0], "max_tokens": 64, "temperature": 0, "stream": True}) as s:
                    lines = s.aiter_lines()
                    first = await anext(lines)  # decoding: now the long prompt arrives
                    long = asyncio.create_task(cl.post(c.url + "/v1/completions", json={
                        "prompt": long_ids, "max_tokens": 8, "temperature": 0}))
                    rest = [first] + [line async for line in lines]
                streamed = [t for line in rest if line.startswith("data: {")
                            for t in json.loads(line[6:])["choices"][0].get("token_ids") or []]
                return streamed, (await long).json()["choices"][0]["token_ids"]

        streamed, got_long = asyncio.run(long_while_decoding())
        assert streamed == _greedy(reference, PROMPTS[0], 64)
        assert got_long == _greedy(reference, long_ids, 8)
        metrics = httpx.get(c.url + "/metrics", timeout=10).text
        deferrals = float(next(l.split()[1] for l in metrics.splitlines()
                               if l.startswith("mixjax_prefill_deferrals_total")))
        assert deferrals >= 1, metrics  # the long prompt's chunks were spread over decode calls
        c.procs[0].proc.send_signal(signal.SIGTERM)
        assert [p.wait(60) for p in c.procs] == [0, 0], c.procs[1].text[-2000:]
    finally:
        c.kill()


# --- a killed process stops the others within the bound ---------------------------------------------------------
FAILURE_TIMEOUT = 4.0
BOUND = dist.failure_bound(FAILURE_TIMEOUT)  # process 0; documented in docs/MULTIHOST.md
SLACK = 4.0  # this machine has 2 shared cores


def test_killed_process_stops_the_others_within_bound():
    c = Cluster(2, extra=["--failure-timeout", str(FAILURE_TIMEOUT)])
    try:
        c.wait_ready()
        events: list = []

        def stream():
            body = {"prompt": "Once upon", "max_tokens": 110, "temperature": 0, "stream": True, "ignore_eos": True}
            try:
                with httpx.stream("POST", c.url + "/v1/completions", json=body, timeout=60) as r:
                    for line in r.iter_lines():
                        if line.startswith("data:"):
                            events.append(line[5:].strip())
            except httpx.HTTPError as e:
                events.append(f"transport error: {e}")

        th = threading.Thread(target=stream, daemon=True)
        th.start()
        while not events and th.is_alive():
            time.sleep(0.05)
        c.procs[1].proc.kill()  # SIGKILL mid-stream: no goodbye to anyone
        t_kill = time.monotonic()
        health = []
        while c.procs[0].proc.poll() is None and time.monotonic() - t_kill < BOUND + SLACK + 10:
            try:
                r = httpx.get(c.url + "/health", timeout=0.5)
                health.append((r.status_code, r.json()))
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        rc = c.procs[0].wait(30)
        took = c.procs[0].t_exit - t_kill
        print(f"process 0 exited {took:.1f}s after process 1 was killed (bound {BOUND:.1f}s + slack)")
        out = c.procs[0].text
        assert rc == dist.EXIT_CLUSTER_FAILURE, out[-3000:]
        assert took <= BOUND + SLACK, out[-3000:]
        assert "multi-host failure on process 0" in out and "process 1 of 2 sent no heartbeat" in out, out[-3000:]
        unhealthy = [b for code, b in health if code == 503]
        assert unhealthy and unhealthy[-1]["status"] == "unhealthy", health[-5:]
        assert "engine unhealthy" in unhealthy[-1]["error"]
        th.join(10)
        assert events and events[-1] == "[DONE]" and any("engine unhealthy" in e for e in events), events[-3:]
    finally:
        c.kill()


_JOIN_AND_WAIT = ("import time; from mixjax import distributed as d; c = d.initialize(d.resolve_spec()); "
                  "print('joined', c.process_id, flush=True); time.sleep(120)")


def test_watchdog_names_the_dead_process_while_idle():
    """No model: 3 processes join and only heartbeat. SIGKILL process 2: 0 and 1 exit with the error within the
    bound. Separately, SIGKILL process 0 of a 2-process cluster: process 1 stops too."""
    t = "3"
    bound = dist.failure_bound(float(t))  # process 0's; the others exit sooner
    coord = f"127.0.0.1:{free_port()}"
    three = [Proc(["-c", _JOIN_AND_WAIT], {"MIXJAX_COORDINATOR": coord, "MIXJAX_NUM_PROCESSES": "3",
                                            "MIXJAX_PROCESS_ID": str(i), "MIXJAX_FAILURE_TIMEOUT": t}, devices=1)
             for i in range(3)]
    coord2 = f"127.0.0.1:{free_port()}"
    two = [Proc(["-c", _JOIN_AND_WAIT], {"MIXJAX_COORDINATOR": coord2, "MIXJAX_NUM_PROCESSES": "2",
                                          "MIXJAX_PROCESS_ID": str(i), "MIXJAX_FAILURE_TIMEOUT": t}, devices=1)
           for i in range(2)]
    try:
        assert all(p.wait_for("joined", 120) for p in three + two), [p.text[-1500:] for p in three + two]
        time.sleep(1.0)
        three[2].proc.kill()
        two[0].proc.kill()
        t_kill = time.monotonic()
        for i, p in enumerate(three[:2]):
            assert p.wait(bound + 20) == dist.EXIT_CLUSTER_FAILURE, p.text[-2000:]
            assert p.t_exit - t_kill <= dist.failure_bound(float(t), leader=i == 0) + SLACK, \
                (p.t_exit - t_kill, p.text[-2000:])
            assert "process 2 of 3 sent no heartbeat" in p.text, p.text[-2000:]
        assert three[1].t_exit < three[0].t_exit  # process 0 (the coordination service) leaves last
        # process 0 ran the coordination service: JAX itself ends process 1 at once, or the watchdog does
        rc = two[1].wait(bound + 20)
        assert rc is not None and rc != 0 and two[1].t_exit - t_kill <= bound + SLACK, two[1].text[-2000:]
        print(f"idle failure: processes 1 and 0 of 3 stopped {three[1].t_exit - t_kill:.1f}s and "
              f"{three[0].t_exit - t_kill:.1f}s after the kill of process 2 (bounds "
              f"{dist.failure_bound(float(t), False):.1f}s, {bound:.1f}s); follower of a killed process 0 stopped after "
              f"{two[1].t_exit - t_kill:.1f}s with status {rc}")
    finally:
        for p in three + two:
            p.kill()


# --- bad settings fail clearly -----------------------------------------------------------------------------------
def test_bad_settings_fail_clearly():
    serve = ["-m", "mixjax.serve"]
    bad_id = Proc(serve + ["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"])
    partial = Proc(serve + ["--num-processes", "2"])
    unreachable = Proc(serve + ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2",
                                "--process-id", "1", "--init-timeout", "3"])
    assert bad_id.wait(60) == 2 and "--process-id 2 is out of range" in bad_id.text, bad_id.text
    assert partial.wait(60) == 2 and "missing: --coordinator" in partial.text, partial.text
    assert unreachable.wait(60) == dist.EXIT_CLUSTER_FAILURE, unreachable.text
    assert "cannot reach the coordinator" in unreachable.text, unreachable.text
    # a mesh whose node count is not the process count; then processes started with different options
    c = Cluster(2, extra=["--mesh", "1x8"])
    d = Cluster(2, per_process={1: ["--max-batch", "8"]})
    try:
        for p in c.procs:
            assert p.wait(120) not in (0, None), p.text[-2000:]
        assert "does not fit 2 processes" in c.procs[0].text, c.procs[0].text[-2000:]
        for p in d.procs:
            assert p.wait(120) not in (0, None), p.text[-2000:]
        assert "different serving settings" in d.procs[0].text and "max_batch" in d.procs[0].text, \
            d.procs[0].text[-2000:]
    finally:
        c.kill()
        d.kill()


# --- mixjax.LLM on two processes (the example script, configured through the environment) -----------------------
def test_llm_two_processes_example(reference):
    coord = f"127.0.0.1:{free_port()}"
    procs = [Proc(["examples/multihost_generate.py", PROMPTS[0], "16"],
                  {"MIXJAX_COORDINATOR": coord, "MIXJAX_NUM_PROCESSES": "2", "MIXJAX_PROCESS_ID": str(i)})
             for i in range(2)]
    try:
        rcs = [p.wait(240) for p in procs]
        assert rcs == [0, 0], [p.text[-2000:] for p in procs]
        out = json.loads(next(l for l in procs[0].lines if l.startswith("{")))
        assert out["processes"] == 2 and out["mesh"] == {"node": 2, "gpu": 4}
        assert out["token_ids"] == _greedy(reference, PROMPTS[0], 16)
    finally:
        for p in procs:
            p.kill()


# --- settings and the plan format (no processes) -----------------------------------------------------------------
def test_resolve_spec_from_flags_env_and_launchers():
    assert dist.resolve_spec(environ={}) is None
    s = dist.resolve_spec(environ={"MIXJAX_COORDINATOR": "h:1234", "MIXJAX_NUM_PROCESSES": "4",
                                   "MIXJAX_PROCESS_ID": "3", "MIXJAX_FAILURE_TIMEOUT": "7"})
    assert (s.coordinator, s.num_processes, s.process_id, s.failure_timeout) == ("h:1234", 4, 3, 7.0)
    s = dist.resolve_spec("a:1", 2, 1, environ={"MIXJAX_COORDINATOR": "b:2", "MIXJAX_PROCESS_ID": "0"})
    assert (s.coordinator, s.process_id) == ("a:1", 1)  # flags win over the environment
    assert dist.resolve_spec("a:1", 1, 0, environ={}) is None  # one process: the single-process path
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
             "SLURM_LOCALID": "0"}
    s = dist.resolve_spec(environ=slurm)
    assert s.detected == "slurm" and s.coordinator is None and s.num_processes is None
    assert dist.resolve_spec(environ={**slurm, "SLURM_NTASKS": "1"}) is None
    assert dist.resolve_spec(environ={"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}).detected == "ompi"
    for kw, msg in [(dict(coordinator="nohost"), "HOST:PORT"), (dict(coordinator="h:1", num_processes=2),
                    "missing: --process-id"), (dict(coordinator="h:1", num_processes=2, process_id=5), "0..1"),
                    (dict(num_processes=0), "at least 1"), (dict(failure_timeout=-1), "positive")]:
        with pytest.raises(dist.DistributedError, match=msg):
            dist.resolve_spec(**kw, environ={})


def test_plan_round_trip():
    arrays = {"tokens": np.arange(5, dtype=np.int32), "seeds": np.array([1, 2**31], np.uint32),
              "temp": np.array([[0.5]], np.float32), "empty": np.zeros(0, np.int32)}
    kind, back = dist.decode_plan(dist.encode_plan("decode", arrays))
    assert kind == "decode" and set(back) == set(arrays)
    for k in arrays:
        assert back[k].dtype == arrays[k].dtype and np.array_equal(back[k], arrays[k])
    with pytest.raises(TypeError):
        dist.encode_plan("x", {"bad": np.zeros(2, np.float64)})
    with pytest.raises(dist.DistributedError):
        dist.decode_plan(b"pickle")


def test_launch_examples_are_consistent():
    """The SLURM and Kubernetes examples cannot run here: check that they parse and agree with themselves."""
    for script in ("examples/multihost_local.sh", "examples/slurm_multihost.sbatch"):
        assert subprocess.run(["bash", "-n", script], cwd=ROOT).returncode == 0, script
    sbatch = (ROOT / "examples/slurm_multihost.sbatch").read_text()
    assert "--ntasks-per-node=1" in sbatch and '--mesh "${SLURM_NNODES}x' in sbatch
    yaml = pytest.importorskip("yaml")
    docs = list(yaml.safe_load_all((ROOT / "examples/k8s_multihost_job.yaml").read_text()))
    svc = next(d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None")
    job = next(d for d in docs if d["kind"] == "Job")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    n = int(env["MIXJAX_NUM_PROCESSES"])
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == n
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert env["MIXJAX_COORDINATOR"] == f"{job['metadata']['name']}-0.{svc['metadata']['name']}:12355"
    assert "job-completion-index" in env["MIXJAX_PROCESS_ID"]["fieldRef"]["fieldPath"]
    mesh = c["args"][c["args"].index("--mesh") + 1]
    assert int(mesh.split("x")[0]) == n
    assert int(mesh.split("x")[1]) == c["resources"]["limits"]["nvidia.com/gpu"]
    dist.resolve_spec(environ={k: v for k, v in env.items() if isinstance(v, str)} | {"MIXJAX_PROCESS_ID": "1"})
