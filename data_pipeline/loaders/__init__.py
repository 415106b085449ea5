"""Reading: the training loader interface, DALI and PyTorch loaders, evaluation input, start-up checks."""
