"""Worker for the TP/PP equivalence tests (run under torchrun or as one process).

  run:     load a dist checkpoint at --tp/--pp, one forward+backward of a fixed batch through
           megatron's schedule (1F1B when PP > 1), save the full logits (last stage, tp rank 0) to
           OUT/logits.pt and the gradients as a dist checkpoint OUT/grads (so TP/PP shards are put
           back together by megatron's own resharding). --stage1: the model with its MAE decoder
           (started from layer L//2) and MoCa's joint loss as the last stage's loss function; the
           loss and its parts go to OUT/losses.json instead of the logits.
  compare: load two gradient checkpoints at TP=1/PP=1 and print the largest difference as JSON.
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist


def fixed_batch(cfg):
    from megatron_moca.conversion.verification import fixed_batch as batch

    ids, mask, pixels, grid = batch(cfg, seed=3)
    return ids, torch.where(mask.bool(), 0, -1), pixels, grid


def run(args):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_moca.checkpointing import load_model, read_model_config, resolve_checkpoint, save_model
    from megatron_moca.distributed import runtime
    from megatron_moca.models.heads import initialize_mae_decoder
    from megatron_moca.models.vlm import MocaVLM
    from megatron_moca.objectives.reconstruction import reconstruction_loss

    runtime.initialize(args.tp, args.pp, seed=5)
    folder = resolve_checkpoint(args.checkpoint)
    cfg = read_model_config(folder)
    cfg.attention = args.attention
    model = MocaVLM(cfg, mae_decoder=args.stage1)
    load_model(model, folder, without=("mae_decoder.",))
    if args.stage1:
        initialize_mae_decoder(model)
        if model.mae_decoder is not None:  # the same output linear in every layout (seeds differ by stage)
            with torch.no_grad():
                predict = model.mae_decoder.predict
                predict.weight.copy_(0.02 * torch.randn(predict.weight.shape, generator=torch.Generator().manual_seed(11)))
    save_model(model, cfg, os.path.join(args.out, "model"), 0)  # re-saved from this TP/PP layout
    ids, doc, pixels, grid = fixed_batch(cfg)
    weights = torch.randn(ids.shape[1], ids.shape[0], cfg.language.vocab_size, generator=torch.Generator().manual_seed(9))
    captured = {}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        hidden = model(batch["input_ids"], document_ids=batch["document_ids"], pixel_values=batch["pixel_values"],
                       image_grid_thw=batch["image_grid_thw"])
        if not model.post_process:
            return hidden, lambda out: (out.sum() * 0, {})
        if args.stage1:  # MoCa's joint loss, as a trainer's last stage computes it
            def stage1_loss(out):
                loss, parts = reconstruction_loss(model, out, batch)
                captured["losses"] = {"loss": loss.item(), "mlm": parts["mlm_loss"].item(),
                                      "mae": parts["mae_loss"].item()}
                return loss, {"loss": loss.detach().clone()}

            return hidden, stage1_loss
        logits = model.logits(hidden, gather=True)
        captured["logits"] = logits.detach().clone()

        def loss_func(out):
            loss = (out * weights).sum() / out.shape[0]
            return loss, {"loss": loss.detach().clone()}

        return logits, loss_func

    batch = {"input_ids": ids, "document_ids": doc, "pixel_values": pixels, "image_grid_thw": grid}
    if args.stage1:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        from helpers import stage1_targets

        batch.update(stage1_targets(cfg, ids, doc >= 0, seed=13))
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=[model],
                                num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=ids.shape[0],
                                forward_only=False)
    if cfg.language.tie_word_embeddings and ps.get_pipeline_model_parallel_world_size() > 1 \
            and (ps.is_pipeline_first_stage() or ps.is_pipeline_last_stage()):
        # what finalize_model_grads does for tied embeddings: sum input and output gradients
        shared = model.language.shared_embedding_or_output_weight()
        dist.all_reduce(shared.grad, group=ps.get_embedding_group())
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    os.makedirs(args.out, exist_ok=True)
    if model.post_process and ps.get_tensor_model_parallel_rank() == 0:
        if args.stage1:
            with open(os.path.join(args.out, "losses.json"), "w") as f:
                json.dump(captured["losses"], f)
        else:
            torch.save(captured["logits"].transpose(0, 1), os.path.join(args.out, "logits.pt"))
    save_model(model, cfg, os.path.join(args.out, "grads"), 0)
    runtime.shutdown()


def compare(args):
    from megatron_moca.checkpointing import load_model, read_model_config, resolve_checkpoint
    from megatron_moca.distributed import runtime
    from megatron_moca.models.vlm import MocaVLM

    runtime.initialize(1, 1)

    def grads(path):
        folder = resolve_checkpoint(os.path.join(path, "grads"))
        model = MocaVLM(read_model_config(folder), initialize=False, mae_decoder=args.stage1)
        load_model(model, folder)
        return {k: v.detach() for k, v in model.named_parameters()}

    def outputs(path):
        if args.stage1:
            with open(os.path.join(path, "losses.json")) as f:
                return torch.tensor(list(json.load(f).values()))
        return torch.load(os.path.join(path, "logits.pt"))

    ref, ref_out = grads(args.reference), outputs(args.reference)
    report = {"zero_grad_params": sorted(k for k, v in ref.items() if not bool(v.any())), "params": len(ref),
              "mae_decoder_params": sum(k.startswith("mae_decoder.") for k in ref)}
    for path in args.others:
        other = grads(path)
        # per tensor: largest difference relative to the tensor's largest gradient (>= 1)
        rel = {k: float((ref[k] - other[k]).abs().max()) / max(1.0, float(ref[k].abs().max())) for k in ref}
        report[path] = {"grad_max_rel_diff": max(rel.values()), "worst": max(rel, key=rel.get),
                        "outputs_max_abs_diff": float((ref_out - outputs(path)).abs().max())}
    print(json.dumps(report))
    runtime.shutdown()


def main(argv=None):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--tp", type=int, default=1)
    r.add_argument("--pp", type=int, default=1)
    r.add_argument("--attention", default="bidirectional")
    r.add_argument("--stage1", action="store_true", help="MAE decoder + MoCa's joint loss instead of a logits readout")
    c = sub.add_parser("compare")
    c.add_argument("--stage1", action="store_true")
    c.add_argument("reference")
    c.add_argument("others", nargs="+")
    args = parser.parse_args(argv)
    run(args) if args.cmd == "run" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
