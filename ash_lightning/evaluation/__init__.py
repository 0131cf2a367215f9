"""From per-sample scores to results: exact metrics, the results table and files, figures, the feature cache."""
