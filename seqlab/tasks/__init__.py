"""The tasks: what is trained and how it is judged, with the data handling and evaluation
that belong to each. A task is a seqlab.training.trainer.Task that the one Trainer runs, or a
function a job calls (embedding, probing, sampling).

    species.py         species classification of genome windows (finetune_species)
    dna_pretrain.py    next-byte / masked-byte pretraining on FASTA (pretrain_dna)
    embed.py           pooled embeddings of genome items, streamed chunk by chunk
    embed_inputs.py    the items to embed: manifest windows, FASTA tiles, BED intervals
    embeddings.py      the embeddings file (.npz with provenance)
    probe.py           scikit-learn probes on embeddings
    audio.py           the audio LM on mu-law codes (train_audio): data, loss, scoring
    audio_sampling.py  prompts, sampling and WAV output (generate_audio, end-of-training sample)
    synthetic.py       selective copying / induction heads (synthetic job and benchmark)
    plots.py           confusion matrices, extrapolation curves, spectrograms
    common.py          typed config sections and input paths

Tasks import seqlab.training, seqlab.model and seqlab.data, never seqlab.jobs.
"""
