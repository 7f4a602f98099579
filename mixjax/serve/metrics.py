"""Server metrics in the Prometheus text exposition format (written by hand: no client library needed)."""

from __future__ import annotations

import bisect
import gc
import threading
import time


class Histogram:
    def __init__(self, name: str, help: str, buckets):
        self.name, self.help = name, help
        self.buckets = sorted(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, v: float, n: int = 1):
        """n observations of the value v."""
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, v)] += n
            self.sum += v * n
            self.count += n

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            acc = 0
            for b, c in zip(self.buckets, self.counts):
                acc += c
                out.append(f'{self.name}_bucket{{le="{b:g}"}} {acc}')
            out.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
            out.append(f"{self.name}_sum {self.sum:.6f}")
            out.append(f"{self.name}_count {self.count}")
        return out


_LAT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
_GC = (0.0001, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self):
        self.ttft = Histogram("mixjax_time_to_first_token_seconds",
                              "Time from request arrival to its first generated token.", _LAT)
        self.itl = Histogram("mixjax_inter_token_latency_seconds", "Time between two tokens of one request.", _LAT)
        # Python's garbage collections stop every thread of the process, the engine's included (`watch_gc`)
        self.gc_pause = Histogram("mixjax_gc_pause_seconds",
                                  "Python garbage collections in the serving process, by duration.", _GC)
        self._gc_start = None
        self.queue_length = 0
        self.running = 0
        self.slots_total = 0
        self.kv_used = 0
        self.kv_capacity = 1
        self.generation_tokens = 0
        self.prompt_tokens = 0
        self.requests_rejected = 0
        self.requests_failed = 0
        self.prefill_deferrals = 0  # times --max-prefill-tokens held prefill work back for a single decode step
        self.finished: dict[str, int] = {}
        self.healthy = 1  # 0 once the engine cannot run any more (e.g. a process of a multi-host cluster died)
        self.processes = 1  # processes (hosts) that run the model
        self.plan_channel = None  # process 0 of a cluster: the PlanChannel that sends step plans

    def watch_gc(self):
        """Time every garbage collection of this process into gc_pause (gc.callbacks; `unwatch_gc` ends it)."""
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def unwatch_gc(self):
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase, _info):
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self._gc_start is not None:
            self.gc_pause.observe(time.perf_counter() - self._gc_start)
            self._gc_start = None

    def render(self) -> str:
        def metric(name, kind, help, value, labels=""):
            return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name}{labels} {value}"]

        lines = []
        lines += metric("mixjax_engine_healthy", "gauge", "1 while the engine runs, 0 after a fatal failure.",
                        self.healthy)
        lines += metric("mixjax_processes", "gauge", "Processes (hosts) that run the model.", self.processes)
        if self.plan_channel is not None:
            ch = self.plan_channel
            lines += metric("mixjax_step_plans_total", "counter", "Step plans sent to the other processes.", ch.n)
            lines += metric("mixjax_step_plan_seconds_total", "counter",
                            "Time process 0 spent sending step plans.", f"{ch.send_seconds:.6f}")
            lines += metric("mixjax_step_plan_bytes_total", "counter", "Bytes of step plans sent.", ch.bytes_sent)
        lines += metric("mixjax_queue_length", "gauge", "Requests waiting for a slot.", self.queue_length)
        lines += metric("mixjax_running_slots", "gauge",
                        "Slots held by requests: generating, or prefilling a long prompt in chunks.", self.running)
        lines += metric("mixjax_prefill_deferrals_total", "counter",
                        "Decode calls cut to one step because the prefill budget held prompts or chunks back.",
                        self.prefill_deferrals)
        lines += metric("mixjax_slots_total", "gauge", "Decode slots (maximum batch).", self.slots_total)
        lines += metric("mixjax_kv_cache_usage_ratio", "gauge",
                        "Fraction of KV-cache positions held by running requests.",
                        f"{self.kv_used / max(self.kv_capacity, 1):.6f}")
        lines += metric("mixjax_kv_cache_used_tokens", "gauge", "KV-cache positions held by running requests.",
                        self.kv_used)
        lines += metric("mixjax_generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens)
        lines += metric("mixjax_prompt_tokens_total", "counter", "Prompt tokens prefilled.", self.prompt_tokens)
        lines += metric("mixjax_requests_rejected_total", "counter", "Requests rejected (queue full).",
                        self.requests_rejected)
        lines += metric("mixjax_requests_failed_total", "counter", "Requests that failed in the engine.",
                        self.requests_failed)
        lines += ["# HELP mixjax_requests_finished_total Requests finished, by reason.",
                  "# TYPE mixjax_requests_finished_total counter"]
        for k, v in sorted(self.finished.items()):
            lines.append(f'mixjax_requests_finished_total{{reason="{k}"}} {v}')
        lines += self.ttft.render() + self.itl.render() + self.gc_pause.render()
        return "\n".join(lines) + "\n"
