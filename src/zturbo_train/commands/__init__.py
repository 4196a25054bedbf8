"""Commands that orchestrate the library: sample, merge, bench, report."""
