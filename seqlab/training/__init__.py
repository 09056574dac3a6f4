"""The training layer: the one Trainer and what it writes.

    trainer.py      Trainer, TrainerConfig, Task (what a task provides), the lr schedule
    rundir.py       one run, one directory: lock, status, resume point
    checkpoint.py   the checkpoint format: the one writer, integrity checks, weights in and out
    pretrained.py   the one loader: run directory, step folder, save_model folder or a
                    published mamba_ssm / Hugging Face / Caduceus folder -> (model, info)
    convert.py      key tables of the published formats
    distributed.py  torch.distributed under torchrun (DDP, FSDP2)
    cuda_graphs.py  training steps replayed from CUDA graphs
    curves.py       the training-curve plot every run writes

Imports reach down to seqlab.model and the base modules only, never up to seqlab.tasks or
seqlab.jobs.
"""
