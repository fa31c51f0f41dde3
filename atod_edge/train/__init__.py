"""Training: the ATOD loop (RL with a teacher), SFT, and the default `atod-edge train` job.

The math, pure tensor functions, one short module per idea of docs/algorithm.md: schedule
(kappa/rho, section 3), advantages (sections 1-3), tdur (section 4), loss (section 5).
The loop's rooms, in the order of a step: trainer (setup and the loop) -> batch (advantages per
token) -> update (the clipped surrogate; old log-probs, precision) -> run_log (metrics, progress)
-> checkpoint; distributed holds the torchrun/FSDP2 plumbing, lora the adapters, config the
configs. sft and demos fine-tune on demonstrations; pipeline is the default job; plots draws
the curves. Import the submodules by name: this file re-exports nothing.
"""
