"""Which rank reads which row, in which order, with which crop: pure functions of the seed, the epoch and the row."""
