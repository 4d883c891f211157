"""The IOI task: its words and dataset, the circuit analysis, and its report."""
