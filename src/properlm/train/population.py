"""Stage 1, population: one PEFT LoRA on all training users' data, then merged.

    properlm train --stage population --config configs/demo.yaml

Trains LoRA (r=8, alpha=16 by default) on q,k,v,o,gate,up,down with the
completion-only loss over the training users' history pairs and labelled
queries, and saves it in PEFT's adapter layout under ``RUN/population/``.
Later stages load the base, apply this adapter and merge it (``W1 = W0 + s B A``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import warnings

from peft import LoraConfig, get_peft_model

from properlm.io import atomic_dir
from properlm.model.proper import completion_nll
from properlm.run_config import RunConfig
from properlm.train import distributed as D
from properlm.train.examples import Example, collate, encode
from properlm.model.device import autocast, device_of
from properlm.model.precision import frozen_bf16
from properlm.train.loop import (Progress, RunLogger, load_checkpoint, plain_schedule, rng_state, save_checkpoint,
                                 seed_everything, set_rng_state)

STAGE = "population"
# PEFT calls a transformers method that warns about its own rename; not ours to act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def train_population(cfg: RunConfig, run_dir: Path, lm, tok, examples: list[Example], resume: bool = False) -> Path:
    """Train the population LoRA on ``examples`` and save it to ``run_dir/population``.

    Args:
        cfg: the run config (``cfg.population`` holds this stage's settings).
        run_dir: the run directory.
        lm: the base causal LM (left unchanged: the adapter is saved, not merged here; with
            ``fsdp`` and several processes its layers are left sharded).
        tok: its tokenizer.
        examples: training users' pairs.
        resume: continue from this stage's last checkpoint.

    Returns:
        The adapter directory (PEFT layout).
    """
    pc = cfg.population
    seed_everything(cfg.seed)
    peft_cfg = LoraConfig(r=pc.r, lora_alpha=pc.alpha, lora_dropout=pc.dropout, target_modules=list(pc.targets),
                          task_type="CAUSAL_LM")
    model = get_peft_model(lm, peft_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=pc.lr, weight_decay=0.0)
    enc = [encode(tok, e, cfg.data.max_len) for e in examples]
    steps = plain_schedule(len(enc), pc.batch_size, pc.epochs, cfg.seed)
    if pc.max_steps is not None:
        steps = steps[:pc.max_steps]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ckpt_root, start = run_dir / "checkpoints" / STAGE, 0
    W, R = D.world(), D.rank()
    sharded = D.sharding(cfg.fsdp)
    if sharded:
        D.shard_layers(model)
    logger = RunLogger(run_dir, STAGE) if R == 0 else None
    if resume and (ck := load_checkpoint(ckpt_root)) is not None:
        start, tensors, extra = ck
        with torch.no_grad():
            for n, p in zip(names, params):
                p.copy_(tensors[n])
        opt.load_state_dict(extra["optimizer"])
        set_rng_state(extra["rng"])
        if logger is not None:
            logger.truncate_after(start)
    device = device_of(model)
    prog = Progress(len(steps), "stage 1 population", start, cfg.progress and R == 0)
    model.train()
    with frozen_bf16(model, cfg.bf16):
        for step in range(start, len(steps)):
            # Data parallel: each rank takes every W-th example of the step; the loss is the step's
            # token mean over all ranks, so the summed gradients are the one-process gradients.
            batch = steps[step][R::W]
            opt.zero_grad(set_to_none=True)
            local_tok, local_nll, idle = 0, 0.0, None
            if batch:
                b = collate([enc[i] for i in batch], tok.pad_token_id, device)
                with autocast(cfg.bf16, b["input_ids"].device):
                    nll, ntok = completion_nll(model, b["input_ids"], b["attention_mask"], b["labels"])
                local_tok = int(ntok.sum())
            elif sharded:  # the other ranks' passes gather the layers: take part (zero gradients)
                with autocast(cfg.bf16, device):
                    idle = D.idle_loss(model, tok.pad_token_id, device)
            n_tok = max(D.sum_int(local_tok, device), 1)
            if batch:
                loss = nll.sum() / n_tok
                loss.backward()
                local_nll = float(nll.sum().detach())
            elif idle is not None:
                idle.backward()
            if W > 1:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                D.all_reduce_sum([p.grad for p in params])
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            summed = torch.tensor([local_nll, float(int(b["attention_mask"].sum()) if batch else 0)], device="cpu")
            D.all_reduce_sum([summed])
            step_loss = float(summed[0]) / n_tok
            tps = prog.update(step_loss, int(summed[1]))
            if logger is not None:
                logger.log(step + 1, loss=step_loss, tokens_per_s=tps)
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < len(steps):
                if R == 0:
                    save_checkpoint(ckpt_root, step + 1, dict(zip(names, params)),
                                    {"optimizer": opt.state_dict(), "rng": rng_state()})
                D.barrier()
    prog.close()
    if logger is not None:
        logger.close()
    out = run_dir / STAGE
    if R == 0:
        with atomic_dir(out, checksums=True) as tmp:
            model.save_pretrained(str(tmp))  # PEFT's layout: adapter_model.safetensors + adapter_config.json
    D.barrier()
    if not sharded:  # a sharded model is not reused: the next stage loads the base again
        model.unload().eval()  # leave `lm` as it came (the caller merges from the saved adapter)
    return out
