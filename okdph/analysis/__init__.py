"""Generalization measurements of trained runs (docs/protocol.md#pac-bayes-bound,
docs/protocol.md#loss-landscape), from the trajectory points that
`okdph-bench train --save-every E` keeps beside a record:

- `pacbayes`: the PAC-Bayes bound (supplement Table 5, Fig. 1);
- `landscape`: the training-loss landscape around the students' trajectories (supplement Figs. 2-5);
- `evaluate`: what both share (training images without augmentation, many weight sets per pass);
- `options`: the PAC-Bayes options and their defaults, without torch (the commands
  `okdph-bench pacbayes` / `landscape` are in okdph/cli.py).
"""
