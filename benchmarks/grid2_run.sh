#!/bin/sh
# Grid 2 (benchmarks/results/grid2/PLAN.md): ATOD, OPD, GRPO, ATOD without annealing, ATOD with the
# adaptive schedule; seeds 0-2; 150 steps, T = 80, 4 tasks x 8 rollouts; 500 eval-split episodes per
# final model, curve points on 100 every 25 steps; eval split only. Resumable: re-run the same command.
#
# Run it from a frozen git worktree of the grid's commit (PLAN.md names it), with that worktree's code:
#   git worktree add --detach /work/grid2-code COMMIT && cd /work/grid2-code
#   OUT=/path/to/main/benchmarks/results/grid2 LR=... PYTHONPATH=$PWD nohup taskset -c 0,1 sh benchmarks/grid2_run.sh &
# OUT: the results dir in the checkout whose git gets the per-run commits (compare.py --commit).
set -e
: "${OUT:?set OUT to the grid's results dir}" "${LR:?set LR to the P2 choice (pilots.json)}"
exec "${PYTHON:-python}" benchmarks/compare.py --envs household --algos atod,opd,grpo \
  --ablations no-anneal,adaptive --seeds 0,1,2 --steps 150 --eval-episodes 500 \
  --curve-episodes 100 --curve-points 6 --splits eval --threads 2 --out "$OUT" --commit \
  --budget-note "150 steps x 32 episodes (the paper's schedule, T = 80), fixed in PLAN.md before any grid run" \
  --set student=grid2-cold-start --set teacher=household-teacher --set lr="$LR" \
  --set tasks_per_step=4 --set group_size=8 --set max_new_tokens=20 --set max_turns=15 \
  --set invalid_penalty=0.0 --set temperature=1.0 --set weights=tdur --set ppo_epochs=1 \
  --set max_grad_norm=1.0 --set schedule.anneal_steps=80 --set schedule.kappa_init=1.0 \
  --set schedule.kappa_min=0.1 --set schedule.rho_init=1.0 --set schedule.rho_max=2.0 \
  --set schedule.teacher_success=0.415 --set grad_norm_every=10 --set checkpoint_every=10
