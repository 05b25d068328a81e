"""Evaluation of saved checkpoints, one module per job.

- `samples`: --mode=sample, sample dumps with their pictures;
- `bpd`: --mode=bpd, the NLL bound in bits/dim (the paper's Table 2);
- `fid`: --mode=fid, FID and Inception Score of samples (Table 1);
- `watch`: --mode=evaluate_watch, each new checkpoint of a training run evaluated once;
- `results`: where results go (names that never overwrite, resumable parts, TensorBoard scalars).
"""
