"""A live view of a token stream. Built in notebooks/03_measuring_inference.ipynb.

In a Jupyter kernel with ipywidgets (7 or 8: only widgets.HTML, widgets.VBox and .value are
used) the text grows in place under a live TTFT and tokens/s line; anywhere else the new text
is printed as it arrives. Either way the final text and metrics are printed at the end, so a
saved notebook shows them without a widget renderer.
"""

from __future__ import annotations

import html
import time
from typing import Any, Callable, Iterable

import torch

from course_lib.env import synchronize
from course_lib.measure import RequestMetrics


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def live_stats(start: float, times: list[float]) -> str:
    """One line of live figures: tokens so far, TTFT, and decode tokens/s once there are two tokens."""
    line = f"{len(times)} tokens | TTFT {(times[0] - start) * 1e3:.0f} ms"
    if len(times) > 1:
        line += f" | {(len(times) - 1) / (times[-1] - times[0]):.1f} tok/s after the first"
    return line


class _PrintView:
    """Fallback: print each new piece of text as it arrives."""

    def __init__(self, title: str):
        self.shown = ""
        if title:
            print(title)

    def update(self, text: str, stats: str) -> None:
        new = text[len(self.shown):] if text.startswith(self.shown) else "\n" + text
        print(new, end="", flush=True)
        self.shown = text

    def close(self) -> None:
        print()


class _WidgetView:
    """An HTML widget for the text under an HTML widget for the live figures."""

    def __init__(self, title: str):
        import ipywidgets as widgets
        from IPython.display import display

        self.stats = widgets.HTML(value=f"<b>{html.escape(title)}</b> waiting for the first token...")
        self.text = widgets.HTML(value="")
        self.title = title
        display(widgets.VBox([self.stats, self.text]))

    def update(self, text: str, stats: str) -> None:
        self.stats.value = f"<b>{html.escape(self.title)}</b> {html.escape(stats)}"
        self.text.value = f"<pre style='white-space: pre-wrap; margin: 0'>{html.escape(text)}</pre>"

    def close(self) -> None:
        pass


def show_stream(token_iterator_factory: Callable[[], Iterable[Any]], tokenizer,
                device: torch.device | str, title: str = "", widget: bool | None = None) -> RequestMetrics:
    """Display a token stream live (widget in Jupyter, print elsewhere) and return its RequestMetrics.

    Timing follows measure.time_stream: start clock before the factory is called, device
    synchronized before each token's clock read. Items may be token ids or (token_id, ...) tuples.
    """
    use_widget = _in_kernel() if widget is None else widget
    if use_widget:
        try:
            view: _PrintView | _WidgetView = _WidgetView(title)
        except ImportError:  # ipywidgets not installed
            view, use_widget = _PrintView(title), False
    else:
        view = _PrintView(title)
    tokens, times = [], []
    synchronize(device)
    start = time.perf_counter()
    for item in token_iterator_factory():
        synchronize(device)
        times.append(time.perf_counter())
        tokens.append(int(item[0] if isinstance(item, tuple) else item))
        # Decoding and drawing take a little time; it lands in the next token's gap (well under 1 ms).
        view.update(tokenizer.decode(tokens, skip_special_tokens=True), live_stats(start, times))
    view.close()
    metrics = RequestMetrics.from_timestamps(start, times)
    if use_widget:  # a static copy for readers of the saved notebook
        print(tokenizer.decode(tokens, skip_special_tokens=True))
    tpot = f"{metrics.tpot_s * 1e3:.1f} ms" if metrics.tpot_s is not None else "n/a (1 token)"
    print(f"{title + ': ' if title else ''}{metrics.output_tokens} tokens, TTFT {metrics.ttft_s * 1e3:.0f} ms, "
          f"TPOT {tpot}, E2E {metrics.e2e_s:.2f} s, {metrics.output_tokens_per_s:.1f} output tok/s")
    return metrics
