"""DALI on a GPU, simulated (standins/dali_gpu.py): DaliImageDecoder with a device id defines its pipeline for
a GPU ("mixed" decode, GPU resize, the rank's device id) and DALI itself accepts that graph - its placement
rules run without a GPU - then the stand-in executes it on DALI's CPU operators, so the decoder's GPU branch
(DLPack export, shapes, patch rows) runs for real and gives the CPU pipeline's rows. Without the stand-in a
GPU pipeline on this machine is DALI's own refusal, not a silent substitute."""

import pytest
import torch

from megatron_moca.data.dali import dali_available
from megatron_moca.data.image_processing import ImageProcessingConfig

pytestmark = pytest.mark.skipif(not dali_available() or torch.cuda.is_available(),
                                reason="needs nvidia-dali and no CUDA (on a GPU the real pipeline runs)")


@pytest.fixture
def dali_standin(monkeypatch):
    monkeypatch.setenv("MOCA_STANDINS", "te,dali_gpu")


def test_the_gpu_pipeline_is_defined_for_the_device_and_decodes_as_the_cpu_one(dali_standin, real_images):
    from megatron_moca.data.dali import DaliImageDecoder

    cfg = ImageProcessingConfig()
    data = [open(p, "rb").read() for p in real_images[:10]]
    gpu = DaliImageDecoder(cfg, max_batch=4, device_id=3)  # 4 < 10 images: a short last run
    assert gpu.pipe.device_id == 3 and gpu.pipe.output_devices == ["gpu"]
    assert [d for _, d in gpu.pipe.placements] == ["cpu", "mixed", "cpu", "gpu"]  # sources, decode, sizes, resize
    assert sorted(name for name, _ in gpu.pipe.placements) == ["ExternalSource", "ExternalSource", "Resize",
                                                                "decoders__Image"]
    cpu = DaliImageDecoder(cfg, max_batch=4)
    for (rows, grid), (expected_rows, expected_grid) in zip(gpu(data), cpu(data)):
        assert grid == expected_grid and rows.dtype == torch.uint8 and torch.equal(rows, expected_rows)


def test_dali_refuses_a_size_argument_moved_to_the_gpu(dali_standin):
    """The rule the first GPU run would have hit (the target size was moved to the GPU before): DALI refuses
    it while defining the graph, so the simulated tier catches it."""
    from nvidia.dali import fn, types

    from megatron_moca.standins.dali_gpu import GpuPipelineStandin

    def graph(decode_device, resize_device):
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        size = fn.external_source(name="size", dtype=types.FLOAT).gpu()
        image = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
        return fn.resize(image, device=resize_device, size=size)

    with pytest.raises(ValueError, match="Named arguments must be on CPU"):
        GpuPipelineStandin(graph, ("mixed", "gpu"), 0, dict(batch_size=2, num_threads=1, prefetch_queue_depth=1))


def test_without_the_standin_a_gpu_pipeline_is_dalis_own_refusal(monkeypatch):
    from megatron_moca.data.dali import DaliImageDecoder

    monkeypatch.setenv("MOCA_STANDINS", "te")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        DaliImageDecoder(ImageProcessingConfig(), max_batch=2, device_id=0)
