"""Stand-in for a DALI pipeline built on a GPU (`Pipeline(device_id=N)` with "mixed" / "gpu" operators) where
CUDA is absent, for the simulated tier. It keeps everything of DALI that runs without a GPU and replaces only
the execution:

  definition  the graph is defined for real by nvidia.dali with the GPU placement and device_id, so DALI's own
              rules hold (a "mixed" operator takes CPU inputs and gives GPU outputs; a GPU output feeds only
              GPU operators and pipeline outputs; named argument inputs must be CPU data nodes - DALI raises
              "Named arguments must be on CPU", nvidia/dali/ops/__init__.py, 2.4.0). DALI checks these while
              the Python graph is built (Pipeline._build_graph, the step `build()` and `serialize()` take before
              the backend, which alone needs CUDA)
  execution   the same graph function on DALI's CPU operators in a twin pipeline (device_id None), fed and
              run through the same calls (feed_input by external_source name, run() -> one TensorList per
              output); its tensors export through DLPack as the GPU ones do (`torch.from_dlpack`)

What it does not model: nvJPEG's and the GPU resize kernels' rounding (the CPU operators' pixels come back;
data/dali.py states the tolerance against the HF path, which the real GPU run must also meet), CUDA streams
and device memory. `placements` records the operators of the defined GPU graph, so a test can see where each
would run.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple


class GpuPipelineStandin:
    """A built pipeline with the interface DaliImageDecoder uses: feed_input(name, data), run()."""

    def __init__(self, graph: Callable, placement: Sequence[str], device_id: int, options: Dict[str, object]):
        from nvidia.dali import pipeline_def

        self.device_id = device_id
        defined = pipeline_def(graph, device_id=device_id, **options)(*placement)
        defined._build_graph()  # DALI's placement and argument checks, on the GPU graph
        self.placements: List[Tuple[str, str]] = [(getattr(op._op, "schema_name", type(op._op).__name__), op._op.device)
                                                  for op in defined._ops]
        self.output_devices = [node.device for node in defined._graph_outputs]
        cpu = tuple("cpu" for _ in placement)
        self.twin = pipeline_def(graph, device_id=None, **options)(*cpu)
        self.twin.build()

    def feed_input(self, name: str, data) -> None:
        self.twin.feed_input(name, data)

    def run(self):
        return self.twin.run()
