"""Scoring recorded episodes: log-probs of response tokens (the chunked kernel, the prefix tree
that computes shared prompts once) and the teacher (torch or llama.cpp) that fills them in."""
