"""Worker: the MAE decoder under pipeline and tensor parallelism (torchrun; args OUT TP, PP = world / TP).

Each stage builds its share of a tiny MocaVLM with the MAE decoder from its own seed, copies LLM layer
L//2 into the decoder (a broadcast from the stage that holds it) and saves, under OUT, per TP rank r:
source_tp{r}.pt (that layer's shard, from its stage), decoder_before_tp{r}.pt / decoder_tp{r}.pt (the
decoder layer's shard, from the last stage) and predict_tp{r}.pt (the replicated output linear).
"""

import os
import sys

import torch


def tensors(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}


def main(out, tp):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from helpers import tiny_config
    from megatron.core import parallel_state as ps

    from megatron_moca.distributed import runtime
    from megatron_moca.models.heads import initialize_mae_decoder
    from megatron_moca.models.vlm import MocaVLM

    world = int(os.environ.get("WORLD_SIZE", "1"))
    runtime.initialize(tp, world // tp, seed=7)  # seeds differ per stage, as in training
    model = MocaVLM(tiny_config(), mae_decoder=True)
    rank = ps.get_tensor_model_parallel_rank()
    if model.mae_decoder is not None:
        torch.save(tensors(model.mae_decoder.layer), os.path.join(out, f"decoder_before_tp{rank}.pt"))
    target = initialize_mae_decoder(model)
    for layer in model.language.decoder.layers:
        if layer.layer_number - 1 == target:
            torch.save(tensors(layer), os.path.join(out, f"source_tp{rank}.pt"))
    if model.mae_decoder is not None:
        torch.save(tensors(model.mae_decoder.layer), os.path.join(out, f"decoder_tp{rank}.pt"))
        torch.save(tensors(model.mae_decoder.predict), os.path.join(out, f"predict_tp{rank}.pt"))
    runtime.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
