"""The ops' backends written in plain PyTorch (``reference`` for every op, ``packed`` for
sparse_conv3d, ``indexed`` for assemble_token_grid), with the calling conventions of the kernels
they stand in for. The op modules name them in their backend tables."""
