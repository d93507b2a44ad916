"""Inference Lab's reference library: one module per concept, in course order.

env, models, doctor (00) -> generation (01) -> transformer (02) -> measure, roofline, cost,
stream_view, bench (03) -> kv_cache, kv_bench (04) -> quant, quality, quant_bench (05) -> batching,
paged_kv, scheduler, workload, batch_bench (06) -> draft, speculative, spec_bench (07).
The `*_bench` modules register their suites with `course_lib.bench` (`python -m course_lib bench`).
A module imports only from modules earlier in the course.
"""

__version__ = "0.1.0"
