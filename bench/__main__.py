"""``python -m bench``: the list of benchmarks."""

import bench

print(bench.__doc__)
