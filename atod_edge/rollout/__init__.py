"""Episodes: the record of a played episode, the batched runner that plays many at once against
an env pool with any policy, scripted (expert/noisy) play, and the embeddable `Agent`."""
