"""Prometheus metrics (`/metrics`), all named `turbollm_*`.

Engine gauges and counters are read from the snapshot the engine thread publishes after each
step (no bookkeeping twice); latency histograms are observed when a request finishes; HTTP
requests are counted by route template and status in an ASGI middleware.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from turbollm.engine.async_engine import AsyncLLMEngine, EngineState
from turbollm.engine.outputs import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                    80.0, 160.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5,
                 1.0, 2.5)


class _EngineCollector:
    """Gauges and counters from the engine's latest snapshot, read at scrape time."""

    def __init__(self, engine: AsyncLLMEngine):
        self.engine = engine

    def collect(self):
        s = self.engine.snapshot
        yield GaugeMetricFamily("turbollm_num_requests_running",
                                "Sequences in the running batch", value=s.num_running)
        yield GaugeMetricFamily("turbollm_num_requests_waiting",
                                "Sequences waiting for a batch slot", value=s.num_waiting)
        yield GaugeMetricFamily("turbollm_num_requests_queued",
                                "Requests admitted by the server and not yet scheduled",
                                value=self.engine.num_queued)
        yield GaugeMetricFamily("turbollm_kv_cache_usage_ratio",
                                "Fraction of KV-cache blocks held by running sequences",
                                value=s.kv_usage)
        spec_rate = s.spec_accepted_tokens / s.spec_draft_tokens if s.spec_draft_tokens else 0.0
        yield GaugeMetricFamily("turbollm_spec_decode_acceptance_rate",
                                "Accepted / proposed speculative tokens since start",
                                value=spec_rate)
        rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        yield GaugeMetricFamily("turbollm_prefix_cache_hit_rate",
                                "Prompt tokens found in the prefix cache / looked up",
                                value=rate)
        for name, doc, value in (
                ("turbollm_prompt_tokens", "Prompt tokens admitted", s.prompt_tokens),
                ("turbollm_generation_tokens", "Tokens generated", s.generation_tokens),
                ("turbollm_preemptions", "Sequences preempted (KV dropped, recomputed)",
                 s.num_preemptions),
                ("turbollm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                 s.prefix_cache_queries),
                ("turbollm_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                 s.prefix_cache_hits),
                ("turbollm_engine_steps", "Engine steps run", s.steps),
                ("turbollm_engine_step_errors", "Engine steps that failed", s.step_errors),
                ("turbollm_spec_decode_steps", "Speculative verification steps (per sequence)",
                 s.spec_steps),
                ("turbollm_spec_decode_draft_tokens", "Tokens proposed by speculative decoding",
                 s.spec_draft_tokens),
                ("turbollm_spec_decode_accepted_tokens",
                 "Proposed tokens the target model accepted", s.spec_accepted_tokens),
                ("turbollm_tp_comm_seconds", "Seconds in tensor-parallel all-reduce/gather "
                 "(slowest rank per step, waits for other ranks included)", s.tp_comm_seconds),
                ("turbollm_pp_wait_seconds", "Seconds pipeline stages waited for the previous "
                 "stage's hidden states (slowest rank per step)", s.pp_wait_seconds)):
            yield CounterMetricFamily(name, doc, value=value)
        state = GaugeMetricFamily("turbollm_engine_state", "1 for the engine's current state",
                                  labels=["state"])
        for st in EngineState:
            state.add_metric([st.value], 1.0 if self.engine.state == st else 0.0)
        yield state
        llm = self.engine.engine  # None until the engine is built
        if llm is not None:
            yield InfoMetricFamily("turbollm_system", "What runs here: CPU, flags, C kernel "
                                   "variant, dtypes, threads", value=llm.system)


class ServerMetrics:
    """The server's Prometheus registry (one per app, so tests can build several)."""

    def __init__(self, engine: AsyncLLMEngine):
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "turbollm_http_requests", "HTTP requests by route and status code",
            ["route", "status"], registry=self.registry)
        self.finished = Counter(
            "turbollm_requests_finished", "Engine requests finished, by finish reason",
            ["finish_reason"], registry=self.registry)
        self.lora_finished = Counter(
            "turbollm_lora_requests_finished", "Engine requests finished, by LoRA adapter",
            ["adapter"], registry=self.registry)
        self.ttft = Histogram(
            "turbollm_time_to_first_token_seconds", "Arrival to first generated token",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram(
            "turbollm_time_per_output_token_seconds",
            "Mean time between output tokens after the first", buckets=_TPOT_BUCKETS,
            registry=self.registry)
        self.e2e = Histogram(
            "turbollm_e2e_request_latency_seconds", "Arrival to last token",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine))
        engine.finished_listeners.append(self.observe_finished)

    def observe_finished(self, out: RequestOutput) -> None:
        """Record latencies of a finished engine request."""
        m = out.metrics
        reasons = {o.finish_reason or "unknown" for o in out.outputs} or {"unknown"}
        for r in reasons:
            self.finished.labels(r).inc()
        if out.lora_request is not None:
            self.lora_finished.labels(out.lora_request.lora_name).inc()
        if m.first_token_time is not None:
            self.ttft.observe(max(m.first_token_time - m.arrival_time, 0.0))
        if m.finished_time is not None:
            self.e2e.observe(max(m.finished_time - m.arrival_time, 0.0))
            n = max((len(o.token_ids) for o in out.outputs), default=0)
            if m.first_token_time is not None and n > 1:
                self.tpot.observe(max(m.finished_time - m.first_token_time, 0.0) / (n - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HTTPMetricsMiddleware:
    """Counts responses by the route template the router matched (bounded label values)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.http_requests.labels(path, str(status[0])).inc()
