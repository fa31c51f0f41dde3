"""Measuring a policy: evaluation on an env split with intervals, paired comparisons of two
policies on the same tasks, and publishing a checkpoint into the zoo with its measured card."""
