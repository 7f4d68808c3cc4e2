"""Studies built on the cost model: lint, sweep, scaling formulas, memory, many GPUs, explore."""
