"""Inference Lab's reference library: one module per concept, in course order.

The course map (notebook -> the modules it builds; a module imports only from earlier ones):

    00 setup                    env, paths, models, doctor
    01 what inference is        generation
    02 transformer from scratch transformer
    03 measuring inference      measure, roofline, cost, stream_view
    04 KV cache                 kv_cache
    05 quantization             quant, quality
    06 batching                 batching, paged_kv, scheduler, workload, batch_engine
    07 speculative decoding     draft, speculative
    08 putting it together      engine, server, loadgen

Benchmarks live apart, in the `course_lib.bench` subpackage (`python -m course_lib bench`): the
harness in `bench/__init__.py` and one suite module per notebook (`bench.loop` 03, `bench.kv` 04,
`bench.quant` 05, `bench.batch` 06, `bench.spec` 07, `bench.engine` 08). Concept modules never
import from `bench`; bench modules import the concepts they measure. Data files (prompts, the
held-out text, the draft weights, reference results) are found by `course_lib.paths`.
"""

__version__ = "0.1.0"
