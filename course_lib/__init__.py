"""Inference Lab's reference library: one module per concept, in course order.

env (00) -> models (00) -> generation (01) -> transformer (02) -> measure, cost, stream_view (03)
-> kv_cache (04) -> ...  A module imports only from modules earlier in the course.
"""

__version__ = "0.1.0"
