"""What the recipes share: checkpoints, metrics logging, tables, plots, distributed setup."""
